"""The pretrained correction folded for inference: the same function, fewer operations.

:class:`esdmri.reconst.pretrained.PriorCorrection` is written for training:
fields ``[B, C, V, X, Y, Z]``, one Chebyshev product per layer on the K
stacked polynomial terms, each normalisation as a chain of element-wise
passes. At inference every layer after the network's spatial reach acts on
each voxel alone, so :class:`FoldedCorrection` runs the masked voxels only,
in chunks that stay in cache, laid out ``[C, V, N]`` (channels outermost,
the chunk's voxels innermost and contiguous), with what does not depend on
the data computed once per fit:

- **the input layer as one matrix**: the network's first layer (RT-ESD's
  E(3) x SO(3) stem, ESD's and C-ESD's first spherical convolution) is
  linear in each voxel's neighbourhood of prior coefficients and isotropic
  shares, because the grid fODF is ``B c`` and the shares are constant on the
  sphere; its weights times ``T_k B`` (and ``T_k 1``) make one
  ``(C_out * V, G * 47)`` matrix, with G the stem's distance classes (4),
  C-ESD's neighbours (27) or ESD's one voxel. The voxels' features are
  summed per group from the padded volume (:func:`neighbourhood_sums`: the
  stem's neighbourhood sums of 47 numbers instead of 96 vertices x 3
  channels);
- **spherical convolutions** ``y_o = sum_{i,k} W[o, i, k] T_k x_i`` as one
  channel product over the chunk and the Chebyshev recursion with the sparse
  Laplacian (:func:`chebyshev_terms`, :func:`chebyshev_sum`), on the side
  with fewer channels;
- **the bias, normalisation** (:class:`esdmri.nn.unet.VoxelNorm`) **and
  ReLU** as one kernel of three passes (:func:`norm_relu`);
- **the head and the projection back to SH** as one ``(n_coeffs, C V)``
  matrix (``grid_to_sh T_k``) and a constant (the head's bias).

The chunks run one per torch thread (:func:`esdmri.threads.run_chunks`), torch
on one thread inside each.

The result equals :meth:`PriorCorrection.forward` up to float32 rounding
(``tests/test_cor_folded.py``). Only the architectures of
:data:`esdmri.reconst.pretrained.ARCHITECTURES` (voxel norm, average
spherical pooling, one spatial layer) fold; :func:`foldable` says whether a
correction does.
"""

import numpy as np
import torch
from numba import njit
from scipy.sparse import csr_array

from ..nn.unet import UNet, VoxelNorm

# Masked voxels per pass: a chunk's widest fields (16 channels x 96 vertices,
# the 3 x 8 x 96 Chebyshev terms) then stay within a core's L2 cache. On one
# thread chunks of 128-512 ran alike and 4,096 1.6x slower (docs/benchmarks.md,
# measured with the vertices innermost).
CHUNK = 256
def chebyshev_matrices(operator):
    """The dense polynomials ``T_0 .. T_{K-1}`` of a Chebyshev operator, shape (K, V, V).

    The operator's own analysis of the identity (``T_k I``), so its layout's
    recursion is the one place that builds them.
    """
    k, v = operator.kernel_size, operator.n_vertices
    buffer = next(operator.buffers(), None)
    identity = torch.eye(v, dtype=torch.get_default_dtype() if buffer is None else buffer.dtype,
                         device=None if buffer is None else buffer.device)
    with torch.no_grad():
        return operator.analyze(identity[None]).view(k, v, v)


def foldable(correction):
    """Whether :class:`FoldedCorrection` can fold ``correction`` (else the layered pass runs).

    Parameters
    ----------
    correction : PriorCorrection

    Returns
    -------
    bool
    """
    kind = correction.architecture["kind"]
    if kind == "e3so3-stem":
        stem, unet = correction.unet
        sums = stem.convs[0].sums
        if len(stem.convs) != 1 or sums.padding != "zeros":
            return False
        width, blocks = sums.spatial_kernel_size, [stem]
    else:
        unet, blocks = correction.unet, []
        if unet.concat is not None and unet.concat.padding != "zeros":
            return False
        width = 1 if unet.concat is None else unet.concat.spatial_kernel_size
    # The first layer's neighbourhood is the whole reach that inference pads.
    if width != 2 * correction.halo + 1:
        return False
    if not isinstance(unet, UNet) or unet.kind.pooling != "spherical" or unet.non_negative:
        return False
    if unet.pool.mode != "average" or unet.conv_name not in ("spherical", "concat"):
        return False
    blocks += [*unet.encoder, unet.bottleneck, *unet.decoder]
    return all(isinstance(norm, VoxelNorm) for block in blocks for norm in block.norms)


