"""Spherical Chebyshev convolution (ESD) on HEALPix graphs.

A graph filter of kernel size K is ``y = sum_k W_k T_k(L~) x`` with ``T_k``
the Chebyshev polynomials of the rescaled graph Laplacian (SPEC section 3).
The K matrices are precomputed once per sphere (``HealpixSphere.
chebyshev_basis``) and stacked side by side, ``[T_0 | T_1 | ... ]`` of shape
(V, K V): one product with it *synthesises* ``sum_k T_k z_k`` from K stacked
fields, and one product with its transpose *analyses* a field into its K
terms ``T_k x``. The stacked matrix is sparse (a degree K-1 polynomial of a
graph with 8 neighbours per vertex reaches only the (K-1)-ring: 35 non-zeros
per row for K = 3), so it is kept as a sparse CSR matrix by default; on the
CPU this beats both the published sparse recursion and a dense matmul from
nside 4 upwards (see ``benchmarks/bench_layers.py``).
"""

import warnings

import numpy as np
import torch
from torch import nn

from esdmri.nn.spatial import check_field

LAYOUTS = ("sparse", "dense")


def _as_basis_tensor(chebyshev_basis):
    basis = torch.as_tensor(chebyshev_basis)
    if basis.ndim != 3 or basis.shape[1] != basis.shape[2]:
        raise ValueError("chebyshev_basis must have shape (K, V, V) as returned by "
                         f"HealpixSphere.chebyshev_basis, got {tuple(basis.shape)}")
    return basis.to(torch.get_default_dtype())


class _Synthesize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, operator):
        ctx.operator = operator
        return operator._product(operator.synthesis, z)

    @staticmethod
    def backward(ctx, grad):
        return ctx.operator._product(ctx.operator.analysis, grad.contiguous()), None


class _Analyze(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, operator):
        ctx.operator = operator
        return operator._product(operator.analysis, x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.operator._product(ctx.operator.synthesis, grad.contiguous()), None


class ChebyshevOperator(nn.Module):
    """Stacked Chebyshev polynomials of one sphere's Laplacian.

    Parameters
    ----------
    chebyshev_basis : array_like, shape (K, V, V)
        ``T_0 .. T_{K-1}`` from ``HealpixSphere.chebyshev_basis(K)``.
    layout : {"sparse", "dense"}, optional
        Storage of the stacked matrices: sparse CSR (fewer operations) or
        dense (one batched matmul; competitive for a few dozen vertices and on
        GPUs).

    Attributes
    ----------
    kernel_size : int
        K.
    n_vertices : int
        V.
    synthesis : Tensor, shape (V, K V)
        ``[T_0 | ... | T_{K-1}]`` (non-persistent buffer: state dicts do not
        depend on the sphere).
    analysis : Tensor, shape (K V, V)
        Its transpose.

    Notes
    -----
    Both products are differentiable and save nothing for backward: the
    gradient of a synthesis is an analysis and vice versa. One operator can be
    shared by all layers on the same sphere.
    """

    def __init__(self, chebyshev_basis, layout="sparse"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        basis = _as_basis_tensor(chebyshev_basis)
        self.kernel_size, self.n_vertices = basis.shape[:2]
        self.layout = layout
        synthesis = basis.permute(1, 0, 2).reshape(self.n_vertices, -1)
        analysis = synthesis.T.contiguous()
        if layout == "sparse":
            with warnings.catch_warnings():  # torch flags sparse CSR as beta
                warnings.simplefilter("ignore", UserWarning)
                synthesis, analysis = synthesis.to_sparse_csr(), analysis.to_sparse_csr()
        self.register_buffer("synthesis", synthesis, persistent=False)
        self.register_buffer("analysis", analysis, persistent=False)

    def _product(self, matrix, fields):
        """``matrix @ fields[n]`` for every n; fields (N, rows, P)."""
        fields = fields.contiguous()
        if self.layout == "dense":
            return torch.matmul(matrix, fields)
        n_out = matrix.shape[0]
        n_fields, n_in, n_columns = fields.shape
        out = fields.new_empty((n_fields, n_out, n_columns))
        # A sparse product gathers whole rows of its dense operand: on blocks
        # of columns copied into small buffers (~1 MiB) those rows stay in
        # cache, 1.3 to 1.5x faster on the CPU than one product per field.
        block = max(32, min(256, 1 << int(np.log2(2**18 / (n_in + n_out)))))
        if n_columns <= 2 * block:  # already small enough
            for field, result in zip(fields, out):
                torch.mm(matrix, field, out=result)
            return out
        buffers = {}
        for field, result in zip(fields, out):
            for start in range(0, n_columns, block):
                width = min(block, n_columns - start)
                if width not in buffers:
                    buffers[width] = (fields.new_empty((n_in, width)),
                                      fields.new_empty((n_out, width)))
                buffer_in, buffer_out = buffers[width]
                buffer_in.copy_(field[:, start:start + width])
                torch.mm(matrix, buffer_in, out=buffer_out)
                result[:, start:start + width] = buffer_out
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
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.operator.kernel_size}, "
                f"n_vertices={self.operator.n_vertices}")
