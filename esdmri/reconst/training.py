"""Unsupervised training of a deconvolution network on one scan."""

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .losses import (intensity_loss, nonnegativity_loss, sparsity_loss,
                     total_variation_loss)
from .network import volume_fractions_from_coefficients
from .tiling import cut_window, training_windows

# Windows on which the trained and the starting weights are compared.
EVALUATION_WINDOWS = 64


class WindowSource:
    """Windows of a normalised scan, interpolated onto the HEALPix grid on demand.

    Only the measured signal of a window is kept on the device; its grid
    version ``[B, S, V, X, Y, Z]`` is made per batch, so a whole scan never
    needs S x V values per voxel in memory.

    Parameters
    ----------
    normalized : ndarray, shape (X, Y, Z, N)
        Signal divided by the mean b0, zero outside the mask.
    mask : ndarray of bool, shape (X, Y, Z)
    interpolation : ndarray, shape (S, V, N)
        The shell-to-grid operator of :class:`esdmri.shm.ShellInterpolator`.
    device : torch.device
    """

    def __init__(self, normalized, mask, interpolation, device):
        self.normalized = normalized
        self.mask = mask
        self.device = device
        self.interpolation = torch.as_tensor(interpolation, dtype=torch.float32, device=device)

    def batch(self, starts, size):
        """Signal ``[B, N, X, Y, Z]``, grid ``[B, S, V, X, Y, Z]`` and mask ``[B, X, Y, Z]``."""
        signal = np.stack([cut_window(self.normalized, start, size) for start in starts])
        mask = np.stack([cut_window(self.mask, start, size) for start in starts])
        signal = torch.as_tensor(signal, device=self.device).permute(0, 4, 1, 2, 3)
        grid = torch.einsum("svn,bnxyz->bsvxyz", self.interpolation, signal)
        return signal, grid, torch.as_tensor(mask, device=self.device)


def deconvolution_loss(network, forward_model, fodf_sampler, signal, grid, mask, weights):
    """All loss terms of one batch.

    Returns
    -------
    total : Tensor, scalar
    terms : dict of str -> float
    """
    return coefficient_loss(network(grid), network.n_wm_coeffs, forward_model, fodf_sampler,
                            signal, mask, weights)


def coefficient_loss(coefficients, n_wm_coeffs, forward_model, fodf_sampler, signal, mask,
                     weights):
    """All loss terms of tissue coefficients a network has predicted.

    Parameters
    ----------
    coefficients : Tensor, shape [B, C_total, X, Y, Z]
    n_wm_coeffs : int
        Leading WM SH coefficients of ``coefficients``.
    forward_model : ForwardModel
    fodf_sampler : Tensor, shape [V_dense, C_wm]
    signal : Tensor, shape [B, N, X, Y, Z]
    mask : Tensor of bool, shape [B, X, Y, Z]
    weights : LossWeights

    Returns
    -------
    total : Tensor, scalar
    terms : dict of str -> float
    """
    predicted = forward_model(coefficients)
    wm = coefficients[:, :n_wm_coeffs]
    samples = torch.einsum("vc,bcxyz->bvxyz", fodf_sampler, wm)
    terms = {"intensity": intensity_loss(predicted, signal, mask)}
    if weights.sparsity:
        terms["sparsity"] = sparsity_loss(samples, mask)
    if weights.nonnegativity:
        terms["nonnegativity"] = nonnegativity_loss(samples, mask)
    if weights.total_variation:
        terms["total_variation"] = total_variation_loss(coefficients, mask)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}