def sparse_rows(matrix):
    """A matrix's nonzero entries by rows (CSR), the form that :func:`chebyshev_terms` reads.

    Parameters
    ----------
    matrix : Tensor, shape (R, S)

    Returns
    -------
    indptr : ndarray of int64, shape (R + 1,)
    indices : ndarray of int64, shape (nnz,)
    data : ndarray, shape (nnz,)
        ``matrix``'s dtype.
    """
    rows = csr_array(matrix.detach().cpu().numpy())
    return rows.indptr.astype(np.int64), rows.indices.astype(np.int64), rows.data


@njit(cache=True, nogil=True)
def _row_product(indptr, indices, data, r, x, row):
    """``row = A[r] x``: row r of a :func:`sparse_rows` matrix times x (S, N).

    Each entry of ``A`` scales one row of N voxels, contiguous, so the inner
    loop is a vectorised ``axpy``.
    """
    n = x.shape[1]
    row[:] = 0
    j, stop = indptr[r], indptr[r + 1]
    # Four entries per pass over the row: one load and store of it per four
    # multiply-adds.
    while j + 4 <= stop:
        w0, w1, w2, w3 = data[j], data[j + 1], data[j + 2], data[j + 3]
        s0, s1 = x[indices[j]], x[indices[j + 1]]
        s2, s3 = x[indices[j + 2]], x[indices[j + 3]]
        for i in range(n):
            row[i] += w0 * s0[i] + w1 * s1[i] + w2 * s2[i] + w3 * s3[i]
        j += 4
    while j < stop:
        weight, source = data[j], x[indices[j]]
        for i in range(n):
            row[i] += weight * source[i]
        j += 1


@njit(cache=True, nogil=True)
def chebyshev_terms(indptr, indices, data, x, out):
    """``out[b, k] = T_k(L) x[b]`` by the three-term recursion, with ``L`` sparse.

    ``T_0 x = x``, ``T_1 x = L x``, ``T_k x = 2 L T_{k-1} x - T_{k-2} x``:
    at K = 3, two products with the Laplacian's 9 entries per row instead of
    one with the stack ``[T_1; T_2]``'s 35 (1.35 against 1.85 us per voxel for
    8 channels at nside 4, one thread).

    Parameters
    ----------
    indptr, indices, data : ndarray
        ``L``, shape (V, V), in :func:`sparse_rows`'s form.
    x : ndarray, shape (B, V, N)
    out : ndarray, shape (B, K, V, N)
        Overwritten.
    """
    for b in range(x.shape[0]):
        out[b, 0] = x[b]
        for k in range(1, out.shape[1]):
            for r in range(len(indptr) - 1):
                row = out[b, k, r]
                _row_product(indptr, indices, data, r, out[b, k - 1], row)
                if k > 1:
                    previous = out[b, k - 2, r]
                    for i in range(len(row)):
                        row[i] = 2 * row[i] - previous[i]


