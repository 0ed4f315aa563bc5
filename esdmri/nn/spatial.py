"""Spatial (voxel-grid) parts of the spatio-spherical layers.

All layers of :mod:`esdmri.nn` take and return ``[batch, channels, vertices,
X, Y, Z]`` tensors. The spatial part of a 3D convolution with kernel size
``m = 2h + 1`` is written here as *neighbourhood sums* followed by a channel
matmul: with an isotropic kernel (one weight per distance to the centre) a
3x3x3 kernel has only 4 distinct weights, so instead of 27 taps per channel
pair the input is reduced to 4 sums over the centre, the 6 faces, the 12
edges and the 8 corners, and a single matmul mixes channels and sums.

The sums are separable: along each axis the 1D operator ``D_a x[p] = x[p + a]
+ x[p - a]`` (``D_0`` the identity) and every class is a sum of products
``D_a D_b D_c`` over the three axes, evaluated depth first so that partial
products are shared. A full (non-isotropic) kernel uses plain shifts and one
class per offset.
"""

import functools
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PADDING_MODES = ("zeros", "circular")


def check_spatial_kernel_size(size, name="spatial_kernel_size"):
    """Validate an odd, positive spatial kernel size and return it as int."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"{name} must be an odd positive int, got {size!r}")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be odd and >= 1 (1, 3, 5, ...), got {size}")
    return int(size)


def check_padding(padding):
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    return padding


def check_field(x, name="x", n_vertices=None, n_channels=None):
    """Check that ``x`` is a ``[batch, channels, vertices, X, Y, Z]`` tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 6:
        raise ValueError(f"{name} must have 6 dimensions [batch, channels, vertices, X, Y, Z], "
                         f"got shape {tuple(x.shape)}")
    if n_channels is not None and x.shape[1] != n_channels:
        raise ValueError(f"{name} must have {n_channels} channels (dim 1), "
                         f"got shape {tuple(x.shape)}")
    if n_vertices is not None and x.shape[2] != n_vertices:
        raise ValueError(f"{name} must have {n_vertices} vertices (dim 2) for this layer's "
                         f"sphere, got shape {tuple(x.shape)}")


