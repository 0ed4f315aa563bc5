"""E(3) x SO(3) convolution of RT-ESD: spherical Chebyshev filter x 3D kernel.

The published layer (Elaldi et al., RT-ESD) has the separable weight
``W[o, i, k, d] = A[o, i, k] B[o, i, |d|]``: a Chebyshev filter of kernel
size K on the sphere times an isotropic 3D kernel (weights shared by distance
to the centre). Written as a linear map,

    y_o = sum_{i, k, r} W[o, i, k, r] S_r T_k x_i,

with ``T_k`` the Chebyshev polynomials (sphere), ``S_r`` the neighbourhood
sums of distance class r (grid), and ``W = A * B`` fused into one
``(O, I K R)`` matrix. All three factors commute, which lets the layer pick
the cheapest order instead of a 27-tap convolution over every vertex:

* the neighbourhood sums act on the I inputs, one channel matmul makes
  ``O K`` fields and a synthesis over the sphere sums their Chebyshev terms;
  only for ``O > 2 K I`` (a few inputs, many outputs) is it cheaper to
  analyse the I inputs into ``I K`` Chebyshev terms first and form the sums
  on those (measured on the CPU: the sums on K-fold more fields cost more
  than the sphere products they save);
* the 3D kernel costs R neighbourhood sums (separable shifted adds) and R
  columns of the channel matmul (R = 4 instead of 27 for a 3x3x3 kernel);
* the work runs in chunks of vertices, and backward recomputes the sums
  instead of storing them, so autograd keeps only the layer's input alive.
"""

import math

import numpy as np
import torch
from torch import nn

from esdmri.nn.chebyshev import as_operator
from esdmri.nn.spatial import (NeighbourhoodSums, Workspace, check_field,
                               fp32_under_cuda_autocast)

# Elements of the neighbourhood-sum buffer processed at once (4 MiB in
# float32): large enough for efficient matmuls, small next to the layer's
# activations.
_CHUNK_ELEMENTS = 1 << 20