@njit(cache=True, nogil=True)
def chebyshev_sum(indptr, indices, data, z, out):
    """``out[b] = sum_k T_k(L) z[b, k]`` by Clenshaw's recurrence, with ``L`` sparse.

    ``c_K = c_{K+1} = 0``, ``c_k = z_k + 2 L c_{k+1} - c_{k+2}`` down to
    ``k = 1``, then ``out = z_0 + L c_1 - c_2``: K - 1 products with the
    Laplacian (the transpose of :func:`chebyshev_terms`).

    Parameters
    ----------
    indptr, indices, data : ndarray
        ``L``, shape (V, V), in :func:`sparse_rows`'s form.
    z : ndarray, shape (B, K, V, N)
    out : ndarray, shape (B, V, N)
        Overwritten.
    """
    n_terms, vertices, n = z.shape[1], z.shape[2], z.shape[3]
    # c_{k+1} and c_{k+2} (zero above K - 1), and the one being built.
    work = np.zeros((3, vertices, n), dtype=z.dtype)
    for b in range(z.shape[0]):
        work[:] = 0
        later, latest = 1, 0  # c_{k+2}, c_{k+1}
        for k in range(n_terms - 1, 0, -1):
            built = 3 - later - latest
            for r in range(vertices):
                row, current, previous = work[built, r], z[b, k, r], work[later, r]
                _row_product(indptr, indices, data, r, work[latest], row)
                for i in range(n):
                    row[i] = current[i] + 2 * row[i] - previous[i]
            later, latest = latest, built
        for r in range(vertices):
            row, first, previous = out[b, r], z[b, 0, r], work[later, r]
            _row_product(indptr, indices, data, r, work[latest], row)
            for i in range(n):
                row[i] = first[i] + row[i] - previous[i]


@njit(cache=True, nogil=True, error_model="numpy")
def norm_relu(x, bias, eps, weight, shift):
    """A convolution's bias, :class:`VoxelNorm` and ReLU of ``[C, V, N]``, in place.

    ``y = x + bias[c]``; per voxel n, the mean and the variance of ``y`` over
    channels and vertices (in float64, two passes); then
    ``max(0, (y - mean) / sqrt(variance + eps) * weight[c] + shift[c])``.

    Parameters
    ----------
    x : ndarray, float32, shape (C, V, N)
    bias, weight, shift : ndarray, float32, shape (C,)
    eps : float
    """
    channels, vertices, n = x.shape
    count = channels * vertices
    total = np.zeros(n)
    for c in range(channels):
        for v in range(vertices):
            row = x[c, v]
            for i in range(n):
                row[i] += bias[c]
                total[i] += row[i]
    mean = (total / count).astype(x.dtype)
    squares = np.zeros(n)
    for c in range(channels):
        for v in range(vertices):
            row = x[c, v]
            for i in range(n):
                centered = row[i] - mean[i]
                row[i] = centered
                squares[i] += centered * centered
    gain = (1 / np.sqrt(squares / count + eps)).astype(x.dtype)
    for c in range(channels):
        scaled = gain * weight[c]
        for v in range(vertices):
            row = x[c, v]
            for i in range(n):
                row[i] = max(row[i] * scaled[i] + shift[c], 0)


@njit(cache=True, nogil=True)
def neighbourhood_sums(flat, rows, shifts, groups, out):
    """Each voxel's inputs summed over each group of its neighbours.

    Parameters
    ----------
    flat : ndarray, shape (M, F)
        The padded volume's voxels, channel last.
    rows : ndarray of int64, shape (N,)
        The voxels, rows of ``flat``.
    shifts : ndarray of int64, shape (J,)
        The neighbours' offsets in rows of ``flat``.
    groups : ndarray of int64, shape (J,)
        Each neighbour's group.
    out : ndarray, shape (N, G, F)
        Overwritten: ``out[n, g] = sum of flat[rows[n] + shifts[j]] over j in group g``.
    """
    for n in range(len(rows)):
        sums = out[n]
        sums[:] = 0
        for j in range(len(shifts)):
            source, target = flat[rows[n] + shifts[j]], sums[groups[j]]
            for c in range(len(source)):
                target[c] += source[c]


def _norm_parameters(bias, norm, channels):
    """:func:`norm_relu`'s arguments after ``norm``: a convolution's bias (or 0) and the norm's."""
    bias = torch.zeros(channels) if bias is None else bias.detach()
    return (bias.float().numpy(), float(norm.eps), norm.weight.detach().float().numpy(),
            norm.bias.detach().float().numpy())


