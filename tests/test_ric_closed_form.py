"""The Rician mean's closed form (``rician_mean_and_slope(approximate=True)``, the
refinement's default): against the exact mean through scipy's Bessel functions (an
independent implementation), its slope against finite differences of itself, float32
against float64, and the refinement's objective with it against the Bessel form."""

import numpy as np
import pytest
import torch
from scipy.special import i0e, i1e
from test_refine import field, phantom  # noqa: F401
from test_rice_objective import assert_gradient_is_the_finite_difference, rician_problem

from esdmri.reconst.rician import rician_mean_and_slope

# |A| / sigma from far under the floor to far above it, both signs.
RATIOS = np.geomspace(1e-4, 1e6, 20001)
SIGNED = np.concatenate([-RATIOS[::-1], [0.0], RATIOS])


def scipy_mean_and_slope(signal, sigma):
    """The Rician mean (reflected through the floor for A < 0) and dE/dA, float64, from
    scipy's i0e / i1e; |A| itself beyond 1e4 sigma (where E - |A| < 5e-5 sigma)."""
    ratio = np.abs(signal) / sigma
    x = ratio**2 / 4
    floor = sigma * np.sqrt(np.pi / 2)
    with np.errstate(over="ignore", invalid="ignore"):
        mean = floor * ((1 + 2 * x) * i0e(x) + 2 * x * i1e(x))
        slope = np.sqrt(np.pi / 2) * ratio / 2 * (i0e(x) + i1e(x))
    far = ratio > 1e4
    mean = np.where(far, np.abs(signal), mean)
    slope = np.where(far, 1.0, slope)
    return floor + np.sign(signal) * (mean - floor), slope


@pytest.mark.parametrize("sigma", [1.0, 0.03])
def test_closed_form_is_within_its_stated_error_of_the_exact_mean(sigma):
    signal = SIGNED * sigma
    expected_mean, expected_slope = scipy_mean_and_slope(signal, sigma)
    mean, slope = rician_mean_and_slope(torch.tensor(signal), sigma, approximate=True)
    error = np.abs(mean.numpy() - expected_mean)
    assert error.max() <= 8.5e-4 * sigma
    assert np.abs(slope.numpy() - expected_slope).max() <= 2.3e-3
    # Exact at the floor, and the floor is where the error matters: not a looser fit.
    assert error[len(RATIOS)] <= 1e-12 * sigma
    # Far above the floor it is A (far under zero, A reflected through the floor).
    far = np.abs(signal) > 1e3 * sigma
    reflected = signal + (signal < 0) * 2 * sigma * np.sqrt(np.pi / 2)
    np.testing.assert_allclose(mean.numpy()[far], reflected[far], rtol=1e-6)


def test_closed_form_slope_is_its_own_derivative():
    """The objective's gradient must be the derivative of its value (L-BFGS)."""
    signal = torch.tensor(np.concatenate([-np.linspace(0.01, 30, 3000), np.linspace(0.01, 30,
                                                                                   3000)]))
    step = 1e-6
    mean, slope = rician_mean_and_slope(signal, 1.0, approximate=True)
    above, _ = rician_mean_and_slope(signal + step, 1.0, approximate=True)
    below, _ = rician_mean_and_slope(signal - step, 1.0, approximate=True)
    torch.testing.assert_close(slope, (above - below) / (2 * step), rtol=0, atol=1e-8)
    assert (slope >= 0).all() and (slope <= 1.0 + 1e-12).all()


def test_closed_form_in_float32_is_the_float64_one():
    signal = torch.tensor(SIGNED * 0.05)
    mean64, slope64 = rician_mean_and_slope(signal, 0.05, approximate=True)
    mean32, slope32 = rician_mean_and_slope(signal.float(), torch.tensor(0.05),
                                            approximate=True)
    assert mean32.dtype == torch.float32
    scale = 0.05 + signal.abs()
    assert float(((mean32.double() - mean64).abs() / scale).max()) < 1e-6
    assert float((slope32.double() - slope64).abs().max()) < 1e-6


def test_objective_with_the_closed_form_is_the_bessel_one_to_its_error(phantom,  # noqa: F811
                                                                       field):  # noqa: F811
    """The refinement's objective (float64, with TV) with the closed form: value and
    gradient within the approximation's error of the Bessel form, and its gradient the
    central finite difference of its value."""
    exact, *_, start = rician_problem(phantom, field)
    closed, *_ = rician_problem(phantom, field, approximate=True)
    value, gradient = closed(start)
    exact_value, exact_gradient = exact(start)
    assert value == pytest.approx(exact_value, rel=1e-3)
    assert float((gradient - exact_gradient).norm()) < 1e-2 * float(exact_gradient.norm())
    assert value != exact_value
    assert_gradient_is_the_finite_difference(closed, start, gradient, seed=1)
