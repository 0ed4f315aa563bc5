"""The pretrained correction folded for inference: the same function, fewer operations.

:class:`esdmri.reconst.pretrained.PriorCorrection` is written for training:
fields ``[B, C, V, X, Y, Z]``, one Chebyshev product per layer on the K
stacked polynomial terms, each normalisation as a chain of element-wise
passes. At inference every layer after the network's spatial reach acts on
each voxel alone, so :class:`FoldedCorrection` runs the masked voxels only,
in chunks that stay in cache, laid out ``[C, N, V]`` (channels outermost, a
voxel's vertices contiguous), with what does not depend on the data computed
once per fit:

- **the input layer as one matrix**: the network's first layer (RT-ESD's
  E(3) x SO(3) stem, ESD's and C-ESD's first spherical convolution) is
  linear in each voxel's neighbourhood of prior coefficients and isotropic
  shares, because the grid fODF is ``B c`` and the shares are constant on the
  sphere; its weights times ``T_k B`` (and ``T_k 1``) make one
  ``(G * 47, C_out * V)`` matrix, with G the stem's distance classes (4),
  C-ESD's neighbours (27) or ESD's one voxel. The voxels' features are
  gathered from the padded volume (the stem's neighbourhood sums of 47
  numbers instead of 96 vertices x 3 channels);
- **spherical convolutions** ``y_o = sum_{i,k} W[o, i, k] T_k x_i`` as one
  channel product over the chunk and one dense product per polynomial
  ``T_1 .. T_{K-1}`` (``T_0`` is the identity, not multiplied), on the side
  with fewer channels;
- **normalisation** (:class:`esdmri.nn.unet.VoxelNorm`) as sums, an
  in-place centring and an in-place ``x a + b`` with the per-channel scale
  folded into ``a``;
- **the head and the projection back to SH** as one ``(C V, n_coeffs)``
  matrix (``grid_to_sh T_k``) and a constant (the head's bias).

The result equals :meth:`PriorCorrection.forward` up to float32 rounding
(``tests/test_cor_folded.py``). Only the architectures of
:data:`esdmri.reconst.pretrained.ARCHITECTURES` (voxel norm, average
spherical pooling, one spatial layer) fold; :func:`foldable` says whether a
correction does.
"""

import numpy as np
import torch

from ..nn.unet import UNet, VoxelNorm

# Masked voxels per pass: a chunk's widest fields (16 channels x 96 vertices,
# the 3 x 8 x 96 Chebyshev terms) then stay within a core's L2 cache. On one
# thread chunks of 128-512 ran alike and 4,096 1.6x slower (docs/benchmarks.md).
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


class _Conv:
    """One spherical convolution ``[I, N, V] -> [O, N, V]``, on the cheaper side.

    With fewer inputs than outputs the polynomials act on the inputs first
    (``T_k x_i``, then one channel product of the ``I K`` terms), otherwise
    on the outputs (one channel product to the ``O K`` terms, then
    ``sum_k T_k z_k``). Channels outermost make each product one matrix
    product over all the chunk's voxels and vertices.
    """

    def __init__(self, conv):
        weight = conv.weight.detach()  # (O, I, K)
        self.n_out, self.n_in, self.k = weight.shape
        terms = chebyshev_matrices(conv.operator)  # (K, V, V)
        if not torch.equal(terms[0], torch.eye(terms.shape[-1], dtype=terms.dtype,
                                               device=terms.device)):
            raise ValueError("the first Chebyshev polynomial must be the identity")
        # Rows of vertices times T_k^T: T_k applied to each row.
        self.transposed = terms[1:].transpose(1, 2).contiguous()
        self.analysis = self.n_in < self.n_out
        if self.analysis:
            self.first = weight[:, :, 0].contiguous()
            self.rest = weight[:, :, 1:].permute(0, 2, 1).reshape(self.n_out, -1).contiguous()
        else:
            self.mix = weight.permute(2, 0, 1).reshape(self.k * self.n_out, self.n_in)
        self.bias = None if conv.bias is None else conv.bias.detach().view(-1, 1, 1)

    def __call__(self, x):
        _, n, v = x.shape
        rows = x.view(-1, v)
        if self.analysis:
            terms = x.new_empty((self.k - 1, self.n_in * n, v))
            for polynomial, out in zip(self.transposed, terms):
                torch.mm(rows, polynomial, out=out)
            y = self.first @ x.view(self.n_in, -1)
            y.addmm_(self.rest, terms.view(-1, n * v))
        else:
            z = (self.mix @ x.view(self.n_in, -1)).view(self.k, -1, v)
            y = z[0]
            for polynomial, term in zip(self.transposed, z[1:]):
                y.addmm_(term, polynomial)
        y = y.view(self.n_out, n, v)
        return y if self.bias is None else y.add_(self.bias)