class _Conv:
    """One spherical convolution with its voxel norm and ReLU, ``[I, V, N] -> [O, V, N]``.

    With no more inputs than outputs the polynomials act on the inputs first
    (``T_k x_i``, then one channel product of the ``I K`` terms), otherwise
    on the outputs (one channel product to the ``O K`` terms, then
    ``sum_k T_k z_k``). The polynomials are sparse (``T_1`` and ``T_2`` of the
    HEALPix Laplacian: 9 and 25 of 96 vertices per row at nside 4): the inputs'
    terms run as :func:`chebyshev_terms`, the outputs' sum as
    :func:`chebyshev_sum`, both with the Laplacian's 9 entries per row; voxels
    innermost make each channel product one matrix product over all the
    chunk's voxels and vertices.
    """

    def __init__(self, conv, norm):
        weight = conv.weight.detach()  # (O, I, K)
        self.n_out, self.n_in, self.k = weight.shape
        terms = chebyshev_matrices(conv.operator)  # (K, V, V)
        self.n_vertices = terms.shape[-1]
        recursion = terms.double().clone()
        recursion[0] = torch.eye(self.n_vertices, dtype=torch.float64)
        for k in range(2, self.k):
            recursion[k] = 2 * terms[1].double() @ recursion[k - 1] - recursion[k - 2]
        if (recursion - terms.double()).abs().max() > 1e-5 * max(1, terms.abs().max()):
            raise ValueError("the convolution's polynomials must be Chebyshev's, T_0 = I")
        self.analysis = self.n_in <= self.n_out
        if self.analysis:
            self.mix = weight.reshape(self.n_out, -1).contiguous()  # columns (i, k)
        else:
            self.mix = weight.permute(0, 2, 1).reshape(-1, self.n_in).contiguous()  # rows (o, k)
        self.laplacian = sparse_rows(terms[1] if self.k > 1 else terms[0])
        self.norm = _norm_parameters(conv.bias, norm, self.n_out)

    def __call__(self, x):
        _, v, n = x.shape
        if self.analysis:
            terms = x.new_empty((self.n_in, self.k, v, n))
            chebyshev_terms(*self.laplacian, x.numpy(), terms.numpy())
            y = self.mix @ terms.view(-1, v * n)
        else:
            z = self.mix @ x.view(self.n_in, -1)
            y = x.new_empty((self.n_out * v, n))
            chebyshev_sum(*self.laplacian, z.view(self.n_out, self.k, v, n).numpy(),
                          y.view(self.n_out, v, n).numpy())
        y = y.view(self.n_out, v, n)
        norm_relu(y.numpy(), *self.norm)
        return y


