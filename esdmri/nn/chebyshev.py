"""Spherical Chebyshev convolution (ESD) on HEALPix graphs.

A graph filter of kernel size K is ``y = sum_k W_k T_k(L~) x`` with ``T_k``
the Chebyshev polynomials of the rescaled graph Laplacian (DeepSphere [1]_,
ESD [2]_). Two products with the K polynomials carry every layer: the
*analysis* ``x -> (T_0 x, ..., T_{K-1} x)`` and its transpose, the
*synthesis* ``(z_0, ..., z_{K-1}) -> sum_k T_k z_k`` (the T_k are symmetric).

On the CPU the fastest form is the three-term recursion with the sparse
Laplacian (8 or 9 neighbours per vertex), run on blocks of columns that stay
in cache: for the synthesis Clenshaw's recurrence, ``b_k = z_k + 2 L~
b_{k+1} - b_{k+2}``. It beats one product with the precomputed stacked
matrix ``[T_0 | ... | T_{K-1}]``, sparse (a degree K-1 polynomial fills the
whole (K-1)-ring) or dense (measurements in docs/benchmarks.md, layers
section). The dense stacked matrix stays available for GPUs, where one large
matmul is the better shape.

References
----------
.. [1] Defferrard M, Milani M, Gusset F, Perraudin N. DeepSphere: a
   graph-based spherical CNN. ICLR 2020.
.. [2] Elaldi A, Dey N, Kim H, Gerig G. Equivariant spherical deconvolution:
   learning sparse orientation distribution functions from spherical data.
   IPMI 2021.
"""

import warnings

import numpy as np
import torch
from torch import nn

from esdmri.nn.spatial import Workspace, check_field, fp32_under_cuda_autocast

LAYOUTS = ("sparse", "dense")

# Columns per block of the sparse recursions, so that the few (V, 256)
# buffers of one block stay in cache.
_BLOCK_COLUMNS = 256


def _as_basis_tensor(chebyshev_basis):
    basis = torch.as_tensor(chebyshev_basis)
    if basis.ndim != 3 or basis.shape[1] != basis.shape[2]:
        raise ValueError("chebyshev_basis must have shape (K, V, V) as returned by "
                         f"HealpixSphere.chebyshev_basis, got {tuple(basis.shape)}")
    return basis.to(torch.get_default_dtype())


class _Synthesize(torch.autograd.Function):
    @staticmethod
    @fp32_under_cuda_autocast
    def forward(ctx, z, operator):
        ctx.operator = operator
        return operator._synthesize(z.contiguous())

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        return ctx.operator._analyze(grad.contiguous()), None


class _Analyze(torch.autograd.Function):
    @staticmethod
    @fp32_under_cuda_autocast
    def forward(ctx, x, operator):
        ctx.operator = operator
        return operator._analyze(x.contiguous())

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        return ctx.operator._synthesize(grad.contiguous()), None


