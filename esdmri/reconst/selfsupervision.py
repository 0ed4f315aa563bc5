"""Masked (J-invariant) self-supervision: hide voxels, fit only their signal.

Trained on the loss of every voxel's own signal, a network that sees the
voxel can learn to reproduce that signal's noise: on the dev phantoms,
RT-ESD's training made the fODFs worse at SNR 10 and 20 (issue 15). Hiding a
voxel's own measurement from the network (Noise2Self, Batson and Royer 2019;
Noise2Void, Krull et al. 2019) and asking it to predict that measurement
from the neighbours leaves the noise unpredictable, so what the network
learns is the part of the signal shared with the neighbourhood: it denoises.
At inference the network gets the full input.

The trainer (:class:`esdmri.reconst.training.Trainer`) applies
:func:`hide_in_batch` to every batch of a block source when
``mask_fraction`` is set, in training and in the comparison of the trained
with the starting weights, for one scan and for a cohort alike.
"""

import torch

from .config import check_mask_fraction


def hide_voxels(grid, mask, fraction, generator=None):
    """Replace a random subset of voxels by the mean of their face neighbours.

    The hidden voxels of a window are drawn among the voxels of one colour of
    the 3D checkerboard (``x + y + z`` of one parity, chosen at random per
    window), so no two hidden voxels are face neighbours: a hidden voxel's
    replacement is made of measured signals only, and none of them carries
    its own noise (the loss on it is J-invariant).

    Parameters
    ----------
    grid : Tensor, shape [B, S, V, X, Y, Z]
        Grid signal of a batch of windows.
    mask : Tensor of bool, shape [B, X, Y, Z]
    fraction : float
        Expected share of masked voxels hidden, in (0, 0.5] (0.5: a whole
        checkerboard colour).
    generator : torch.Generator, optional
        Source of the random draws (on the device of ``grid``).

    Returns
    -------
    grid : Tensor, shape [B, S, V, X, Y, Z]
        A copy in which every hidden voxel holds the mean of its masked face
        neighbours inside the window.
    hidden : Tensor of bool, shape [B, X, Y, Z]
        The hidden voxels: masked voxels with at least one masked face
        neighbour. The training loss is taken over them only.
    """
    check_mask_fraction(fraction)
    batch, *_, x, y, z = grid.shape
    device = grid.device
    inside = mask.to(grid.dtype)
    total = torch.zeros_like(grid)
    count = torch.zeros_like(inside)
    for axis in (1, 2, 3):
        length = mask.shape[axis] - 1
        for source, target in ((1, 0), (0, 1)):
            # Neighbour at +1 (source 1 -> target 0) and at -1 along the axis.
            total.narrow(axis + 2, target, length).add_(
                (grid * inside[:, None, None]).narrow(axis + 2, source, length))
            count.narrow(axis, target, length).add_(inside.narrow(axis, source, length))
    coordinates = torch.meshgrid(*(torch.arange(n, device=device) for n in (x, y, z)),
                                 indexing="ij")
    parity = sum(coordinates) % 2
    colour = torch.randint(0, 2, (batch, 1, 1, 1), device=device, generator=generator)
    draw = torch.rand(mask.shape, device=device, generator=generator) < 2 * fraction
    hidden = mask & (count > 0) & (parity == colour) & draw
    mean = total / count.clamp_min(1)[:, None, None]
    return torch.where(hidden[:, None, None], mean, grid), hidden


def hide_in_batch(batch, fraction, generator=None):
    """A block source's batch with voxels hidden, and its mask reduced to them.

    Parameters
    ----------
    batch : dict
        As a block source's ``read`` returns it (:mod:`esdmri.reconst.subjects`):
        ``grid`` [B, S, V, X, Y, Z], ``mask`` [B, X, Y, Z] and ``groups``.
    fraction : float
        As :func:`hide_voxels`.
    generator : torch.Generator, optional

    Returns
    -------
    batch : dict
        A new batch: ``grid`` with the hidden voxels replaced
        (:func:`hide_voxels`), ``mask`` the hidden voxels only, so the loss
        fits their measured signals (``groups`` unchanged) and nothing else.
    """
    grid, hidden = hide_voxels(batch["grid"], batch["mask"], fraction, generator)
    return {**batch, "grid": grid, "mask": hidden}
