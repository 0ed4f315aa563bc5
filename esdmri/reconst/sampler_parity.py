"""The fODF sampler's parity split: a quarter-size product per class of coefficients (CPU).

The refinement's sampler (:func:`esdmri.reconst.network.build_fodf_sampler`:
the HEALPix hemisphere, antipodes identified) is symmetric under the mirrors
``x -> -x`` and ``y -> -y``: most of its points fall into orbits of four, a
point ``p`` and its images under the two mirrors and their product. Every
real SH is even or odd under each mirror, so its samples on an orbit are its
sample at ``p`` times a sign pattern (a character of the group), and the WM
coefficients fall into four classes, one per character. With the
coefficients in class order (:func:`parity_order`, applied once by
:func:`esdmri.reconst.refine.refine_coefficients`), the samples of the
orbits' first points are one product per class with a quarter of the
sampler (``C_q x m``, contiguous columns of the coefficients: no gather),
and the samples on the orbits are their Hadamard combinations; the points
on the mirror planes and the equator stay in a dense product with ``R``. At
SH order 12 the products' multiply-adds per voxel fall from 93 x 477 = 44.4k
to 93 x 125 + 91 x 88 = 19.6k each way (docs/benchmarks.md, branch pfs).

The Hadamard butterfly and its transpose (the same: the 4 x 4 Hadamard matrix
is symmetric) run inside the fused voxel-terms kernel
(:func:`esdmri.reconst.fused_objective.parity_voxel_terms`), on each row
while it is in cache: no extra pass over a block. With a reference point per
voxel (:meth:`ParitySplit.evaluate_from`), the signal term's products through
``R`` give way to one product of the step with the Gram matrix ``G = R^T R``.
"""

import torch

from esdmri.reconst.fused_objective import increment_voxel_terms, parity_voxel_terms

__all__ = ["ENABLED", "ParitySplit", "parity_order", "sampler_parity"]

# Whether refinements and losses built from now on use the split on a CPU (with
# the fused kernels, :func:`esdmri.reconst.fused_objective.fused_on`); a
# benchmark or a test builds the single stacked product's by setting it False.
ENABLED = True


