"""From a scan to tissue coefficients: the linear prior alone, or a network over blocks.

A fit starts from one of two estimates (:meth:`esdmri.reconst.models.RTESDModel.fit`):

- :func:`prior_coefficients`: the regularised least-squares deconvolution of
  the grid signal (:func:`esdmri.reconst.network.linear_deconvolution_operator`),
  composed with the shell-to-grid interpolation into one matrix per scan. It
  is what an untrained network with a linear prior outputs (its correction
  head starts at zero), computed without building or running the network.
- :func:`network_coefficients`: a (trained or loaded) network run block by
  block, each core block with a halo as wide as the network's receptive
  radius, so a voxel's output never depends on where the blocks fall.
"""

import numpy as np
import torch

from .network import (linear_deconvolution_operator, normalize_fractions,
                      volume_fractions_from_coefficients)
from .subjects import ScanBlocks
from .tiling import inference_windows


def prior_operator(response, interpolator, vertices, sh_order_max):
    """The linear prior of a network on a scan's grid, shape (C_total, S, V).

    Parameters
    ----------
    response : TissueResponse
    interpolator : esdmri.shm.ShellInterpolator
        The scan's shell-to-grid map onto ``vertices``.
    vertices : ndarray, shape (V, 3)
    sh_order_max : int

    Returns
    -------
    operator : ndarray, shape (C_total, S, V)
        :func:`esdmri.reconst.network.linear_deconvolution_operator` of the
        normalised response at the grid's channels.
    """
    response = response.normalized()
    channel_bvals = interpolator.shell_bvals
    if interpolator.resampled:
        # Virtual shells lie between the response's rows.
        response = response.at_bvals(np.concatenate([[0.0], channel_bvals[1:]]))
        channel_bvals = response.bvals
    return linear_deconvolution_operator(response, channel_bvals, vertices, sh_order_max)


def prior_coefficients(normalized, mask, operator, interpolation, n_wm_coeffs, normalize):
    """Tissue coefficients of the linear prior, without a network.

    The same as a network built with ``prior=operator`` whose correction is
    zero (up to float32 rounding: the two linear maps are composed here in
    float64): WM coefficients as they come, isotropic tissues clipped at 0,
    then scaled to unit tissue fractions when ``normalize``.

    Parameters
    ----------
    normalized : ndarray, shape (X, Y, Z, N)
        Signal divided by the mean b0.
    mask : ndarray of bool, shape (X, Y, Z)
    operator : ndarray, shape (C_total, S, V)
        :func:`prior_operator`.
    interpolation : ndarray, shape (S, V, N)
        ``ShellInterpolator.operator``.
    n_wm_coeffs : int
    normalize : bool

    Returns
    -------
    coefficients : ndarray, float32, shape (X, Y, Z, C_total)
        Zero outside the mask.
    """
    matrix = np.einsum("csv,svn->cn", operator, interpolation)  # (C_total, N)
    inside = normalized[mask].astype(np.float64) @ matrix.T
    inside[:, n_wm_coeffs:] = np.maximum(inside[:, n_wm_coeffs:], 0)
    if normalize:
        inside = normalize_fractions(inside, n_wm_coeffs)
    coefficients = np.zeros(mask.shape + (len(matrix),), dtype=np.float32)
    coefficients[mask] = inside
    return coefficients


def network_coefficients(network, normalized, mask, gtab, interpolation, *, halo, block_size,
                         batch_size, device):
    """Tissue coefficients of a network run block by block over a scan.

    Parameters
    ----------
    network : DeconvolutionNetwork
    normalized : ndarray, shape (X, Y, Z, N)
        Signal divided by the mean b0, zero outside the mask.
    mask : ndarray of bool, shape (X, Y, Z)
    gtab : GradientTable
    interpolation : ndarray, shape (S, V, N)
        ``ShellInterpolator.operator``.
    halo : int
        The network's receptive radius
        (:func:`esdmri.reconst.tiling.receptive_radius`).
    block_size, batch_size : int
        Edge of the core blocks; blocks per network pass.
    device : torch.device

    Returns
    -------
    coefficients : ndarray, float32, shape (X, Y, Z, C_total)
        Zero outside the mask.
    """
    starts, pad_width = inference_windows(mask.shape, mask, block_size, halo)
    padded = np.pad(normalized, pad_width + [(0, 0)])
    padded_mask = np.pad(mask, pad_width)
    source = ScanBlocks(padded, padded_mask, gtab, interpolation, block_size + 2 * halo,
                        device)
    coefficients = predict_coefficients(network, source, starts, pad_width, block_size, halo,
                                        batch_size)
    coefficients[~mask] = 0
    return coefficients


@torch.no_grad()
def predict_coefficients(network, source, starts, pad_width, core, halo, batch_size):
    """Tissue coefficients of every core block, stitched into a volume.

    Parameters
    ----------
    network : DeconvolutionNetwork
    source : ScanBlocks
        Built on the padded volume (see :func:`esdmri.reconst.tiling.inference_windows`)
        with blocks of ``core + 2 * halo`` voxels.
    starts : ndarray, shape (n_blocks, 3)
        Core corners in unpadded coordinates; ``start`` is also the window's
        corner in the padded volume.
    pad_width : list of (int, int)
    core, halo, batch_size : int

    Returns
    -------
    coefficients : ndarray, float32, shape (X, Y, Z, C_total)
        For the unpadded volume.
    """
    network.eval()
    # Core blocks tile a grid of (padded size - 2 halo) voxels from the origin.
    tiled_shape = tuple(n - 2 * halo for n in source.normalized.shape[:3])
    output = None
    for first in range(0, len(starts), batch_size):
        block_starts = starts[first:first + batch_size]
        blocks = np.column_stack([np.zeros(len(block_starts), dtype=np.int64), block_starts])
        grid = source.read(blocks)["grid"]
        coefficients = network(grid)[..., halo:halo + core, halo:halo + core, halo:halo + core]
        coefficients = coefficients.permute(0, 2, 3, 4, 1).float().cpu().numpy()
        if output is None:
            output = np.zeros(tiled_shape + (coefficients.shape[-1],), dtype=np.float32)
        for (x, y, z), block in zip(block_starts, coefficients):
            output[x:x + core, y:y + core, z:z + core] = block
    volume_shape = tuple(n - after + halo for n, (_, after) in zip(tiled_shape, pad_width))
    return output[:volume_shape[0], :volume_shape[1], :volume_shape[2]]


def fractions_of(coefficients, n_wm_coeffs):
    """Tissue fractions ``(..., T)`` of coefficients ``(..., C_total)``, clipped to [0, 1]."""
    return np.clip(volume_fractions_from_coefficients(coefficients, n_wm_coeffs), 0, 1)