def _vertex_chunks(n_vertices, elements_per_vertex):
    size = max(1, _CHUNK_ELEMENTS // max(1, elements_per_vertex))
    return [slice(start, min(start + size, n_vertices)) for start in range(0, n_vertices, size)]


class _SphereSpatialLinear(torch.autograd.Function):
    """``y_o = sum_{i,k,r} W[o,i,k,r] S_r T_k x_i + b_o`` saving only x and W.

    Per chunk of vertices the neighbourhood sums are formed in a scratch
    buffer and one matmul mixes channels, Chebyshev terms and sums.
    """

    @staticmethod
    def sphere_first(n_in, n_out, kernel_size):
        return n_out > 2 * kernel_size * n_in

    @staticmethod
    @fp32_under_cuda_autocast
    def forward(ctx, x, weight, bias, operator, sums):
        n, n_in, n_vertices, *grid = x.shape
        n_out, _, k, r = weight.shape
        n_voxels = math.prod(grid)
        ctx.save_for_backward(x, weight)
        ctx.operator, ctx.sums = operator, sums
        workspace = Workspace()
        sphere_first = _SphereSpatialLinear.sphere_first(n_in, n_out, k)
        if sphere_first:  # Chebyshev terms of the inputs, then sums, then mix
            terms = operator.analyze(x.reshape(n * n_in, n_vertices, n_voxels))
            fields = terms.view(n, n_in, k, n_vertices, *grid)
            mixed = x.new_empty((n, n_out, 1, n_vertices, *grid))
            mix = weight.reshape(n_out, n_in * k * r)
        else:  # sums and mix to O K fields, then one synthesis over the sphere
            fields = x.unsqueeze(2)  # [n, I, 1, V, X, Y, Z]
            mixed = x.new_empty((n, n_out, k, n_vertices, *grid))
            mix = weight.permute(0, 2, 1, 3).reshape(n_out * k, n_in * r)
        n_fields = fields.shape[1] * fields.shape[2]
        for part in _vertex_chunks(n_vertices, n * n_fields * r * n_voxels):
            n_part = part.stop - part.start
            s = workspace.get("sums", (n, n_fields, r, n_part * n_voxels), x)
            sums.sums_into(fields[:, :, :, part], _class_views(s, fields.shape[1:3], grid),
                           workspace)
            # A contiguous product then one copy: writing the matmul straight
            # into the chunk's strided columns is slower (measured).
            product = workspace.get("mixed", (n, mix.shape[0], n_part * n_voxels), x)
            torch.matmul(mix, s.view(n, n_fields * r, -1), out=product)
            product = product.view(n, n_out, -1, n_part, *grid)
            if bias is not None and sphere_first:  # the bias rides along with the copy
                torch.add(product, bias.view(1, -1, 1, 1, 1, 1, 1), out=mixed[:, :, :, part])
            else:
                mixed[:, :, :, part] = product
        if sphere_first:
            return mixed.view(n, n_out, n_vertices, *grid)
        y = operator.synthesize(mixed.view(n * n_out, k * n_vertices, n_voxels))
        y = y.view(n, n_out, n_vertices, *grid)
        return y if bias is None else y.add_(bias.view(1, -1, 1, 1, 1, 1))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        operator, sums = ctx.operator, ctx.sums
        n, n_in, n_vertices, *grid = x.shape
        n_out, _, k, r = weight.shape
        n_voxels = math.prod(grid)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        workspace = Workspace()
        grad_y = grad_y.reshape(n, n_out, n_vertices, *grid)
        sphere_first = _SphereSpatialLinear.sphere_first(n_in, n_out, k)
        if sphere_first:
            terms = operator.analyze(x.reshape(n * n_in, n_vertices, n_voxels))
            fields = terms.view(n, n_in, k, n_vertices, *grid)
            grad_mixed = grad_y.unsqueeze(2)
            grad_fields = x.new_empty(fields.shape)
            mix = weight.reshape(n_out, n_in * k * r)
        else:
            fields = x.unsqueeze(2)
            grad_mixed = operator.analyze(grad_y.reshape(n * n_out, n_vertices, n_voxels))
            grad_mixed = grad_mixed.view(n, n_out, k, n_vertices, *grid)
            grad_fields = x.new_empty(x.shape).unsqueeze(2)
            mix = weight.permute(0, 2, 1, 3).reshape(n_out * k, n_in * r)
        n_fields = fields.shape[1] * fields.shape[2]
        grad_mix = x.new_zeros(mix.shape) if need_w else None
        for part in _vertex_chunks(n_vertices, n * n_fields * r * n_voxels):
            n_part = part.stop - part.start
            # Strided columns of the gradient serve as matmul operands as they are.
            columns = slice(part.start * n_voxels, part.stop * n_voxels)
            grad_part = grad_mixed.reshape(n, mix.shape[0], -1)[:, :, columns]
            if need_w:
                s = workspace.get("sums", (n, n_fields, r, n_part * n_voxels), x)
                sums.sums_into(fields[:, :, :, part], _class_views(s, fields.shape[1:3], grid),
                               workspace)
                for grad_b, s_b in zip(grad_part, s.view(n, n_fields * r, -1)):
                    grad_mix.addmm_(grad_b, s_b.T)
            if need_x:
                grad_s = workspace.get("grad_sums", (n, n_fields, r, n_part * n_voxels), x)
                torch.matmul(mix.T, grad_part, out=grad_s.view(n, n_fields * r, -1))
                sums.adjoint_into(_class_views(grad_s, fields.shape[1:3], grid),
                                  grad_fields[:, :, :, part], workspace)
        grad_x = grad_w = grad_b = None
        if need_b:
            grad_b = grad_y.sum(dim=(0, 2, 3, 4, 5))
        if need_x:
            if sphere_first:
                grad_x = operator.synthesize(grad_fields.view(n * n_in, k * n_vertices, n_voxels))
                grad_x = grad_x.view(x.shape)
            else:
                grad_x = grad_fields[:, :, 0]
        if need_w:
            if sphere_first:
                grad_w = grad_mix.view(weight.shape)
            else:
                grad_w = grad_mix.view(n_out, k, n_in, r).permute(0, 2, 1, 3)
        return grad_x, grad_w, grad_b, None, None


def _class_views(s, field_dims, grid):
    """The R classes of a sums buffer (N, C, R, V' P) as [N, *field_dims, V', X, Y, Z] views."""
    n = s.shape[0]
    return [s[:, :, r].view(n, *field_dims, -1, *grid) for r in range(s.shape[2])]


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
    kernel_size : int, optional
        Odd spatial kernel size (3 or 5 in the papers).
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

    def __init__(self, in_channels, out_channels, chebyshev_basis, kernel_size=3, isotropic=True,
                 bias=True, padding="zeros", layout="sparse"):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.operator = as_operator(chebyshev_basis, layout)
        self.sums = NeighbourhoodSums(kernel_size, isotropic, padding)
        k, m = self.operator.kernel_size, self.sums.kernel_size
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
        check_field(x, n_vertices=self.operator.n_vertices, n_channels=self.in_channels)
        return _SphereSpatialLinear.apply(x.contiguous(), self.fused_weight(), self.bias,
                                          self.operator, self.sums)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, "
                f"kernel_size_sphere={self.operator.kernel_size}, "
                f"kernel_size={self.sums.kernel_size}, isotropic={self.sums.isotropic}, "
                f"padding={self.sums.padding!r}, n_vertices={self.operator.n_vertices}")
