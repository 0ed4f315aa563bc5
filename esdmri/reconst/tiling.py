"""Whole-volume blocks for training and seamless block-wise inference.

The published RT-ESD code trains on a patch around every masked voxel, so each
voxel is computed about patch**3 times per epoch. Here training windows are
centred on masked voxels and cover every masked voxel once per epoch (in a
random order), and inference windows add a halo as wide as the network's receptive radius
around each core block, so a voxel's prediction never depends on where the
block borders fall.
"""

import numpy as np
import torch


def receptive_radius(network, in_channels, n_vertices, limit=16, device="cpu"):
    """Spatial receptive radius of a network, in voxels, found by autograd.

    The gradient of the centre voxel's output with respect to a random input
    is non-zero exactly where the output depends on the input; eight random
    inputs make a path blocked by an inactive ReLU everywhere improbable.
    Probes grow from a radius of 2 so small networks are probed cheaply.

    Parameters
    ----------
    network : torch.nn.Module
        Maps ``[B, in_channels, V, X, Y, Z]`` to ``[B, C, V', X, Y, Z]``.
    in_channels, n_vertices : int
    limit : int, optional
        Largest radius probed; a network reaching further raises ValueError.

    Returns
    -------
    radius : int
    """
    probe_radius = min(2, limit)
    while True:
        radius = _probe(network, in_channels, n_vertices, probe_radius, device)
        if radius < probe_radius:
            return radius
        if probe_radius >= limit:
            raise ValueError(f"the network's receptive radius reaches the probe limit {limit}: "
                             "reduce depth or spatial kernel size")
        probe_radius = min(2 * probe_radius, limit)


def _probe(network, in_channels, n_vertices, probe_radius, device):
    """Largest offset from the centre that the centre output depends on."""
    size = 2 * probe_radius + 1
    was_training = network.training
    network.eval()
    probe = torch.randn(8, in_channels, n_vertices, size, size, size, device=device,
                       dtype=next(network.parameters()).dtype, requires_grad=True)
    try:
        output = network(probe)
        output[..., probe_radius, probe_radius, probe_radius].sum().backward()
    finally:
        network.train(was_training)
    reached = probe.grad.abs().sum(dim=(0, 1, 2)) > 0  # (X, Y, Z)
    offsets = torch.nonzero(reached) - probe_radius
    return int(offsets.abs().max()) if offsets.numel() else 0


def inference_windows(spatial_shape, mask, core, halo):
    """Core blocks that hold masked voxels, with the padding to cut windows.

    Parameters
    ----------
    spatial_shape : tuple of 3 int
    mask : ndarray of bool, shape (X, Y, Z)
    core : int
        Edge of the core block whose voxels a window predicts.
    halo : int
        Context added on each side (the receptive radius).

    Returns
    -------
    starts : ndarray, shape (n_blocks, 3)
        Core block corners in volume coordinates; the window of a block is
        ``padded[s : s + core + 2 halo]`` of the padded volume.
    pad_width : list of (int, int)
        Zero padding of each spatial axis (before, after) that makes every
        window lie inside the padded volume.
    """
    counts = [int(np.ceil(n / core)) for n in spatial_shape]
    pad_width = [(halo, count * core - n + halo) for n, count in zip(spatial_shape, counts)]
    grid = np.stack(np.meshgrid(*[np.arange(c) * core for c in counts], indexing="ij"), -1)
    starts = grid.reshape(-1, 3)
    occupied = [mask[x:x + core, y:y + core, z:z + core].any() for x, y, z in starts]
    return starts[np.asarray(occupied, dtype=bool)], pad_width


def training_windows(mask, size, rng):
    """Windows of edge ``size`` centred on masked voxels, covering every one once per epoch.

    Masked voxels are visited in a random order; a voxel that no window
    chosen so far covers becomes the centre of a new window, which then
    covers its inner part (the window without a margin of ``size // 4``
    voxels on each side, where the network's view is cut short by the
    window's edge). Every masked voxel thus lies inside some window's inner
    part, and every window is centred on a masked voxel, so no window is
    mostly padding (the former tiling of the mask's bounding box at a random
    offset left 42 % of the windows of a 20^3 mask less than a quarter full).

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
    size : int
    rng : numpy.random.Generator

    Returns
    -------
    starts : ndarray, shape (n_windows, 3)
        Window corners (in a random order); windows may extend past the
        volume (zero padded by :func:`cut_window`).
    """
    mask = np.asarray(mask, dtype=bool)
    margin = size // 4
    inner = size - 2 * margin
    covered = ~mask
    starts = []
    for flat in rng.permutation(np.flatnonzero(mask)):
        centre = np.unravel_index(flat, mask.shape)
        if covered[centre]:
            continue
        start = np.array(centre) - size // 2
        low = np.maximum(start + margin, 0)
        covered[low[0]:start[0] + margin + inner, low[1]:start[1] + margin + inner,
                low[2]:start[2] + margin + inner] = True
        starts.append(start)
    return np.array(starts, dtype=np.int64).reshape(-1, 3)


def window_fill(mask, starts, size):
    """Share of each window's voxels that are masked (how little of it is padding).

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
    starts : ndarray, shape (n_windows, 3)
    size : int

    Returns
    -------
    fill : ndarray, shape (n_windows,)
    """
    return np.array([cut_window(mask, start, size).mean() for start in starts])


def cut_window(volume, start, size):
    """A cubic window of a volume, zero outside it.

    Parameters
    ----------
    volume : ndarray, shape (X, Y, Z, ...)
    start : array_like of 3 int
        Corner; may be negative or past the end.
    size : int

    Returns
    -------
    window : ndarray, shape (size, size, size, ...)
    """
    window = np.zeros((size, size, size) + volume.shape[3:], dtype=volume.dtype)
    source = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, volume.shape[:3]))
    target = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(source, start))
    window[target] = volume[source]
    return window
