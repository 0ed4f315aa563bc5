"""E(3) x SO(3) convolution of RT-ESD: spherical Chebyshev filter x 3D kernel.

The published layer (RT-ESD [1]_) has the separable weight
``W[o, i, k, d] = A[o, i, k] B[o, i, |d|]``: a Chebyshev filter of kernel
size K on the sphere times an isotropic 3D kernel (weights shared by distance
to the centre). Written as a linear map,

    y_o = sum_{i, k, r} W[o, i, k, r] S_r T_k x_i,

with ``T_k`` the Chebyshev polynomials (sphere), ``S_r`` the neighbourhood
sums of distance class r (grid), and ``W = A * B`` fused into one
``(O, I K R)`` matrix. All three factors commute, which lets the layer pick
the cheapest order instead of a 27-tap convolution over every vertex:

* the neighbourhood sums act on the I inputs, one channel matmul makes
  ``O K`` fields and a synthesis over the sphere sums their Chebyshev terms
  (measured on the CPU: forming the sums on the ``I K`` Chebyshev terms of
  the inputs instead costs more than the sphere products it saves);
* the 3D kernel costs R neighbourhood sums (separable shifted adds) and R
  columns of the channel matmul (R = 4 instead of 27 for a 3x3x3 kernel);
* the work runs slab by slab of x-rows, each slab from its sums to its
  synthesised output, and backward recomputes the sums instead of storing
  them: no buffer outlives a slab, and autograd keeps only the layer's
  input alive (chunking only the vertices needs the whole volume's ``O K``
  Chebyshev terms before the synthesis: a few times the peak memory,
  measured in docs/benchmarks.md, layers section).

References
----------
.. [1] Elaldi A, Gerig G, Dey N. E(3) x SO(3)-equivariant networks for
   spherical deconvolution in diffusion MRI. MIDL 2023.
"""

import math

import numpy as np
import torch
from torch import nn

from esdmri.nn.chebyshev import as_operator
from esdmri.nn.spatial import (NeighbourhoodSums, Workspace, check_field,
                               fp32_under_cuda_autocast)
from esdmri.threads import adapt_num_threads, note_default_num_threads

note_default_num_threads()  # torch's count before any user code can set it (esdmri.threads)

# Columns (voxels of one vertex) per slab of x-rows: the analysis of a slab
# then runs in place in one cache block (ChebyshevOperator's 2 x 256
# columns), and the slab's Chebyshev terms stay small next to the layer's
# fields.
_SLAB_COLUMNS = 512

# Elements of the neighbourhood-sum buffer processed at once (16 MiB in
# float32; 3 chunks per slab at nside 8, 16 channels, hemisphere). Each
# chunk costs about 35 small element-wise operations, and every parallel
# operation waits for its slowest thread: on a machine shared with other
# jobs that wait dominates, so chunks are large. On one thread 4 MiB and
# 16 MiB chunks took the same time (the sums are memory-bound either way);
# 16 MiB chunks cut the layer's operations from 10,500 to 4,700 for
# forward + backward and raise its peak memory from 157 to 193 MiB
# (docs/benchmarks.md, threads section).
_CHUNK_ELEMENTS = 1 << 22


