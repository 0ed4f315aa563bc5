"""The unsupervised deconvolution loss of ESD and RT-ESD (Elaldi et al. 2021, 2023).

All terms take voxel-major tensors restricted to a window: ``[B, ..., X, Y, Z]``
values with a boolean ``mask`` of shape ``[B, X, Y, Z]``.
"""

import torch

# The weights live with the other options, in the torch-free configuration module.
from .config import LossWeights  # noqa: F401

# Scale of the Cauchy sparsity penalty of the ESD papers.
CAUCHY_SIGMA = 1e-5


def _masked_mean(values, mask):
    """Mean of ``values [B, K, X, Y, Z]`` over masked voxels and over K."""
    weights = mask.unsqueeze(1).to(values.dtype)
    return (values * weights).sum() / (weights.sum() * values.shape[1]).clamp_min(1)


def intensity_loss(predicted, measured, mask):
    """Mean squared error over masked voxels and measurements, ``[B, N, X, Y, Z]``."""
    return _masked_mean((predicted - measured) ** 2, mask)


def sparsity_loss(fodf_samples, mask):
    """Cauchy sparsity of sampled fODFs ``[B, V, X, Y, Z]``."""
    return _masked_mean(2 * torch.log1p(fodf_samples**2 / (2 * CAUCHY_SIGMA)), mask)


def nonnegativity_loss(fodf_samples, mask):
    """Squared negative part of sampled fODFs ``[B, V, X, Y, Z]``."""
    return _masked_mean(torch.relu(-fodf_samples) ** 2, mask)


def total_variation_loss(coefficients, mask):
    """Isotropic-in-coefficients total variation between face neighbours.

    The Euclidean norm of the difference of SH coefficient vectors equals the
    L2 distance of the two spherical functions, so this is rotation invariant.

    Parameters
    ----------
    coefficients : Tensor, shape [B, C, X, Y, Z]
    mask : Tensor of bool, shape [B, X, Y, Z]
    """
    total = coefficients.new_zeros(())
    pairs = coefficients.new_zeros(())
    for axis in (2, 3, 4):
        length = coefficients.shape[axis] - 1
        difference = coefficients.narrow(axis, 1, length) - coefficients.narrow(axis, 0, length)
        both = mask.narrow(axis - 1, 1, length) & mask.narrow(axis - 1, 0, length)
        # The small epsilon keeps the gradient finite where neighbours agree.
        norm = torch.sqrt((difference**2).sum(dim=1) + 1e-12)
        total = total + (norm * both).sum()
        pairs = pairs + both.sum()
    return total / pairs.clamp_min(1)
