"""Voxel-wise refinement of network fODFs on the unsupervised loss.

A network trained for a few thousand steps is an amortised, approximate
minimiser of the deconvolution loss (Elaldi et al., IPMI 2021): measured on the phantoms, the
per-voxel minimum of the same loss resolves crossings that neither the
network nor CSD does (docs/benchmarks.md). The refinement starts from the
network's coefficients and descends that loss voxel by voxel, on the measured
signal (not the grid interpolation).

The optimiser is Adam with its second moment shared by the ``2l + 1``
coefficients of each SH degree (and per isotropic tissue). A rotation acts
orthogonally within each degree, so the squared gradient norm of a degree is
rotation invariant and every update commutes with rotations: unlike plain
Adam, whose per-coefficient scaling does not, the refinement keeps the
model's equivariance (up to the sampling of the sparsity terms on the HEALPix
grid).
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from ..shm import sh_degrees
from .losses import CAUCHY_SIGMA
from .network import NORMALIZATION_FLOOR, volume_fractions_from_coefficients

# Adam's moment decay rates and the floor of its denominator.
_BETAS = (0.9, 0.999)
_EPSILON = 1e-8


def degree_groups(sh_order_max, n_isotropic):
    """Group of each coefficient: one per WM SH degree, one per isotropic tissue.

    Returns
    -------
    groups : ndarray of int, shape (C_wm + n_isotropic,)
    """
    degrees = sh_degrees(sh_order_max) // 2
    return np.concatenate([degrees, degrees.max() + 1 + np.arange(n_isotropic)])


class DegreeAdam:
    """Adam whose second moment is averaged within coefficient groups.

    Parameters
    ----------
    parameter : Tensor, shape (n, C)
        One row per voxel; updated in place by :meth:`step`.
    groups : ndarray of int, shape (C,)
        Group of each column (:func:`degree_groups`).
    lr : float
    """

    def __init__(self, parameter, groups, lr):
        self.parameter = parameter
        self.lr = lr
        self.groups = torch.as_tensor(groups, device=parameter.device)
        self.counts = torch.bincount(self.groups).to(parameter.dtype)
        self.first = torch.zeros_like(parameter)
        self.second = parameter.new_zeros((parameter.shape[0], len(self.counts)))
        self.steps = 0

    @torch.no_grad()
    def step(self, grad):
        """One update from ``grad``, shape (n, C)."""
        beta1, beta2 = _BETAS
        self.steps += 1
        self.first.mul_(beta1).add_(grad, alpha=1 - beta1)
        group_square = self.second.new_zeros(self.second.shape).index_add_(
            1, self.groups, grad * grad) / self.counts
        self.second.mul_(beta2).add_(group_square, alpha=1 - beta2)
        first = self.first / (1 - beta1**self.steps)
        second = (self.second / (1 - beta2**self.steps))[:, self.groups]
        self.parameter.sub_(self.lr * first / (second.sqrt() + _EPSILON))


def voxel_loss_gradient(coefficients, measured, forward_matrix, fodf_sampler, n_wm_coeffs,
                        weights):
    """Gradient of each voxel's loss (the ESD loss without total variation).

    Written out rather than taken by autograd: a few passes over the sampled
    fODFs instead of autograd's many (the refinement runs 2x faster). The
    loss is :func:`esdmri.reconst.training.coefficient_loss` summed over
    voxels (tests check one against the other).

    Parameters
    ----------
    coefficients : Tensor, shape (n, C_total)
    measured : Tensor, shape (n, N)
    forward_matrix : Tensor, shape (C_total, N)
    fodf_sampler : Tensor, shape (V_dense, C_wm)
    n_wm_coeffs : int
    weights : LossWeights

    Returns
    -------
    gradient : Tensor, shape (n, C_total)
    """
    residual = coefficients @ forward_matrix - measured
    gradient = residual @ forward_matrix.T * (2 * weights.intensity / measured.shape[1])
    samples = coefficients[:, :n_wm_coeffs] @ fodf_sampler.T
    scale = 1.0 / fodf_sampler.shape[0]
    # d/df of 2 log(1 + f^2 / (2 sigma)) is 4 f / (2 sigma + f^2).
    sample_gradient = samples * (4 * weights.sparsity * scale) / (
        2 * CAUCHY_SIGMA + samples * samples)
    sample_gradient -= torch.relu(-samples) * (2 * weights.nonnegativity * scale)
    gradient[:, :n_wm_coeffs] += sample_gradient @ fodf_sampler
    return gradient


def refine_coefficients(coefficients, signal, mask, forward_matrix, fodf_sampler, n_wm_coeffs,
                        sh_order_max, weights, *, steps, lr=1e-3, normalize=True,
                        batch_voxels=8192, verbose=False):
    """Descend the voxel-wise deconvolution loss from given coefficients.

    Parameters
    ----------
    coefficients : ndarray, shape (X, Y, Z, C_total)
        Starting point (the network's output): WM SH coefficients then one
        l = 0 coefficient per isotropic tissue.
    signal : ndarray, shape (X, Y, Z, N)
        Measured signal divided by the mean b0.
    mask : ndarray of bool, shape (X, Y, Z)
    forward_matrix : Tensor, shape (C_total, N)
        Coefficients to the measured signal (``ForwardModel.matrix``).
    fodf_sampler : Tensor, shape (V_dense, C_wm)
        SH matrix of the sphere on which the sparsity terms sample the fODF.
    n_wm_coeffs, sh_order_max : int
    weights : LossWeights
        The voxel-wise terms are used (total variation couples voxels and is
        left to the network).
    steps : int
        Optimiser steps per voxel.
    lr : float, optional
    normalize : bool, optional
        Scale the result so the tissue fractions sum to 1, like the network.
    batch_voxels : int, optional
        Voxels optimised together (each buffer holds about
        ``batch_voxels * V_dense`` values).
    verbose : bool, optional

    Returns
    -------
    refined : ndarray, float32, shape (X, Y, Z, C_total)
        Zero outside the mask.
    """
    device = fodf_sampler.device
    groups = degree_groups(sh_order_max, coefficients.shape[-1] - n_wm_coeffs)
    indices = np.flatnonzero(mask)
    start_values = coefficients.reshape(-1, coefficients.shape[-1])
    signal_values = signal.reshape(-1, signal.shape[-1])
    refined = np.zeros_like(start_values, dtype=np.float32)
    chunks = range(0, len(indices), batch_voxels)
    for first in tqdm(chunks, desc="refining", unit="block", disable=not verbose):
        rows = indices[first:first + batch_voxels]
        c = torch.as_tensor(start_values[rows], dtype=torch.float32, device=device)
        measured = torch.as_tensor(signal_values[rows], dtype=torch.float32, device=device)
        optimizer = DegreeAdam(c, groups, lr)
        for _ in range(steps):
            optimizer.step(voxel_loss_gradient(c, measured, forward_matrix, fodf_sampler,
                                               n_wm_coeffs, weights))
            c[:, n_wm_coeffs:].clamp_(min=0)  # isotropic tissues are non-negative constants
        if normalize:
            total = volume_fractions_from_coefficients(c, n_wm_coeffs).sum(-1)
            c = c / total.clamp_min(NORMALIZATION_FLOOR).unsqueeze(1)
        refined[rows] = c.cpu().numpy()
    return refined.reshape(coefficients.shape)
