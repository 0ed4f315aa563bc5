"""U-Net of spatio-spherical convolutions (ESD, RT-ESD and baselines).

As in ESD [1]_ and RT-ESD [2]_: encoder levels halve nside (and the grid, for kinds that
pool it), channels double from ``filter_start``; every convolution is
followed by batch norm and ReLU; skip connections concatenate encoder
features; a head convolution gives ``out_channels`` fields per vertex and a
Softplus keeps them non-negative.

The convolution kind is chosen by name from :data:`CONV_KINDS`:

========== ===================================== ==========
name       convolution                           pooling
========== ===================================== ==========
spherical  Chebyshev, voxel by voxel (ESD)       spherical
mixed      Chebyshev x isotropic 3D (RT-ESD)     mixed
spatial    3D conv, vertices as channels         spatial
concat     neighbourhood concatenated into the   spherical
           input channels; spherical (C-ESD)
pq         ``esdmri.nn.pq.PQSphereConv``         both
           (registered when that module imports)
========== ===================================== ==========

References
----------
.. [1] Elaldi A, Dey N, Kim H, Gerig G. Equivariant spherical deconvolution:
   learning sparse orientation distribution functions from spherical data.
   IPMI 2021.
.. [2] Elaldi A, Gerig G, Dey N. E(3) x SO(3)-equivariant networks for
   spherical deconvolution in diffusion MRI. MIDL 2023.
"""

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esdmri.deprecation import ArgsDeprecationWarning
from esdmri.nn.chebyshev import ChebyshevOperator, LAYOUTS, SphericalConv
from esdmri.nn.e3so3 import E3SO3Conv
from esdmri.nn.pooling import POOLING_MODES, Pool, Unpool
from esdmri.nn.spatial import (NeighbourhoodConcat, SpatialConv, check_field, check_padding,
                               check_spatial_kernel_size)


@dataclass(frozen=True)
class ConvOptions:
    """Settings shared by every convolution of a U-Net."""

    spatial_kernel_size: int = 3
    isotropic: bool = True
    padding: str = "zeros"


@dataclass(frozen=True)
class ConvKind:
    """How a U-Net builds and pools one kind of convolution.

    Attributes
    ----------
    build : callable
        ``build(in_channels, out_channels, sphere, operator, options, bias)``
        -> module mapping ``[B, in, V, X, Y, Z]`` to ``[B, out, V, X, Y, Z]``;
        ``operator`` is the level's shared :class:`ChebyshevOperator` (None
        when ``uses_chebyshev`` is False) and ``options`` a :class:`ConvOptions`.
    pooling : {"spherical", "spatial", "both"}
    uses_chebyshev : bool
    concat_input : bool
        Concatenate each voxel's neighbourhood into the input channels.
    """

    build: Callable
    pooling: str
    uses_chebyshev: bool = True
    concat_input: bool = False


def _build_spherical(in_channels, out_channels, sphere, operator, options, bias):
    return SphericalConv(in_channels, out_channels, operator, bias=bias)


def _build_e3so3(in_channels, out_channels, sphere, operator, options, bias):
    return E3SO3Conv(in_channels, out_channels, operator,
                     spatial_kernel_size=options.spatial_kernel_size,
                     isotropic=options.isotropic, bias=bias, padding=options.padding)


def _build_spatial(in_channels, out_channels, sphere, operator, options, bias):
    return SpatialConv(in_channels, out_channels, sphere.n_vertices,
                       spatial_kernel_size=options.spatial_kernel_size, isotropic=options.isotropic,
                       bias=bias, padding=options.padding)


def _build_pq(in_channels, out_channels, sphere, operator, options, bias):
    from esdmri.nn.pq import PQSphereConv
    return PQSphereConv(in_channels, out_channels, sphere.vertices,
                        spatial_kernel_size=options.spatial_kernel_size,
                        antipodal=sphere.hemisphere, bias=bias)


CONV_KINDS = {
    "spherical": ConvKind(_build_spherical, "spherical"),
    "e3so3": ConvKind(_build_e3so3, "both"),
    "spatial": ConvKind(_build_spatial, "spatial", uses_chebyshev=False),
    "concat": ConvKind(_build_spherical, "spherical", concat_input=True),
}


def register_conv_kind(name, kind):
    """Make a :class:`ConvKind` available to :class:`UNet` under ``name``."""
    if not isinstance(kind, ConvKind):
        raise TypeError(f"kind must be a ConvKind, got {type(kind).__name__}")
    CONV_KINDS[name] = kind


def canonical_conv_name(name):
    """``name``, or ``"e3so3"`` for its former name ``"mixed"`` (with a warning)."""
    if name == "mixed":
        warnings.warn("conv='mixed' is deprecated since esdmri 0.2: use conv='e3so3' "
                      "(E(3) x SO(3) convolutions at every level)", ArgsDeprecationWarning,
                      stacklevel=4)
        return "e3so3"
    return name


