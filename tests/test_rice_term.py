"""The Rician mean of a noise-free signal and its slope (esdmri.reconst.rician), against
scipy's Rice distribution, the confluent hypergeometric form, Monte-Carlo draws and
finite differences."""

import numpy as np
import pytest
import torch
from scipy.special import hyp1f1
from scipy.stats import rice

from esdmri.reconst.rician import rician_mean_and_slope

# Signal-to-noise ratios A / sigma from far under the floor to far above it (1e5 is
# past the switch to |A| at 1e4).
RATIOS = np.array([0.0, 1e-4, 0.01, 0.3, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0,
                   1e3, 9e3, 1.1e4, 1e5])


def hypergeometric_mean(signal, sigma):
    """E[M] = sigma sqrt(pi / 2) 1F1(-1/2; 1; -A^2 / (2 sigma^2)): another route than
    the Bessel functions (Gudbjartsson & Patz 1995); float64."""
    return sigma * np.sqrt(np.pi / 2) * hyp1f1(-0.5, 1.0, -signal**2 / (2 * sigma**2))


@pytest.mark.parametrize("sigma", [0.02, 1.0, 30.0])
def test_float32_mean_is_scipys_rice_mean(sigma):
    signal = RATIOS * sigma
    mean, _ = rician_mean_and_slope(torch.tensor(signal, dtype=torch.float32),
                                    torch.tensor(sigma, dtype=torch.float32))
    # scipy's Rice distribution in units of sigma (b = A / sigma, scale sigma), which
    # overflows beyond b of about 30; there the asymptotic series A + sigma^2 / (2 A).
    low = RATIOS <= 30
    np.testing.assert_allclose(mean.double().numpy()[low],
                               rice.mean(RATIOS[low], scale=sigma), rtol=2e-6)
    high = signal[~low]
    np.testing.assert_allclose(mean.double().numpy()[~low], high + sigma**2 / (2 * high),
                               rtol=1e-6)
    # At A = 0 the floor sigma sqrt(pi / 2); for A >> sigma the mean tends to A.
    assert float(mean[0]) == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=1e-6)
    assert float(mean[-1]) == pytest.approx(signal[-1], rel=1e-7)


def test_negative_signals_reflect_the_mean_through_the_floor():
    """E(-A) = 2 floor - E(A), the slope even: increasing in A, smooth at 0, and -A as
    sigma -> 0 (the least-squares prediction)."""
    signal = torch.tensor(RATIOS, dtype=torch.float64)
    mean, slope = rician_mean_and_slope(signal, 1.0)
    negative_mean, negative_slope = rician_mean_and_slope(-signal, 1.0)
    torch.testing.assert_close(negative_mean, 2 * np.sqrt(np.pi / 2) - mean, rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(negative_slope, slope, rtol=0, atol=0)
    assert (slope >= 0).all()
    tiny_mean, tiny_slope = rician_mean_and_slope(-signal[1:], 1e-9)
    torch.testing.assert_close(tiny_mean, -signal[1:], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(tiny_slope, torch.ones_like(tiny_slope), rtol=0, atol=0)


def test_mean_is_the_monte_carlo_mean_of_the_magnitudes():
    rng = np.random.default_rng(0)
    draws, sigma = 400_000, 0.7
    for ratio in (0.0, 0.5, 1.0, 2.0, 4.0):
        signal = ratio * sigma
        magnitudes = np.hypot(signal + rng.normal(0, sigma, draws), rng.normal(0, sigma, draws))
        mean, _ = rician_mean_and_slope(torch.tensor(signal, dtype=torch.float32), sigma)
        standard_error = magnitudes.std() / np.sqrt(draws)
        assert abs(float(mean) - magnitudes.mean()) < 4 * standard_error, ratio


@pytest.mark.parametrize("sigma", [0.05, 1.0])
def test_slope_is_the_finite_difference_derivative(sigma):
    """Central differences of the hypergeometric mean (float64): 0 at A = 0, tending to 1
    for A >> sigma; the float32 slope to float32 round-off."""
    signal = RATIOS * sigma
    step = 1e-5 * np.maximum(signal, sigma)
    expected = (hypergeometric_mean(signal + step, sigma)
                - hypergeometric_mean(signal - step, sigma)) / (2 * step)
    _, slope64 = rician_mean_and_slope(torch.tensor(signal), torch.tensor(sigma))
    _, slope32 = rician_mean_and_slope(torch.tensor(signal, dtype=torch.float32),
                                       torch.tensor(sigma, dtype=torch.float32))
    near = RATIOS < 1e3  # beyond, 1F1's cancellation spoils the differences
    np.testing.assert_allclose(slope64.numpy()[near], expected[near], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(slope32.double().numpy(), slope64.numpy(), rtol=5e-6,
                               atol=1e-7)
    assert float(slope64[0]) == 0.0
    np.testing.assert_allclose(slope64.numpy()[RATIOS >= 1e3], 1.0, rtol=1e-6)


def test_slope_is_the_autograd_derivative_of_the_mean():
    kept = RATIOS[RATIOS < 1e3] * 0.3
    signal = torch.tensor(np.concatenate([kept, -kept]), dtype=torch.float64,
                          requires_grad=True)
    mean, slope = rician_mean_and_slope(signal, 0.3)
    expected = torch.autograd.grad(mean.sum(), signal)[0]
    torch.testing.assert_close(slope.detach(), expected, rtol=1e-10, atol=1e-12)


def test_per_voxel_sigma_broadcasts():
    signal = torch.tensor([[0.0, 0.5, 2.0], [0.0, 0.5, 2.0]], dtype=torch.float64)
    sigma = torch.tensor([[0.1], [1.0]], dtype=torch.float64)
    mean, _ = rician_mean_and_slope(signal, sigma)
    np.testing.assert_allclose(mean[0].numpy(), rice.mean(signal[0].numpy() / 0.1, scale=0.1))
    np.testing.assert_allclose(mean[1].numpy(), rice.mean(signal[1].numpy(), scale=1.0))