def train_network(network, forward_model, fodf_sampler, source, weights, *, epochs,
                  window_size, batch_size, lr, patience, seed, verbose, max_windows=None):
    """Adam with a plateau schedule and early stopping, over mask-tiling windows.

    Parameters
    ----------
    network : DeconvolutionNetwork
    forward_model : ForwardModel
    fodf_sampler : Tensor, shape [V_dense, C_wm]
        SH matrix of a dense sphere, for the sparsity and non-negativity terms.
    source : WindowSource
    weights : LossWeights
    epochs, window_size, batch_size : int
    lr : float
    patience : int
        Epochs without a 0.1% improvement before the learning rate is halved;
        twice that many before training stops.
    seed : int
    verbose : bool
        Show a tqdm progress bar with the loss terms.
    max_windows : int, optional
        Most windows drawn over all epochs (None: no limit); the last epoch
        stops early when they are spent, so the cost of training does not
        grow with the scan.

    Returns
    -------
    history : list of dict
        Per epoch: mean loss terms, total, learning rate.

    Notes
    -----
    Epoch losses are averages over the epoch's windows while the weights
    move, so the last epoch is not always the best one (on a real scan the
    last epoch ended above the first). The weights of the epoch with the
    lowest loss are kept, and they are compared with the starting weights on
    the same fixed windows (at most ``EVALUATION_WINDOWS``, in evaluation
    mode, as inference uses the network): the network keeps whichever is
    lower, so training never returns a network with a higher loss than it
    started with.
    """
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=patience, threshold=1e-3)
    # Its own generator, so the training windows do not depend on it.
    evaluation_rng = np.random.default_rng([seed, 1])
    evaluation_starts = training_windows(source.mask, window_size, evaluation_rng)
    evaluation_starts = evaluation_starts[evaluation_rng.permutation(len(evaluation_starts))
                                          [:EVALUATION_WINDOWS]]
    initial_state = _copy_state(network)
    initial = evaluate_loss(network, forward_model, fodf_sampler, source, weights,
                            evaluation_starts, window_size, batch_size)
    history = []
    best, stale = math.inf, 0
    best_state = initial_state
    used = 0
    network.train()
    progress = tqdm(range(epochs), desc="training", unit="epoch", disable=not verbose)
    for epoch in progress:
        starts = training_windows(source.mask, window_size, rng)
        starts = starts[rng.permutation(len(starts))]
        if max_windows is not None:
            starts = starts[:max_windows - used]
        used += len(starts)
        sums, batches = {}, 0
        for first in range(0, len(starts), batch_size):
            signal, grid, mask = source.batch(starts[first:first + batch_size], window_size)
            total, terms = deconvolution_loss(network, forward_model, fodf_sampler,
                                              signal, grid, mask, weights)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            terms["total"] = float(total.detach())
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            batches += 1
        record = {name: value / batches for name, value in sums.items()}
        record["epoch"] = epoch
        record["lr"] = optimizer.param_groups[0]["lr"]
        history.append(record)
        progress.set_postfix({name: f"{value:.3g}" for name, value in record.items()
                              if name not in ("epoch",)})
        scheduler.step(record["total"])
        if record["total"] < best * (1 - 1e-3):
            best, stale = record["total"], 0
            best_state = _copy_state(network)
        else:
            stale += 1
            if stale >= 2 * patience:
                break
        if max_windows is not None and used >= max_windows:
            break
    network.eval()
    network.load_state_dict(best_state)
    trained = evaluate_loss(network, forward_model, fodf_sampler, source, weights,
                            evaluation_starts, window_size, batch_size)
    if trained["total"] > initial["total"]:
        network.load_state_dict(initial_state)
    return history


def _copy_state(network):
    return {name: value.detach().clone() for name, value in network.state_dict().items()}


@torch.no_grad()
def evaluate_loss(network, forward_model, fodf_sampler, source, weights, starts, window_size,
                  batch_size):
    """Mean loss terms of a network in evaluation mode over given windows.

    Returns
    -------
    terms : dict of str -> float
        As :func:`deconvolution_loss`'s, with ``"total"``.
    """
    mode = network.training
    network.eval()
    sums, batches = {}, 0
    for first in range(0, len(starts), batch_size):
        signal, grid, mask = source.batch(starts[first:first + batch_size], window_size)
        total, terms = deconvolution_loss(network, forward_model, fodf_sampler, signal, grid,
                                          mask, weights)
        terms["total"] = float(total)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        batches += 1
    network.train(mode)
    return {name: value / max(batches, 1) for name, value in sums.items()}


@torch.no_grad()
def predict_coefficients(network, source, starts, pad_width, core, halo, batch_size):
    """Tissue coefficients of every core block, stitched into a volume.

    Parameters
    ----------
    network : DeconvolutionNetwork
    source : WindowSource
        Built on the padded volume (see :func:`esdmri.reconst.tiling.inference_windows`).
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
    size = core + 2 * halo
    # Core blocks tile a grid of (padded size - 2 halo) voxels from the origin.
    tiled_shape = tuple(n - 2 * halo for n in source.normalized.shape[:3])
    output = None
    for first in range(0, len(starts), batch_size):
        block_starts = starts[first:first + batch_size]
        _, grid, _ = source.batch(block_starts, size)
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