def get_conv_kind(name):
    """The registered :class:`ConvKind` called ``name``.

    ``"pq"`` is registered on first use if ``esdmri.nn.pq`` imports;
    ``"mixed"``, the former name of ``"e3so3"``, still works with an
    :class:`~esdmri.deprecation.ArgsDeprecationWarning`.
    """
    name = canonical_conv_name(name)
    if name == "pq" and name not in CONV_KINDS:
        try:
            import esdmri.nn.pq  # noqa: F401
        except ImportError as error:
            raise ValueError(f"conv='pq' needs esdmri.nn.pq, which failed to import: "
                             f"{error}") from error
        register_conv_kind("pq", ConvKind(_build_pq, "both", uses_chebyshev=False))
    if name not in CONV_KINDS:
        raise ValueError(f"conv must be one of {sorted(set(CONV_KINDS) | {'pq'})}, got {name!r}")
    return CONV_KINDS[name]


NORMS = ("batch", "voxel")


class VoxelNorm(nn.Module):
    """Normalise each voxel's features over its channels and vertices, then scale per channel.

    A layer norm per voxel: unlike batch norm it computes the same in
    training and evaluation and does not depend on the other windows of a
    batch or on how much of a window is padding; unlike group norm over a
    window it keeps every voxel's output local (block-wise inference stays
    exact). The statistics are means over all vertices, invariant to
    rotations of the sphere, and the per-channel scale and shift are
    constants, so the block keeps the convolutions' equivariances.

    Parameters
    ----------
    channels : int
    eps : float
    """

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        """x : Tensor [B, C, V, ...] -> same shape."""
        # The statistics as products with a row of 1 / (C V): on a CPU, torch's
        # var_mean over two leading axes of [B, C, V, X, Y, Z] ran at a tenth of
        # the memory's pace (39 % of the pretrained correction's time, 2x this).
        batch, n_stats = x.shape[0], x.shape[1] * x.shape[2]
        flat = x.reshape(batch, n_stats, -1)
        average = torch.full((1, 1, n_stats), 1.0 / n_stats, dtype=x.dtype, device=x.device)
        mean = torch.matmul(average, flat)
        centered = flat - mean
        variance = torch.matmul(average, centered * centered)
        statistics = (batch, 1, 1) + x.shape[3:]
        mean, variance = mean.view(statistics), variance.view(statistics)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return ((x - mean) * torch.rsqrt(variance + self.eps) * self.weight.view(shape)
                + self.bias.view(shape))


