"""Pooling and unpooling of ``[batch, channels, vertices, X, Y, Z]`` fields.

* spherical: HEALPix NESTED ordering puts the 4 children of a pixel at
  ``nside / 2`` in consecutive rows, so pooling to the coarser sphere is a
  reshape ``V -> (V / 4, 4)`` and a mean or max (also on the hemispherical
  grids of :mod:`esdmri.sphere`, whose kept set is closed under the pyramid);
* spatial: 2 x 2 x 2 voxel blocks;
* both: spherical then spatial (``"mixed"`` before esdmri 0.2).

Unpooling is nearest-neighbour (average mode), or in max mode puts each value
back where the max came from and zeros elsewhere, like ``MaxUnpool`` but at
*every* position that attained the max: after a ReLU whole blocks tie at zero,
and picking one of them (the first in memory order, as ``MaxUnpool`` does)
would break the symmetries of the grid and the sphere.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from esdmri.deprecation import ArgsDeprecationWarning
from esdmri.nn.spatial import check_field

POOLING_KINDS = ("spherical", "spatial", "both")
POOLING_MODES = ("average", "max")


def _check_options(kind, mode):
    """The pooling kind (``"mixed"`` read as ``"both"``, with a warning), checked."""
    if kind == "mixed":
        warnings.warn("kind='mixed' is deprecated since esdmri 0.2: use kind='both'",
                      ArgsDeprecationWarning, stacklevel=4)
        kind = "both"
    if kind not in POOLING_KINDS:
        raise ValueError(f"kind must be one of {POOLING_KINDS}, got {kind!r}")
    if mode not in POOLING_MODES:
        raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")
    return kind


def _pools_sphere(kind):
    return kind in ("spherical", "both")


def _pools_grid(kind):
    return kind in ("spatial", "both")


def _spherical_pool(x, mode):
    b, c, v, *grid = x.shape
    if v % 4:
        raise ValueError(f"spherical pooling needs a vertex count divisible by 4 (the children "
                         f"of each coarser pixel), got x with {v} vertices")
    groups = x.reshape(b, c, v // 4, 4, *grid)
    if mode == "average":
        return groups.mean(dim=3), None
    pooled = groups.amax(dim=3)
    return pooled, (groups == pooled.unsqueeze(3)).view(x.shape)


def _spherical_unpool(x, mode, is_max):
    up = x.repeat_interleave(4, dim=2)
    return up if mode == "average" else torch.where(is_max, up, 0.0)


def _spatial_pool(x, mode):
    b, c, v, *grid = x.shape
    if any(size % 2 for size in grid):
        raise ValueError(f"spatial pooling needs even grid sizes (2x2x2 blocks), got x with "
                         f"grid {tuple(grid)}")
    fields = x.reshape(b, c * v, *grid)
    if mode == "average":
        return F.avg_pool3d(fields, 2).view(b, c, v, *(s // 2 for s in grid)), None
    pooled = F.max_pool3d(fields, 2)
    is_max = fields == F.interpolate(pooled, scale_factor=2, mode="nearest")
    return pooled.view(b, c, v, *pooled.shape[2:]), is_max.view(x.shape)


def _spatial_unpool(x, mode, is_max):
    b, c, v, *grid = x.shape
    fine = [2 * s for s in grid]
    up = F.interpolate(x.reshape(b, c * v, *grid), scale_factor=2, mode="nearest")
    up = up.view(b, c, v, *fine)
    return up if mode == "average" else torch.where(is_max, up, 0.0)


class Pool(nn.Module):
    """Spherical, spatial or both poolings.

    Parameters
    ----------
    kind : {"spherical", "spatial", "both"}
        Halve nside (V -> V / 4), halve the grid (X -> X / 2 per axis), or both.
    mode : {"average", "max"}

    Notes
    -----
    ``forward(x)`` maps ``[B, C, V, X, Y, Z]`` to the pooled field and
    returns ``(pooled, indices)``; ``indices`` (None in average mode; boolean
    masks of the maxima of the spatial and spherical steps in max mode) is
    what the matching :class:`Unpool` needs.
    """

    def __init__(self, kind="both", mode="average"):
        super().__init__()
        self.kind, self.mode = _check_options(kind, mode), mode

    def forward(self, x):
        check_field(x)
        grid_indices = sphere_indices = None
        if _pools_grid(self.kind):
            x, grid_indices = _spatial_pool(x, self.mode)
        if _pools_sphere(self.kind):
            x, sphere_indices = _spherical_pool(x, self.mode)
        indices = None if self.mode == "average" else (grid_indices, sphere_indices)
        return x, indices

    def extra_repr(self):
        return f"kind={self.kind!r}, mode={self.mode!r}"


class Unpool(nn.Module):
    """Inverse of :class:`Pool` of the same kind and mode.

    Parameters
    ----------
    kind : {"spherical", "spatial", "both"}
    mode : {"average", "max"}

    Notes
    -----
    ``forward(x, indices)`` maps ``[B, C, V, X, Y, Z]`` to ``[B, C, 4 V, 2 X,
    2 Y, 2 Z]`` (both); ``indices`` is the second output of the pooling
    (required in max mode).
    """

    def __init__(self, kind="both", mode="average"):
        super().__init__()
        self.kind, self.mode = _check_options(kind, mode), mode

    def forward(self, x, indices=None):
        check_field(x)
        if self.mode == "max" and indices is None:
            raise ValueError("indices from Pool(mode='max') are required to unpool in max mode")
        grid_indices, sphere_indices = indices if self.mode == "max" else (None, None)
        if _pools_sphere(self.kind):
            x = _spherical_unpool(x, self.mode, sphere_indices)
        if _pools_grid(self.kind):
            x = _spatial_unpool(x, self.mode, grid_indices)
        return x

    def extra_repr(self):
        return f"kind={self.kind!r}, mode={self.mode!r}"