def _slabs(n_rows, columns_per_row):
    """Slices of x-rows holding about ``_SLAB_COLUMNS`` columns each."""
    size = max(1, _SLAB_COLUMNS // columns_per_row)
    return [slice(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def _vertex_chunks(n_vertices, elements_per_vertex):
    size = max(1, _CHUNK_ELEMENTS // max(1, elements_per_vertex))
    return [slice(start, min(start + size, n_vertices)) for start in range(0, n_vertices, size)]


class _SphereSpatialLinear(torch.autograd.Function):
    """``y_o = sum_{i,k,r} W[o,i,k,r] S_r T_k x_i + b_o`` saving only x and W.

    Slab by slab of x-rows: per chunk of vertices the neighbourhood sums of
    the I inputs and one matmul to the O K Chebyshev terms, then the slab's
    synthesis straight into the output. Backward mirrors it (analysis of the
    output gradient per slab, sums recomputed), so no buffer outlives a slab
    beyond the output and the input gradient.
    """

    @staticmethod
    @fp32_under_cuda_autocast
    def forward(ctx, x, weight, bias, operator, sums):
        n, n_in, n_vertices, *grid = x.shape
        n_out, _, k, r = weight.shape
        ctx.save_for_backward(x, weight)
        ctx.operator, ctx.sums = operator, sums
        workspace = Workspace()
        mix = _mixing_matrix(weight)
        plane = grid[1] * grid[2]
        y = x.new_empty((n, n_out, n_vertices, *grid))
        y_columns = y.view(n * n_out, n_vertices, -1)
        for rows in _slabs(grid[0], plane):
            slab = (rows.stop - rows.start, grid[1], grid[2])
            columns = math.prod(slab)
            terms = workspace.get("terms", (n, n_out * k, n_vertices, columns), x)
            chunks = _vertex_chunks(n_vertices, n * n_in * r * columns)
            for part in chunks:
                s = _slab_sums(x[:, :, part], sums, rows.start, slab, r, workspace)
                if len(chunks) == 1:
                    torch.matmul(mix, s.view(n, n_in * r, -1), out=terms.view(n, n_out * k, -1))
                    continue
                product = workspace.get("product", (n, n_out * k, s[0, 0, 0].numel()), x)
                torch.matmul(mix, s.view(n, n_in * r, -1), out=product)
                # A contiguous product then one copy: writing the matmul
                # straight into the strided chunk is slower (measured).
                terms[:, :, part] = product.view(n, n_out * k, -1, columns)
            operator._synthesize(terms.view(n * n_out, k * n_vertices, columns),
                                 out=y_columns[:, :, rows.start * plane:rows.stop * plane],
                                 workspace=workspace)
        return y if bias is None else y.add_(bias.view(1, -1, 1, 1, 1, 1))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        operator, sums = ctx.operator, ctx.sums
        n, n_in, n_vertices, *grid = x.shape
        n_out, _, k, r = weight.shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        workspace = Workspace()
        mix = _mixing_matrix(weight)
        plane = grid[1] * grid[2]
        grad_columns = grad_y.reshape(n * n_out, n_vertices, -1)  # a view where strides allow
        # Slabs reach one kernel half-width beyond themselves: accumulate.
        grad_x = x.new_zeros(x.shape) if need_x else None
        grad_mix = x.new_zeros(mix.shape) if need_w else None
        for rows in _slabs(grid[0], plane):
            slab = (rows.stop - rows.start, grid[1], grid[2])
            columns = math.prod(slab)
            grad_terms = workspace.get("terms", (n * n_out, k * n_vertices, columns), x)
            operator._analyze(grad_columns[:, :, rows.start * plane:rows.stop * plane],
                              out=grad_terms, workspace=workspace)
            grad_terms = grad_terms.view(n, n_out * k, n_vertices, columns)
            for part in _vertex_chunks(n_vertices, n * n_in * r * columns):
                # Strided chunks of the gradient serve as matmul operands as they are.
                grad_part = grad_terms[:, :, part].flatten(2)
                if need_w:
                    s = _slab_sums(x[:, :, part], sums, rows.start, slab, r, workspace)
                    for grad_b, s_b in zip(grad_part, s.view(n, n_in * r, -1)):
                        grad_mix.addmm_(grad_b, s_b.T)
                if need_x:
                    grad_s = workspace.get("grad_sums", (n, n_in, r, part.stop - part.start,
                                                         *slab), x)
                    torch.matmul(mix.T, grad_part, out=grad_s.view(n, n_in * r, -1))
                    sums.adjoint_into(grad_s.unbind(2), grad_x[:, :, part], workspace,
                                      start=rows.start, accumulate=True)
        grad_b = grad_y.sum(dim=(0, 2, 3, 4, 5)) if need_b else None
        grad_w = None
        if need_w:
            grad_w = grad_mix.view(n_out, k, n_in, r).permute(0, 2, 1, 3)
        return grad_x, grad_w, grad_b, None, None


def _mixing_matrix(weight):
    """``W[o, i, k, r]`` as the (O K, I R) matrix from (input, sum) to (output, term)."""
    n_out, n_in, k, r = weight.shape
    return weight.permute(0, 2, 1, 3).reshape(n_out * k, n_in * r)


def _slab_sums(x, sums, start, slab, n_classes, workspace):
    """Neighbourhood sums of x-rows ``start ..`` of ``x``, shape (N, I, R, V, *slab)."""
    n, n_in, n_vertices = x.shape[:3]
    s = workspace.get("sums", (n, n_in, n_classes, n_vertices, *slab), x)
    sums.sums_into(x, s.unbind(2), workspace, start=start)
    return s


class E3SO3Conv(nn.Module):
    """Roto-translation equivariant spatio-spherical convolution (RT-ESD).

    ``y_o(p, v) = sum_{i,k,d} A[o,i,k] B[o,i,|d|] (T_k x_i)(p + d, v) + b_o``
    with a Chebyshev filter on the sphere and an isotropic 3D kernel on the
    voxel grid.

    Parameters
    ----------
    in_channels, out_channels : int
    chebyshev_basis : array_like, shape (K, V, V), or ChebyshevOperator
        ``HealpixSphere.chebyshev_basis(K)``; K is the spherical kernel size.
    spatial_kernel_size : int, optional
        Odd edge m of the 3D kernel on the voxel grid (3 or 5 in the papers).
    isotropic : bool, optional
        Share spatial weights by distance to the kernel centre (equivariant
        to grid rotations and reflections). ``False`` learns one spatial
        weight per offset, ``B[o, i, dx, dy, dz]``.
    bias : bool, optional
    padding : {"zeros", "circular"}, optional
        Grid boundary: zeros (the published ``padding="same"``) or periodic.
    layout : {"sparse", "dense"}, optional
        Storage of the Chebyshev matrices when a basis array is given.

    Attributes
    ----------
    weight_sphere : Parameter, shape (O, I, K)
        A.
    weight_spatial : Parameter, shape (O, I, R) or (O, I, m, m, m)
        B, one weight per distance class (R = 4 for m = 3) or per offset.

    Notes
    -----
    Input ``[B, in_channels, V, X, Y, Z]``, output ``[B, out_channels, V, X,
    Y, Z]`` (same grid).
    """

    def __init__(self, in_channels, out_channels, chebyshev_basis, spatial_kernel_size=3,
                 isotropic=True, bias=True, padding="zeros", layout="sparse"):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.operator = as_operator(chebyshev_basis, layout)
        self.sums = NeighbourhoodSums(spatial_kernel_size, isotropic, padding)
        k, m = self.operator.kernel_size, self.sums.spatial_kernel_size
        spatial_shape = (self.sums.n_classes,) if isotropic else (m, m, m)
        # Kaiming for the fused kernel: Var(A B) m^3 I K = 2.
        self.weight_sphere = nn.Parameter(torch.randn(self.out_channels, self.in_channels, k)
                                          * np.sqrt(2.0 / (self.in_channels * k)))
        self.weight_spatial = nn.Parameter(torch.randn(self.out_channels, self.in_channels,
                                                       *spatial_shape) * m**-1.5)
        self.bias = nn.Parameter(torch.full((self.out_channels,), 0.01)) if bias else None

    def fused_weight(self):
        """``W[o, i, k, r] = A[o, i, k] B[o, i, r]``, shape (O, I, K, R)."""
        spatial = self.weight_spatial.reshape(self.out_channels, self.in_channels, -1)
        return self.weight_sphere[..., :, None] * spatial[..., None, :]

    def forward(self, x):
        """x : Tensor [B, in_channels, V, X, Y, Z] -> [B, out_channels, V, X, Y, Z]."""
        if not torch.compiler.is_compiling():  # the threads the load leaves (esdmri.threads)
            adapt_num_threads()
        check_field(x, n_vertices=self.operator.n_vertices, n_channels=self.in_channels)
        return _SphereSpatialLinear.apply(x.contiguous(), self.fused_weight(), self.bias,
                                          self.operator, self.sums)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.operator.kernel_size}, "
                f"spatial_kernel_size={self.sums.spatial_kernel_size}, "
                f"isotropic={self.sums.isotropic}, "
                f"padding={self.sums.padding!r}, n_vertices={self.operator.n_vertices}")