class ConvBlock(nn.Module):
    """Convolutions, each followed by a normalisation and ReLU.

    Parameters
    ----------
    channels : sequence of int
        ``[in, c_1, ..., c_n]``: n convolutions.
    make_conv : callable
        ``make_conv(in_channels, out_channels)`` -> convolution without bias
        (the normalisation's shift replaces it).
    norm : {"batch", "voxel"}
        Batch norm (as published) or :class:`VoxelNorm`.

    Notes
    -----
    Batch norm statistics are per channel over batch, vertices and voxels,
    so the block keeps the convolutions' equivariances. In training they
    include a window's padding voxels and the other windows of the batch,
    in evaluation they are running averages: the two modes compute
    different functions (issue 25); ``norm="voxel"`` computes one.
    """

    def __init__(self, channels, make_conv, norm="batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        pairs = list(zip(channels[:-1], channels[1:]))
        self.convs = nn.ModuleList(make_conv(c_in, c_out) for c_in, c_out in pairs)
        self.norm = norm
        self.norms = nn.ModuleList(nn.BatchNorm1d(c_out) if norm == "batch" else VoxelNorm(c_out)
                                   for _, c_out in pairs)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            y = conv(x)
            if self.norm == "voxel":
                x = F.relu(norm(y), inplace=True)
                continue
            b, c, *rest = y.shape
            x = F.relu(norm(y.reshape(b, c, -1)), inplace=True).view(b, c, *rest)
        return x


class UNet(nn.Module):
    """Spatio-spherical U-Net for ESD / RT-ESD deconvolution.

    Parameters
    ----------
    in_channels : int
        Input fields per vertex (one per shell, b0 included).
    out_channels : int
        Output fields per vertex (one per tissue).
    sphere : esdmri.sphere.HealpixSphere
        Finest grid; full or hemispherical.
    depth : int, optional
        Number of levels (``depth - 1`` poolings).
    filter_start : int, optional
        Channels at the finest level, doubled at each coarser level.
    conv : str, optional
        Convolution kind, a key of :data:`CONV_KINDS` or ``"pq"``.
    kernel_size : int, optional
        Chebyshev kernel size K (number of polynomials of the spherical filters).
    spatial_kernel_size : int, optional
        Odd 3D kernel size (e3so3, spatial, pq), or the neighbourhood size
        concatenated into the input (concat).
    convs_per_block : int, optional
        Convolutions at each level's width; bottleneck and decoder blocks add
        one convolution that switches to the next level's width.
    pooling_mode : {"average", "max"}, optional
    isotropic : bool, optional
        Isotropic 3D kernels (e3so3, spatial).
    padding : {"zeros", "circular"}, optional
        Grid boundary of the 3D kernels.
    layout : {"sparse", "dense"}, optional
        Chebyshev products by sparse recursions (CPU) or dense stacked
        matrices (GPU); see :class:`ChebyshevOperator`.
    non_negative : bool, optional
        Softplus on the head, as published; False gives a signed output, e.g.
        for a correction added to another estimate.
    norm : {"batch", "voxel"}, optional
        Normalisation after each convolution (:class:`ConvBlock`).

    Notes
    -----
    Input ``[B, in_channels, V, X, Y, Z]``, output ``[B, out_channels, V, X,
    Y, Z]`` (>= 0 when ``non_negative``). Kinds that pool the grid need X, Y, Z divisible by
    ``2**(depth - 1)``; kinds that pool the sphere need ``sphere.nside >=
    2**(depth - 1)``.
    """

    def __init__(self, in_channels, out_channels, sphere, depth=4, filter_start=8, conv="e3so3",
                 kernel_size=3, spatial_kernel_size=3, convs_per_block=2,
                 pooling_mode="average", isotropic=True, padding="zeros", layout="sparse",
                 non_negative=True, norm="batch"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("depth", depth), ("filter_start", filter_start),
                            ("kernel_size", kernel_size),
                            ("convs_per_block", convs_per_block)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if pooling_mode not in POOLING_MODES:
            raise ValueError(f"pooling_mode must be one of {POOLING_MODES}, got {pooling_mode!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        conv = canonical_conv_name(conv)
        self.kind = get_conv_kind(conv)
        self.conv_name = conv
        self.depth = int(depth)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.n_vertices = sphere.n_vertices
        options = ConvOptions(check_spatial_kernel_size(spatial_kernel_size),
                              bool(isotropic), check_padding(padding))
        pools_sphere = self.kind.pooling in ("spherical", "both")
        self.grid_multiple = 2 ** (self.depth - 1) if self.kind.pooling != "spherical" else 1
        spheres = sphere.pyramid(self.depth) if pools_sphere else [sphere] * self.depth
        operators = [ChebyshevOperator(level.chebyshev_basis(kernel_size), layout)
                     if self.kind.uses_chebyshev else None for level in spheres]

        def maker(level, bias=False):
            return lambda c_in, c_out: self.kind.build(c_in, c_out, spheres[level],
                                                       operators[level], options, bias)

        self.concat = (NeighbourhoodConcat(options.spatial_kernel_size, options.padding)
                       if self.kind.concat_input else None)
        first = self.in_channels * (self.concat.factor if self.concat is not None else 1)
        widths = [filter_start * 2**level for level in range(self.depth)]
        n = int(convs_per_block)
        self.encoder = nn.ModuleList(
            ConvBlock([first if level == 0 else widths[level - 1]] + [widths[level]] * n,
                      maker(level), norm) for level in range(self.depth - 1))
        bottom = self.depth - 1
        bottleneck_in = first if bottom == 0 else widths[bottom - 1]
        self.bottleneck = ConvBlock(
            [bottleneck_in] + [widths[bottom]] * n + widths[bottom - 1:bottom],
            maker(bottom), norm)
        self.decoder = nn.ModuleList(
            ConvBlock([2 * widths[level]] + [widths[level]] * n + [widths[max(level - 1, 0)]],
                      maker(level), norm) for level in reversed(range(self.depth - 1)))
        self.pool = Pool(self.kind.pooling, pooling_mode)
        self.unpool = Unpool(self.kind.pooling, pooling_mode)
        self.head = maker(0, bias=True)(widths[0], self.out_channels)
        self.non_negative = bool(non_negative)

    def forward(self, x):
        """x : Tensor [B, in_channels, V, X, Y, Z] -> [B, out_channels, V, X, Y, Z]."""
        check_field(x, n_vertices=self.n_vertices, n_channels=self.in_channels)
        if any(size % self.grid_multiple for size in x.shape[3:]):
            raise ValueError(
                f"x must have grid sizes divisible by {self.grid_multiple} for depth={self.depth} "
                f"with conv={self.conv_name!r} ({self.depth - 1} halvings), got grid "
                f"{tuple(x.shape[3:])}")
        if self.concat is not None:
            x = self.concat(x)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x, indices = self.pool(x)
            skips.append(indices)
        x = self.bottleneck(x)
        for block in self.decoder:
            indices, skip = skips.pop(), skips.pop()
            x = block(torch.cat([self.unpool(x, indices), skip], dim=1))
        x = self.head(x)
        return F.softplus(x) if self.non_negative else x
