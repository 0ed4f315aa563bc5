"""The scan's noise level for the Rician data term (``noise_floor_variance``): against
the sigma of the noise it was given, on phantoms where the neighbours' diffusion-weighted
signals differ and part of them lie on the floor (where the all-measurement neighbour
estimate is measurably off, the reason for the b0 estimate)."""

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table

from esdmri.reconst.inputs import noise_floor_variance
from esdmri.reconst.losses import neighbour_pairs
from esdmri.reconst.refine import noise_variance, pair_distances

SIGMA = 4.0
SHAPE = (16, 16, 16)


def acquisition(n_b0, n_dw=30, seed=0):
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_b0 + n_dw, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return gradient_table(np.r_[np.zeros(n_b0), np.full(n_dw, 2000.0)], bvecs=directions)


def magnitudes(signal, sigma, rng):
    """Rician magnitudes of a noise-free signal: |signal + complex Gaussian noise|."""
    return np.hypot(signal + rng.normal(0, sigma, signal.shape),
                    rng.normal(0, sigma, signal.shape))


def signal_of(gtab, kind):
    """b0 100 everywhere; diffusion-weighted signals that either change from each voxel
    to every neighbour (``"turning"``: a fibre-like profile whose axis turns 0.3 radian
    per voxel along each axis, far above the floor) or lie on the floor (``"floor"``:
    0)."""
    angle = 0.3 * np.indices(SHAPE).sum(0)[..., None]
    if kind == "floor":
        weighted = np.zeros(SHAPE + (len(gtab.bvals),))
    else:
        axis = np.stack([np.cos(angle), np.sin(angle), 0 * angle], -1)
        cosine = (axis * gtab.bvecs[None, None, None]).sum(-1)
        weighted = 40 + 80 * cosine**2
    return np.where(gtab.b0s_mask, 100.0, weighted)


@pytest.mark.parametrize("n_b0", [1, 2, 5])
def test_pure_noise_around_a_constant(n_b0):
    """The analytic case: a constant signal, Rician noise of known sigma."""
    rng = np.random.default_rng(n_b0)
    gtab = acquisition(n_b0)
    data = magnitudes(np.full(SHAPE + (len(gtab.bvals),), 100.0), SIGMA, rng)
    mask = np.ones(SHAPE, bool)
    # Sampling error: the MAD of ~12 000 pair differences (one b0) about 1.5 % in
    # sigma, the median of 4096 sample variances about 1-2 %.
    assert noise_floor_variance(data, gtab, mask) == pytest.approx(SIGMA**2, rel=0.08)


@pytest.mark.parametrize("n_b0", [1, 3])
@pytest.mark.parametrize("kind", ["turning", "floor"])
def test_signal_differences_and_the_floor_do_not_bias_it(n_b0, kind):
    rng = np.random.default_rng(10 + n_b0)
    gtab = acquisition(n_b0)
    data = magnitudes(signal_of(gtab, kind), SIGMA, rng)
    mask = np.ones(SHAPE, bool)
    assert noise_floor_variance(data, gtab, mask) == pytest.approx(SIGMA**2, rel=0.08)
    # The all-measurement neighbour estimate (the refinement's, and this one's until
    # 2026-12-06) takes the signal differences for noise and, on the floor, sees the
    # magnitudes' narrower spread (Rayleigh: 0.43 sigma^2).
    first, second = neighbour_pairs(torch.as_tensor(mask))
    pairs = noise_variance(pair_distances(torch.as_tensor(data[mask]), first, second))
    if kind == "turning":
        assert pairs > 1.5 * SIGMA**2
    else:
        assert pairs < 0.6 * SIGMA**2


def test_b0_spread_ignores_voxels_that_change_between_b0_volumes():
    """A few voxels whose b0 jumps between volumes (motion, pulsation): the median
    over voxels leaves them out."""
    rng = np.random.default_rng(5)
    gtab = acquisition(3)
    signal = np.full(SHAPE + (len(gtab.bvals),), 100.0)
    signal[:1, :, :, 0] = 160.0  # a sixteenth of the voxels
    data = magnitudes(signal, SIGMA, rng)
    assert noise_floor_variance(data, gtab, np.ones(SHAPE, bool)) == pytest.approx(
        SIGMA**2, rel=0.15)


def test_nothing_to_measure_on():
    gtab = acquisition(1)
    data = magnitudes(np.full((3, 1, 1, len(gtab.bvals)), 100.0), SIGMA,
                      np.random.default_rng(0))
    single = np.zeros((3, 1, 1), bool)
    single[0] = True
    assert noise_floor_variance(data, gtab, single) == 0.0
    # Two b0 volumes: one voxel is enough.
    assert noise_floor_variance(data, acquisition(2, n_dw=len(gtab.bvals) - 2), single) > 0