def _norm_relu(norm, y):
    """:class:`VoxelNorm` then ReLU of ``[C, N, V]``, in place (``y`` is a layer's new output)."""
    channels, _, vertices = y.shape
    mean = y.sum(-1).sum(0) / (channels * vertices)
    centered = y.sub_(mean[:, None])
    variance = torch.linalg.vecdot(centered, centered).sum(0) / (channels * vertices)
    gain = torch.rsqrt(variance + norm.eps)[:, None] * norm.weight.detach()[:, None, None]
    # In place, not addcmul: its scale broadcast along the vertices ran 7x slower.
    return centered.mul_(gain).add_(norm.bias.detach()[:, None, None]).clamp_min_(0)


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
        self.halo = correction.halo
        to_grid = correction.sh_to_grid.double()  # (V, C8)
        device = to_grid.device
        n_vertices, n_sh = to_grid.shape
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
            conv, self.first_norm = stem.convs[0], stem.norms[0]
            weight = conv.fused_weight().detach()  # (O, I, K, R)
            groups = torch.as_tensor(conv.sums.class_index.reshape(-1), device=device)
            self.skip_first = False  # the stem is the first layer; the U-Net runs whole
        else:
            self.unet = correction.unet
            conv, self.first_norm = self.unet.encoder[0].convs[0], self.unet.encoder[0].norms[0]
            # C-ESD's input channel c m^3 + j is channel c of the voxel at offset j
            # (ESD: one offset).
            weight = conv.weight.detach().view(conv.out_channels, -1, len(self.offsets),
                                               conv.operator.kernel_size).transpose(2, 3)
            groups = torch.arange(len(self.offsets), device=device)
            self.skip_first = True
        n_out, _, _, n_groups = weight.shape
        # Offsets summed per group: the stem's distance classes; one each otherwise.
        self.membership = (None if n_groups == len(self.offsets) else
                           (groups[None] == torch.arange(n_groups, device=device)[:, None]).float())
        on_grid = chebyshev_matrices(conv.operator).double() @ basis  # (K, V, 47)
        matrix = torch.einsum("ockg,kvc->gcov", weight.double()[:, channel], on_grid)
        self.first = matrix.reshape(-1, n_out, n_vertices).transpose(0, 1).float()
        self.n_features = basis.shape[1]
        self.encoder = [[_Conv(c) for c in block.convs] for block in self.unet.encoder]
        self.bottleneck = [_Conv(c) for c in self.unet.bottleneck.convs]
        self.decoder = [[_Conv(c) for c in block.convs] for block in self.unet.decoder]
        head = self.unet.head
        to_sh = correction.grid_to_sh.double()  # (C8, V)
        projected = to_sh @ chebyshev_matrices(head.operator).double()  # (K, C8, V)
        self.head = torch.einsum("ik,kcv->ivc", head.weight.detach().double()[0],
                                 projected).float()
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
        strides = torch.tensor([padded.shape[1] * padded.shape[2], padded.shape[2], 1],
                               device=padded.device)
        gathered = padded.reshape(-1, self.n_features)[rows[:, None] + self.offsets @ strides]
        if self.membership is not None:
            gathered = torch.matmul(self.membership, gathered)  # (N, G, 47)
        return gathered.reshape(len(rows), -1)

    def delta(self, features):
        """The correction of degrees 0 to the corrected order per unit scale, shape [N, C8].

        Parameters
        ----------
        features : Tensor, shape [N, G * 47]
            :meth:`features`.
        """
        x = _norm_relu(self.first_norm, torch.matmul(features, self.first))  # (C, N, V)
        skips = []
        for level, (block, convs) in enumerate(zip(self.unet.encoder, self.encoder)):
            first = int(level == 0 and self.skip_first)
            for conv, norm in list(zip(convs, block.norms))[first:]:
                x = _norm_relu(norm, conv(x))
            skips.append(x)
            x = x.view(*x.shape[:2], -1, 4).mean(-1)  # NESTED: 4 children in a row
        for conv, norm in zip(self.bottleneck, self.unet.bottleneck.norms):
            x = _norm_relu(norm, conv(x))
        for block, convs in zip(self.unet.decoder, self.decoder):
            x = torch.cat([x.repeat_interleave(4, dim=2), skips.pop()])
            for conv, norm in zip(convs, block.norms):
                x = _norm_relu(norm, conv(x))
        return torch.bmm(x, self.head).sum(0).add_(self.head_bias)