def sampler_parity(fodf_sampler, tolerance=1e-5):
    """The sampler's orbits and classes under two sign-flip symmetries of its sphere.

    Found from the matrix alone: rows with equal absolute values are an
    orbit, their column sign ratios the characters; every orbit is checked
    to be its first row times the characters.

    Parameters
    ----------
    fodf_sampler : Tensor, shape (V, C_wm)
    tolerance : float, optional
        Largest difference, relative to the largest entry, of two samples
        taken as equal (the sampler's round-off).

    Returns
    -------
    parity : dict or None
        None where the sampler has no such structure. ``orbits``: the rows of
        each orbit (LongTensor, shape (4, m)), row 0 the orbits' first points
        ``p``, then the points in the order of the Hadamard combinations of
        the four classes' samples at ``p`` (:func:`_butterfly`); ``rest``: the
        rows in no orbit of four (LongTensor, shape (r,)); ``classes``: the
        columns of each class (list of 4 LongTensors: even under both
        mirrors, odd under the second only, under the first only, under
        both).
    """
    sampler = fodf_sampler.detach().to("cpu", torch.float64)
    magnitude = sampler.abs()
    scale = float(magnitude.max()) if sampler.numel() else 0.0
    if sampler.shape[1] < 2 or scale == 0:
        return None
    close = torch.cdist(magnitude, magnitude, p=float("inf")) <= tolerance * scale
    groups, rest, seen = [], [], torch.zeros(len(sampler), dtype=torch.bool)
    for row in range(len(sampler)):
        if not seen[row]:
            members = torch.nonzero(close[row]).flatten()
            seen[members] = True
            (groups if len(members) == 4 else rest).append(members)
    # The characters: the column signs of the three other members relative to the
    # first, from an orbit with no vanishing sample (a vanishing one says nothing).
    floor = tolerance * scale
    known = [members for members in groups if bool((magnitude[members[0]] > floor).all())]
    if not known:
        return None
    flips = torch.sign(sampler[known[0][1:]] * sampler[known[0][0]])  # (3, C)
    if not bool((flips[0] * flips[1] == flips[2]).all()):
        return None
    first, second = flips[0], flips[1]
    classes = [torch.nonzero((first == a) & (second == b)).flatten()
               for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
    # The rows of each orbit in the butterfly's output order: p, then the points whose
    # characters are those of the Hadamard rows (+ - + -), (+ + - -) and (+ - - +) over the
    # classes; in the class order above these are the elements with the character
    # ``second``, ``first`` and ``first * second``.
    characters = torch.stack([torch.ones_like(first), second, first, first * second])
    orbits = []
    for members in groups:
        anchor = sampler[members[0]]
        row = []
        for character in characters:
            matches = [int(m) for m in members
                       if float((sampler[m] - character * anchor).abs().max()) <= tolerance * scale]
            row.append(matches[0] if len(matches) == 1 else None)
        if None in row or len(set(row)) < 4:
            rest.append(members)  # four equal magnitudes that are not one orbit
        else:
            orbits.append(row)
    if not orbits:
        return None
    rest = torch.cat(rest) if rest else torch.zeros(0, dtype=torch.long)
    return dict(orbits=torch.tensor(orbits).T, rest=rest, classes=classes)


def parity_order(fodf_sampler, n_coefficients):
    """The order of the coefficients that makes each parity class contiguous.

    Parameters
    ----------
    fodf_sampler : Tensor, shape (V, C_wm)
    n_coefficients : int
        ``C_wm`` plus the isotropic coefficients, which stay last.

    Returns
    -------
    order : LongTensor, shape (n_coefficients,), or None
        Column ``j`` of the reordered coefficients is column ``order[j]``;
        None without a parity split (:func:`sampler_parity`).
    """
    parity = sampler_parity(fodf_sampler)
    if parity is None:
        return None
    n_wm = fodf_sampler.shape[1]
    return torch.cat([*parity["classes"], torch.arange(n_wm, n_coefficients)])


class ParitySplit:
    """A :class:`~esdmri.reconst.refine.VoxelLoss`'s products, split by parity class.

    Built by :meth:`from_operator` from the loss's stacked operator when its
    coefficients are in class order (:func:`parity_order`).

    Attributes
    ----------
    dense, dense_t : Tensor, shape (C, k + r) and its transpose (contiguous)
        ``R`` and the sampler's rows in no orbit.
    blocks : list of (slice, slice, Tensor, Tensor)
        Per class: its coefficients' columns, its region of the mapped
        block's columns, the sampler at the orbits' first points (``C_q x
        m``) and its transpose (contiguous).
    start, width : int
        Where the four regions begin (``k + r``) and each one's width ``m``.
    gram : Tensor, shape (C, C), or None
        ``G = R^T R``, with which an evaluation from a reference point
        (:meth:`evaluate_from`) takes the signal term's gradient and value by
        one product ``G d`` forward and none back; None where that costs more
        than ``R``'s two products (``C >= 2 k``).
    """

    # Rows of the reference state computed at once (its float64 temporaries).
    _REFERENCE_ROWS = 16384

    def __init__(self, dense, blocks, width, rank):
        self.dense, self.dense_t = dense, dense.T.contiguous()
        self.start, self.width, self.rank = dense.shape[1], width, rank
        self.blocks = []
        for index, (columns, block) in enumerate(blocks):
            region = slice(self.start + index * width, self.start + (index + 1) * width)
            self.blocks.append((columns, region, block, block.T.contiguous()))
        n_coefficients = dense.shape[0]
        self.gram = None
        if 2 * rank > n_coefficients:
            # In float64 from the operator's own R^T: the increments then follow the
            # function that evaluate computes, to float32's round-off.
            factor = dense[:, :rank].to(torch.float64)
            self.gram = (factor @ factor.T).to(dense.dtype)
            self.rest = dense[:, rank:].contiguous()
            self.rest_t = self.rest.T.contiguous()
            # The increments' layout: G d (C columns), the rest, then the four regions.
            self.increment_start = n_coefficients + self.rest.shape[1]
            self.increment_regions = [slice(self.increment_start + index * width,
                                            self.increment_start + (index + 1) * width)
                                      for index in range(len(self.blocks))]

    @classmethod
    def from_operator(cls, operator, rank, n_wm_coeffs):
        """The split of ``operator`` (``C x (k + V)``: ``R^T``, then the sampler's
        transpose in the first ``n_wm_coeffs`` rows), or None.

        None unless the sampler has the parity structure with each class a
        contiguous range of coefficients in the order of :func:`sampler_parity`.
        """
        sampler = operator[:n_wm_coeffs, rank:].T.to(torch.float64)
        parity = sampler_parity(sampler)
        if parity is None:
            return None
        columns, begin = [], 0
        for members in parity["classes"]:
            span = slice(begin, begin + len(members))
            if not torch.equal(members, torch.arange(span.start, span.stop)):
                return None
            columns.append(span)
            begin = span.stop
        orbits, rest = parity["orbits"], parity["rest"]
        dense = torch.cat([operator[:, :rank], operator[:, rank + rest]], dim=1)
        blocks = [(span, operator[span, rank + orbits[0]].contiguous()) for span in columns]
        return cls(dense.contiguous(), blocks, orbits.shape[1], rank)

    def evaluate(self, voxel_loss, coefficients, projected, constant, out, return_loss):
        """:class:`~esdmri.reconst.refine.VoxelLoss`'s evaluation through the split.

        Parameters and returns as :meth:`~esdmri.reconst.refine.VoxelLoss.__call__`.
        """
        mapped = coefficients.new_empty((len(coefficients), self.start + 4 * self.width))
        # Products into column views of one buffer and from column slices of the
        # coefficients: BLAS takes the strides (measured: no copies).
        torch.mm(coefficients, self.dense, out=mapped[:, :self.start])
        for columns, region, block, _ in self.blocks:
            torch.mm(coefficients[:, columns], block, out=mapped[:, region])
        dtype = mapped.numpy().dtype.type
        loss = torch.empty(len(mapped) if return_loss else 0, dtype=torch.float64)
        parity_voxel_terms(mapped.numpy(), self.start, self.width, projected.numpy(),
                           constant.numpy(), voxel_loss.rank, dtype(voxel_loss.residual_scale),
                           dtype(voxel_loss.spread_scale), dtype(voxel_loss.sparsity_scale),
                           dtype(voxel_loss.negative_scale), voxel_loss.loss_scales,
                           loss.numpy())
        gradient = torch.mm(mapped[:, :self.start], self.dense_t, out=out)
        for columns, region, _, block_t in self.blocks:
            gradient[:, columns].addmm_(mapped[:, region], block_t)
        return (gradient, loss) if return_loss else gradient

    def reference_state(self, coefficients, projected):
        """The signal term's state at ``coefficients``, the start of :meth:`evaluate_from`.

        Parameters
        ----------
        coefficients : Tensor, shape (n, C)
        projected : Tensor, shape (n, k)
            ``Q^T y`` (:meth:`~esdmri.reconst.refine.VoxelLoss.project`).

        Returns
        -------
        reference : tuple of Tensor
            ``c0`` (a copy of ``coefficients``), ``R^T r0`` in their dtype and
            ``|r0|^2`` in float64, ``r0 = R c0 - Q^T y``, computed in float64.
        """
        factor = self.dense[:, :self.rank].to(torch.float64)
        gradient = torch.empty_like(coefficients)
        squares = torch.empty(len(coefficients), dtype=torch.float64)
        for start in range(0, len(coefficients), self._REFERENCE_ROWS):
            rows = slice(start, start + self._REFERENCE_ROWS)
            residual = coefficients[rows].to(torch.float64) @ factor
            residual -= projected[rows]
            gradient[rows] = residual @ factor.T
            squares[rows] = (residual * residual).sum(dim=1)
        return coefficients.clone(), gradient, squares

    def evaluate_from(self, voxel_loss, coefficients, reference, constant, out, return_loss):
        """:meth:`evaluate` from a reference point, which moves to ``coefficients``.

        The signal term by increments from ``reference``
        (:func:`esdmri.reconst.fused_objective.increment_voxel_terms`): where
        :meth:`evaluate` maps ``c`` by ``R`` forward and the residual back,
        this maps ``d = c - c0`` by ``G`` forward only: at SH order 12 (93
        coefficients, 32 samples in no orbit) the dense products' multiply-adds
        per voxel fall from 23.3k to 14.6k (the classes' 16.0k stay).

        Parameters
        ----------
        reference : tuple of Tensor
            Rows of :meth:`reference_state` (views), updated in place.
        Others as :meth:`evaluate` (without ``projected``).
        """
        n, n_coefficients = coefficients.shape
        mapped = coefficients.new_empty((n, self.increment_start + 4 * self.width))
        delta = torch.sub(coefficients, reference[0])
        torch.mm(delta, self.gram, out=mapped[:, :n_coefficients])
        torch.mm(coefficients, self.rest, out=mapped[:, n_coefficients:self.increment_start])
        for (columns, _, block, _), region in zip(self.blocks, self.increment_regions):
            torch.mm(coefficients[:, columns], block, out=mapped[:, region])
        gradient = torch.empty_like(coefficients) if out is None else out
        dtype = mapped.numpy().dtype.type
        loss = torch.empty(n if return_loss else 0, dtype=torch.float64)
        increment_voxel_terms(mapped.numpy(), self.increment_start, self.width,
                              coefficients.numpy(), delta.numpy(),
                              tuple(part.numpy() for part in reference), constant.numpy(),
                              gradient.numpy(), dtype(voxel_loss.residual_scale),
                              dtype(voxel_loss.spread_scale), dtype(voxel_loss.sparsity_scale),
                              dtype(voxel_loss.negative_scale), voxel_loss.loss_scales,
                              loss.numpy())
        gradient.addmm_(mapped[:, n_coefficients:self.increment_start], self.rest_t)
        for (columns, _, _, block_t), region in zip(self.blocks, self.increment_regions):
            gradient[:, columns].addmm_(mapped[:, region], block_t)
        return (gradient, loss) if return_loss else gradient