class Workspace:
    """Reusable scratch buffers, so that chunked loops allocate (and page in)
    their temporaries once instead of once per chunk."""

    def __init__(self):
        self._buffers = {}

    def get(self, name, shape, like):
        """An uninitialised contiguous tensor of ``shape`` backed by buffer ``name``."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = like.new_empty(numel)
            self._buffers[name] = buffer
        return buffer[:numel].view(tuple(shape))


@functools.lru_cache(maxsize=4096)
def _row_runs(n_target, target_start, sources, length, circular):
    """How target rows take their values from source windows along one axis.

    Target row ``i`` is grid row ``target_start + i`` of a grid of ``length``
    rows. Each entry of ``sources`` is ``(source_start, n_source, shift)``:
    the row takes grid row ``target_start + i + shift`` (wrapped when
    ``circular``) from a window holding rows ``source_start ..
    source_start + n_source``, or nothing where that row is off the grid or
    outside the window.

    Returns
    -------
    runs : tuple of (start, rows, count)
        Maximal runs of target rows over which every source either advances
        by one row per target row or gives nothing (row -1).
    """
    per_source = []
    for source_start, n_source, shift in sources:
        rows = []
        for i in range(n_target):
            grid_row = target_start + i + shift
            if circular:
                grid_row %= length
            local = grid_row - source_start
            inside = 0 <= grid_row < length and 0 <= local < n_source
            rows.append(local if inside else -1)
        per_source.append(rows)
    runs = []
    for i, rows in enumerate(zip(*per_source)):
        if runs:
            first, count = runs[-1][1], runs[-1][2]
            if all((a < 0 and b < 0) or (a >= 0 and b == a + count) for a, b in zip(first, rows)):
                runs[-1][2] += 1
                continue
        runs.append([i, rows, 1])
    return tuple((start, rows, count) for start, rows, count in runs)


def _combine_rows(target, source, runs, dim, overwrite):
    """``target (+)= the sum of the source rows of each run`` along ``dim``.

    ``runs`` from :func:`_row_runs`, with one or two sources; with
    ``overwrite`` the sum is assigned (zero where no row contributes) and two
    contributing rows are added in one fused pass.
    """
    for start, rows, count in runs:
        pieces = [source.narrow(dim, row, count) for row in rows if row >= 0]
        out = target.narrow(dim, start, count)
        if not overwrite:
            for piece in pieces:
                out.add_(piece)
        elif not pieces:
            out.zero_()
        elif len(pieces) == 1:
            out.copy_(pieces[0])
        else:
            torch.add(pieces[0], pieces[1], out=out)


class NeighbourhoodSums:
    """Sums of a field over the distance classes (or offsets) of a 3D kernel.

    Parameters
    ----------
    spatial_kernel_size : int
        Odd spatial kernel size ``m``; ``m = 1`` gives the identity.
    isotropic : bool, optional
        Group the ``m**3`` offsets by their distance to the centre (4 classes
        for m = 3, 10 for m = 5). Otherwise one class per offset, ordered like
        the last three axes of a ``conv3d`` weight.
    padding : {"zeros", "circular"}, optional
        Values outside the grid: zero, or periodic.

    Attributes
    ----------
    n_classes : int
        Number of sums R.
    distances : ndarray, shape (R,)
        Distance of each class to the centre, in voxels.

    Notes
    -----
    ``forward(x)[:, :, r, ..., p] = sum_{d in class r} x[..., p + d]``, the
    cross-correlation that ``torch.nn.functional.conv3d`` computes.
    """

    def __init__(self, spatial_kernel_size, isotropic=True, padding="zeros"):
        self.spatial_kernel_size = check_spatial_kernel_size(spatial_kernel_size)
        self.isotropic = bool(isotropic)
        self.padding = check_padding(padding)
        half = self.spatial_kernel_size // 2
        # Per-axis operators: D_a (pair sum) for isotropic kernels, plain
        # shifts otherwise; both are indexed by their offset a.
        self._axis_offsets = tuple(range(0, half + 1) if self.isotropic else range(-half, half + 1))
        triples = list(itertools.product(self._axis_offsets, repeat=3))
        distances = np.sqrt(np.sum(np.square(triples), axis=1))
        if self.isotropic:
            self.distances, classes = np.unique(np.round(distances, 9), return_inverse=True)
        else:
            self.distances, classes = distances, np.arange(len(triples))
        self._class_of = dict(zip(triples, classes.tolist()))
        self.n_classes = len(self.distances)

    @property
    def class_index(self):
        """Class of each offset of the ``(m, m, m)`` kernel, shape (m, m, m)."""
        half = self.spatial_kernel_size // 2
        offsets = np.arange(-half, half + 1)
        grid = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1)
        if self.isotropic:
            grid = np.abs(grid)
        return np.vectorize(lambda a, b, c: self._class_of[(a, b, c)])(*np.moveaxis(grid, -1, 0))

    def _accumulate(self, acc, t, offset, dim, adjoint=False, overwrite=False, acc_start=0,
                    t_start=0):
        """``acc (+)= A_offset t`` along ``dim`` (``A^T`` when ``adjoint``;
        assigned instead of added when ``overwrite``).

        ``acc`` and ``t`` may hold different windows of the grid's rows along
        ``dim``, starting at ``acc_start`` and ``t_start``; the larger of the
        two is the whole grid.
        """
        if self.isotropic:  # D_a is symmetric: its adjoint is itself
            shifts = {offset, -offset}
        else:
            shifts = {-offset if adjoint else offset}
        length = max(acc.shape[dim], t.shape[dim])
        sources = tuple((t_start, t.shape[dim], shift) for shift in sorted(shifts))
        runs = _row_runs(acc.shape[dim], acc_start, sources, length, self.padding == "circular")
        _combine_rows(acc, t, runs, dim, overwrite)

    def _apply(self, t, offset, dim, workspace, name, rows=None):
        """``A_offset t`` along ``dim``, for the grid rows ``rows`` (a slice; all by default)."""
        rows = rows or slice(0, t.shape[dim])
        if offset == 0:
            return t.narrow(dim, rows.start, rows.stop - rows.start)
        shape = list(t.shape)
        shape[dim] = rows.stop - rows.start
        out = workspace.get(name, shape, t)
        self._accumulate(out, t, offset, dim, overwrite=True, acc_start=rows.start)
        return out

    def sums_into(self, x, outs, workspace=None, start=0):
        """Neighbourhood sums of ``x`` written into ``outs``.

        Parameters
        ----------
        x : Tensor, shape (..., X, Y, Z)
            May be a non-contiguous view.
        outs : sequence of R Tensors, each of shape (..., X', Y, Z)
            Class r's sum over the x-rows ``start .. start + X'`` is assigned
            to ``outs[r]`` (views are fine). The sums read the rows around
            that slab from ``x``, so slabs can be processed one at a time.
        start : int, optional
        """
        workspace = workspace or Workspace()
        rows = slice(start, start + outs[0].shape[-3])
        written = set()
        # Depth-first over the axes x, z, y, so partial products are computed
        # once and shared by all classes that contain them. The innermost
        # level has the most passes; shifts along y move whole rows of Z
        # contiguous values, several times faster than shifts along z
        # (measured), so z sits in the middle.
        for a in self._axis_offsets:
            xa = self._apply(x, a, -3, workspace, "sums_x", rows)
            for c in self._axis_offsets:
                xac = self._apply(xa, c, -1, workspace, "sums_xz")
                for b in self._axis_offsets:
                    r = self._class_of[(a, b, c)]
                    self._accumulate(outs[r], xac, b, -2, overwrite=r not in written)
                    written.add(r)
        return outs

    def adjoint_into(self, grads, out, workspace=None, start=0, accumulate=False):
        """Adjoint of :meth:`sums_into`: ``out (+)= sum_r S_r^T grads[r]``.

        Parameters
        ----------
        grads : sequence of R Tensors, each of shape (..., X', Y, Z)
            Gradients of the sums of the x-rows ``start .. start + X'``.
        out : Tensor, shape (..., X, Y, Z)
            Overwritten, or added to with ``accumulate`` (views are fine). A
            slab reaches the rows within the kernel's half-width of it, so
            slabs processed one at a time must accumulate.
        start : int, optional
        accumulate : bool, optional
        """
        workspace = workspace or Workspace()
        # Fan-in tree, the transpose of the fan-out tree of `sums_into`; the
        # first term of every sum is assigned rather than added. Largest
        # offsets first: an isotropic pair sum is assigned in one fused pass,
        # where adding it to an assigned centre term takes two.
        offsets = self._axis_offsets[::-1]
        slab_shape = grads[0].shape
        for a in offsets:
            ga = workspace.get("adjoint_x", slab_shape, out)
            for c in offsets:
                gac = workspace.get("adjoint_xz", slab_shape, out)
                for b in offsets:
                    self._accumulate(gac, grads[self._class_of[(a, b, c)]], b, -2, adjoint=True,
                                     overwrite=b == offsets[0])
                self._accumulate(ga, gac, c, -1, adjoint=True, overwrite=c == offsets[0])
            self._accumulate(out, ga, a, -3, adjoint=True,
                             overwrite=not accumulate and a == offsets[0], t_start=start)
        return out

    def forward(self, x):
        """Neighbourhood sums of ``x``.

        Parameters
        ----------
        x : Tensor, shape (N, C, V, X, Y, Z)

        Returns
        -------
        sums : Tensor, shape (N, C, R, V, X, Y, Z)
        """
        n, c = x.shape[:2]
        out = x.new_empty((n, c, self.n_classes) + tuple(x.shape[2:]))
        self.sums_into(x, out.unbind(2))
        return out

    def adjoint(self, grad):
        """Adjoint of :meth:`forward`: ``sum_r S_r^T grad[:, :, r]``.

        Parameters
        ----------
        grad : Tensor, shape (N, C, R, V, X, Y, Z)

        Returns
        -------
        result : Tensor, shape (N, C, V, X, Y, Z)
        """
        out = grad.new_empty(grad.shape[:2] + grad.shape[3:])
        return self.adjoint_into(grad.unbind(2), out)


# Under CUDA autocast the hand-written autograd products of esdmri.nn run in
# float32: their buffers are float32 and their backward mixes them with the
# incoming gradients.
fp32_under_cuda_autocast = torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)


class _SumsThenMix(torch.autograd.Function):
    """``y = W @ S(x)`` with the sums recomputed in backward, not stored."""

    @staticmethod
    @fp32_under_cuda_autocast
    def forward(ctx, x, weight, sums):
        n = x.shape[0]
        s = sums.forward(x).reshape(n, weight.shape[1], -1)
        ctx.save_for_backward(x, weight)
        ctx.sums = sums
        return torch.matmul(weight, s).view((n, weight.shape[0]) + tuple(x.shape[2:]))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        n, c = x.shape[:2]
        grad_y = grad_y.reshape(n, weight.shape[0], -1)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            s = ctx.sums.forward(x).reshape(n, weight.shape[1], -1)
            grad_w = sum(grad_y[i] @ s[i].T for i in range(n))
            del s
        if ctx.needs_input_grad[0]:
            grad_s = torch.matmul(weight.T, grad_y)
            grad_x = ctx.sums.adjoint(grad_s.view((n, c, -1) + tuple(x.shape[2:])))
        return grad_x, grad_w, None


class SpatialConv(nn.Module):
    """3D convolution of a spherical field with the vertices as channels.

    The baseline "spatial" convolution: a voxel's ``in_channels * V`` values
    are the input channels of an ordinary 3D convolution, which mixes all
    vertices of all channels (no spherical weight sharing, not rotation
    equivariant on the sphere).

    Parameters
    ----------
    in_channels, out_channels : int
        Channels per vertex.
    n_vertices : int
        Vertices V of the input and output (1 for purely spatial fields).
    spatial_kernel_size : int, optional
        Odd spatial kernel size.
    isotropic : bool, optional
        One weight per distance to the kernel centre (4 in 3x3x3) instead of
        one per offset.
    bias : bool, optional
    padding : {"zeros", "circular"}, optional

    Notes
    -----
    Input and output are ``[batch, channels, V, X, Y, Z]``. The weight has
    ``(out_channels V) x (in_channels V) x R`` entries, so this baseline is
    meant for coarse spheres.
    """

    def __init__(self, in_channels, out_channels, n_vertices, spatial_kernel_size=3,
                 isotropic=True,
                 bias=True, padding="zeros"):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.n_vertices = int(n_vertices)
        self.sums = NeighbourhoodSums(spatial_kernel_size, isotropic, padding)
        fan_in = self.in_channels * self.n_vertices * self.sums.spatial_kernel_size**3
        # Kaiming for the equivalent full kernel: a class of n offsets counts n times.
        self.weight = nn.Parameter(torch.randn(
            self.out_channels * self.n_vertices, self.in_channels * self.n_vertices,
            self.sums.n_classes) * np.sqrt(2.0 / fan_in))
        self.bias = nn.Parameter(torch.full((self.out_channels,), 0.01)) if bias else None

    def forward(self, x):
        """x : Tensor [B, in_channels, V, X, Y, Z] -> [B, out_channels, V, X, Y, Z]."""
        check_field(x, n_vertices=self.n_vertices, n_channels=self.in_channels)
        b, _, v, *grid = x.shape
        fields = x.reshape(b, self.in_channels * v, 1, *grid)
        y = _SumsThenMix.apply(fields, self.weight.reshape(self.weight.shape[0], -1), self.sums)
        y = y.view(b, self.out_channels, v, *grid)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1, 1, 1)
        return y

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, n_vertices={self.n_vertices}, "
                f"spatial_kernel_size={self.sums.spatial_kernel_size}, "
                f"isotropic={self.sums.isotropic}")


class NeighbourhoodConcat(nn.Module):
    """Concatenate each voxel's neighbourhood into its channels (C-ESD input).

    Parameters
    ----------
    spatial_kernel_size : int, optional
        Odd neighbourhood size m; every channel becomes ``m**3`` channels,
        one per offset, ordered like a ``conv3d`` kernel.
    padding : {"zeros", "circular"}, optional

    Notes
    -----
    ``[B, C, V, X, Y, Z] -> [B, C m^3, V, X, Y, Z]`` with output channel
    ``c m^3 + j`` holding channel c of the voxel at offset j.
    """

    def __init__(self, spatial_kernel_size=3, padding="zeros"):
        super().__init__()
        self.spatial_kernel_size = check_spatial_kernel_size(spatial_kernel_size)
        self.padding = check_padding(padding)

    @property
    def factor(self):
        """Channel multiplier ``m**3``."""
        return self.spatial_kernel_size**3

    def forward(self, x):
        # Out-of-place slices of a padded copy: plain autograd, no in-place
        # accumulation, so it also works on inputs that require gradients.
        check_field(x)
        b, c, v, *grid = x.shape
        m, r = self.spatial_kernel_size, self.spatial_kernel_size // 2
        mode = "circular" if self.padding == "circular" else "constant"
        padded = F.pad(x.reshape(b, c * v, *grid), (r,) * 6, mode=mode)
        X, Y, Z = grid
        shifted = torch.stack([padded[:, :, i:i + X, j:j + Y, k:k + Z]
                               for i in range(m) for j in range(m) for k in range(m)], dim=2)
        shifted = shifted.view(b, c, v, m**3, X, Y, Z).transpose(2, 3)
        return shifted.reshape(b, c * m**3, v, X, Y, Z)

    def extra_repr(self):
        return f"spatial_kernel_size={self.spatial_kernel_size}"