class ChebyshevOperator(nn.Module):
    """Chebyshev polynomials ``T_0 .. T_{K-1}`` of one sphere's Laplacian.

    Parameters
    ----------
    chebyshev_basis : array_like, shape (K, V, V)
        ``T_0 .. T_{K-1}`` from ``HealpixSphere.chebyshev_basis(K)``.
    layout : {"sparse", "dense"}, optional
        "sparse": recursions with the sparse rescaled Laplacian ``T_1``
        (fastest on the CPU); "dense": one matmul with the stacked dense
        matrices (a single large product, for GPUs).

    Attributes
    ----------
    kernel_size : int
        K.
    n_vertices : int
        V.

    Notes
    -----
    The matrices are non-persistent buffers: state dicts do not depend on
    the sphere, and one operator can be shared by all layers on a sphere.
    Both products are differentiable and save nothing for backward: the
    gradient of a synthesis is an analysis and vice versa.
    """

    def __init__(self, chebyshev_basis, layout="sparse"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        basis = _as_basis_tensor(chebyshev_basis)
        self.kernel_size, self.n_vertices = basis.shape[:2]
        self.layout = layout
        if layout == "dense":
            synthesis = basis.permute(1, 0, 2).reshape(self.n_vertices, -1)  # [T_0 | T_1 | ...]
            self.register_buffer("synthesis", synthesis, persistent=False)
            self.register_buffer("analysis", synthesis.T.contiguous(), persistent=False)
        elif self.kernel_size > 1:
            with warnings.catch_warnings():  # torch flags sparse CSR as beta
                warnings.simplefilter("ignore", UserWarning)
                laplacian = basis[1].to_sparse_csr()
                # 32-bit indices: the CPU kernel (MKL) otherwise converts the
                # int64 indices into two new tensors on every product.
                laplacian = torch.sparse_csr_tensor(
                    laplacian.crow_indices().int(), laplacian.col_indices().int(),
                    laplacian.values(), laplacian.shape)
                self.register_buffer("laplacian", laplacian, persistent=False)

    @staticmethod
    def _column_blocks(n_columns):
        if n_columns <= 2 * _BLOCK_COLUMNS:
            return [slice(0, n_columns)]
        return [slice(start, min(start + _BLOCK_COLUMNS, n_columns))
                for start in range(0, n_columns, _BLOCK_COLUMNS)]

    def _analyze(self, fields, out=None, workspace=None):
        """(N, V, P) -> (N, K V, P): ``T_k x`` by ``T_k = 2 L~ T_{k-1} - T_{k-2}``.

        ``fields`` may be a strided view; ``out``, if given, is contiguous.
        A caller's :class:`Workspace` lends the scratch buffers, so that a
        caller looping over slabs allocates them once.
        """
        n, v, n_columns = fields.shape
        k = self.kernel_size
        if out is None:
            out = fields.new_empty((n, k * v, n_columns))
        if self.layout == "dense":
            return torch.matmul(self.analysis, fields, out=out)
        out = out.view(n, k, v, n_columns)
        blocks = self._column_blocks(n_columns)
        single = len(blocks) == 1
        workspace = workspace or Workspace()
        for field, result in zip(fields, out):
            for cols in blocks:
                width = cols.stop - cols.start
                # In place when one block covers the columns.
                terms = result if single else workspace.get(("analysis", width), (k, v, width),
                                                            fields)
                terms[0].copy_(field[:, cols])
                if k > 1:
                    torch.mm(self.laplacian, terms[0], out=terms[1])
                for order in range(2, k):  # one fused sparse product per term
                    torch.addmm(terms[order - 2], self.laplacian, terms[order - 1], beta=-1,
                                alpha=2, out=terms[order])
                if not single:
                    result[:, :, cols] = terms
        return out.view(n, k * v, n_columns)

    def _synthesize(self, stacked, out=None, workspace=None):
        """(N, K V, P) -> (N, V, P): ``sum_k T_k z_k`` by Clenshaw's recurrence.

        ``out``, if given, may be a strided view (a slab of a larger field);
        ``workspace`` as in :meth:`_analyze`.
        """
        n, _, n_columns = stacked.shape
        k, v = self.kernel_size, self.n_vertices
        if out is None:
            out = stacked.new_empty((n, v, n_columns))
        if self.layout == "dense":
            return out.copy_(torch.matmul(self.synthesis, stacked))
        stacked = stacked.view(n, k, v, n_columns)
        if k == 1:
            return out.copy_(stacked[:, 0])
        blocks = self._column_blocks(n_columns)
        workspace = workspace or Workspace()
        for terms, result in zip(stacked, out):
            for cols in blocks:
                width = cols.stop - cols.start
                b1, b2, spare = workspace.get(("synthesis", width), (3, v, width), stacked)
                # b_k = z_k + 2 L~ b_{k+1} - b_{k+2}; y = z_0 + L~ b_1 - b_2, with
                # b_K = 0 and each step one fused sparse product.
                b1.copy_(terms[k - 1, :, cols])
                has_b2 = False
                for order in range(k - 2, 0, -1):
                    torch.addmm(terms[order, :, cols], self.laplacian, b1, alpha=2, out=spare)
                    if has_b2:
                        spare.sub_(b2)
                    b1, b2, spare, has_b2 = spare, b1, b2, True
                torch.addmm(terms[0, :, cols], self.laplacian, b1, out=result[:, cols])
                if has_b2:
                    result[:, cols].sub_(b2)
        return out

    def synthesize(self, z):
        """``y[n] = sum_k T_k z[n, k]``.

        Parameters
        ----------
        z : Tensor, shape (N, K V, P) or (N, K, V, P)

        Returns
        -------
        y : Tensor, shape (N, V, P)
        """
        z = z.reshape(z.shape[0], self.kernel_size * self.n_vertices, -1)
        return _Synthesize.apply(z, self)

    def analyze(self, x):
        """``u[n, k] = T_k x[n]``.

        Parameters
        ----------
        x : Tensor, shape (N, V, P)

        Returns
        -------
        u : Tensor, shape (N, K V, P), the K terms stacked along dim 1
        """
        return _Analyze.apply(x.reshape(x.shape[0], self.n_vertices, -1), self)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, n_vertices={self.n_vertices}, layout={self.layout}"


def as_operator(chebyshev_basis, layout="sparse"):
    """A :class:`ChebyshevOperator` from a basis array, or the operator itself."""
    if isinstance(chebyshev_basis, ChebyshevOperator):
        return chebyshev_basis
    return ChebyshevOperator(chebyshev_basis, layout=layout)


class SphericalConv(nn.Module):
    """Chebyshev graph convolution on the sphere, voxel by voxel (ESD).

    ``y_o = sum_{i,k} W[o, i, k] T_k(L~) x_i + b_o``, applied independently at
    every voxel.

    Parameters
    ----------
    in_channels, out_channels : int
    chebyshev_basis : array_like, shape (K, V, V), or ChebyshevOperator
        ``HealpixSphere.chebyshev_basis(K)``; K is the spherical kernel size.
        Pass a :class:`ChebyshevOperator` to share it between layers.
    bias : bool, optional
    layout : {"sparse", "dense"}, optional
        Storage of the Chebyshev matrices when a basis array is given.

    Notes
    -----
    Input ``[B, in_channels, V, X, Y, Z]``, output ``[B, out_channels, V, X,
    Y, Z]``. The polynomial side of the product is applied to whichever of
    the input or output has fewer channels.
    """

    def __init__(self, in_channels, out_channels, chebyshev_basis, bias=True, layout="sparse"):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.operator = as_operator(chebyshev_basis, layout)
        k = self.operator.kernel_size
        self.weight = nn.Parameter(torch.randn(self.out_channels, self.in_channels, k)
                                   * np.sqrt(2.0 / (self.in_channels * k)))
        self.bias = nn.Parameter(torch.full((self.out_channels,), 0.01)) if bias else None

    def forward(self, x):
        """x : Tensor [B, in_channels, V, X, Y, Z] -> [B, out_channels, V, X, Y, Z]."""
        check_field(x, n_vertices=self.operator.n_vertices, n_channels=self.in_channels)
        b, _, v, *grid = x.shape
        n_in, n_out, k = self.in_channels, self.out_channels, self.operator.kernel_size
        x = x.contiguous()
        # bmm with an expanded weight: a broadcasting matmul would transpose
        # (copy) the large operand in backward.
        if n_in < n_out:
            u = self.operator.analyze(x.view(b * n_in, v, -1)).view(b, n_in * k, -1)
            w = self.weight.reshape(n_out, n_in * k)
            y = torch.bmm(w.expand(b, *w.shape), u)
        else:
            w = self.weight.permute(0, 2, 1).reshape(n_out * k, n_in)
            z = torch.bmm(w.expand(b, *w.shape), x.view(b, n_in, -1))
            y = self.operator.synthesize(z.view(b * n_out, k * v, -1))
        y = y.view(b, n_out, v, *grid)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1, 1, 1)
        return y

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.operator.kernel_size}, n_vertices={self.operator.n_vertices}")