class FoldedCorrection:
    """A :class:`PriorCorrection` folded for inference on masked voxels.

    Parameters
    ----------
    correction : PriorCorrection
        Its weights are read once; later changes to them are not seen.

    Notes
    -----
    :meth:`delta` of :meth:`features` is, for each voxel, the correction that
    :meth:`PriorCorrection.correction` adds there divided by the voxel's scale.
    """

    def __init__(self, correction):
        if not foldable(correction):
            raise ValueError("this correction's architecture does not fold (see foldable)")
        if correction.sh_to_grid.device.type != "cpu":
            raise ValueError("the folded correction runs on a CPU: move the correction there")
        self.halo = correction.halo
        to_grid = correction.sh_to_grid.double()  # (V, C8)
        device = to_grid.device
        n_vertices, n_sh = to_grid.shape
        self.n_vertices = n_vertices
        # A voxel's inputs on the grid: B c, then one constant per isotropic share.
        n_shares = correction.architecture["in_channels"] - 1
        constants = torch.ones(n_vertices, n_shares, dtype=torch.float64, device=device)
        basis = torch.cat([to_grid, constants], dim=1)
        channel = torch.cat([torch.zeros(n_sh, dtype=torch.long),
                             torch.arange(1, n_shares + 1)]).to(device)
        span = np.arange(-self.halo, self.halo + 1)
        self.offsets = torch.as_tensor(
            np.stack(np.meshgrid(span, span, span, indexing="ij"), -1).reshape(-1, 3),
            device=device)
        if correction.architecture["kind"] == "e3so3-stem":
            stem, self.unet = correction.unet
            conv, first_norm = stem.convs[0], stem.norms[0]
            weight = conv.fused_weight().detach()  # (O, I, K, R)
            groups = torch.as_tensor(conv.sums.class_index.reshape(-1), device=device)
            skip_first = False  # the stem is the first layer; the U-Net runs whole
        else:
            self.unet = correction.unet
            conv, first_norm = self.unet.encoder[0].convs[0], self.unet.encoder[0].norms[0]
            # C-ESD's input channel c m^3 + j is channel c of the voxel at offset j
            # (ESD: one offset).
            weight = conv.weight.detach().view(conv.out_channels, -1, len(self.offsets),
                                               conv.operator.kernel_size).transpose(2, 3)
            groups = torch.arange(len(self.offsets), device=device)
            skip_first = True
        n_out, _, _, self.n_groups = weight.shape
        # Offsets summed per group: the stem's distance classes; one each otherwise.
        self.groups = groups.cpu().numpy().astype(np.int64)
        on_grid = chebyshev_matrices(conv.operator).double() @ basis  # (K, V, 47)
        matrix = torch.einsum("ockg,kvc->ovgc", weight.double()[:, channel], on_grid)
        self.first = matrix.reshape(n_out * n_vertices, -1).float()  # rows (o, v)
        self.first_norm = _norm_parameters(getattr(conv, "bias", None), first_norm, n_out)
        self.n_features = basis.shape[1]
        self.encoder = []
        for level, block in enumerate(self.unet.encoder):
            layers = list(zip(block.convs, block.norms))[int(level == 0 and skip_first):]
            self.encoder.append([_Conv(c, norm) for c, norm in layers])
        self.bottleneck = [_Conv(c, norm) for c, norm in zip(self.unet.bottleneck.convs,
                                                             self.unet.bottleneck.norms)]
        self.decoder = [[_Conv(c, norm) for c, norm in zip(block.convs, block.norms)]
                        for block in self.unet.decoder]
        head = self.unet.head
        to_sh = correction.grid_to_sh.double()  # (C8, V)
        projected = to_sh @ chebyshev_matrices(head.operator).double()  # (K, C8, V)
        self.head = torch.einsum("ik,kcv->civ", head.weight.detach().double()[0],
                                 projected).reshape(len(to_sh), -1).float()  # columns (i, v)
        self.head_bias = (head.bias.detach().double() * to_sh.sum(1)).float()

    def features(self, padded, rows):
        """Each voxel's neighbourhood inputs, shape [N, G * 47].

        Parameters
        ----------
        padded : Tensor, shape (X', Y', Z', 47)
            The prior's normalised coefficients and shares
            (:meth:`PriorCorrection.normalized`), channel last, with a zero
            margin of at least :attr:`halo` voxels.
        rows : Tensor of int64, shape (N,)
            Flat indices of the voxels into ``padded``.
        """
        strides = torch.tensor([padded.shape[1] * padded.shape[2], padded.shape[2], 1])
        shifts = (self.offsets.cpu() @ strides).numpy()
        sums = torch.empty((len(rows), self.n_groups, self.n_features))
        neighbourhood_sums(padded.reshape(-1, self.n_features).numpy(), rows.numpy(), shifts,
                           self.groups, sums.numpy())
        return sums.view(len(rows), -1)

    def delta(self, features):
        """The correction of degrees 0 to the corrected order per unit scale, shape [N, C8].

        Parameters
        ----------
        features : Tensor, shape [N, G * 47]
            :meth:`features`.
        """
        n = len(features)
        x = torch.mm(self.first, features.t()).view(-1, self.n_vertices, n)  # (C, V, N)
        norm_relu(x.numpy(), *self.first_norm)
        skips = []
        for convs in self.encoder:
            for conv in convs:
                x = conv(x)
            skips.append(x)
            x = x.view(x.shape[0], -1, 4, n).mean(2)  # NESTED: 4 children in a row
        for conv in self.bottleneck:
            x = conv(x)
        for convs in self.decoder:
            skip = skips.pop()
            joined = x.new_empty((len(x) + len(skip),) + skip.shape[1:])
            joined[:len(x)].view(x.shape[0], -1, 4, n).copy_(x[:, :, None])
            joined[len(x):].copy_(skip)
            x = joined
            for conv in convs:
                x = conv(x)
        return torch.mm(self.head, x.view(-1, n)).t().add_(self.head_bias)
