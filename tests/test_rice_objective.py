"""The refinement with a Rician-mean data term (``noise_floor="model"``): its per-voxel loss
and coupled objective against autograd of the plain formula (written with the unscaled
Bessel functions) and finite differences, its limit sigma -> 0 against the
least-squares refinement, and the option through the model and its file."""

import math

import numpy as np
import pytest
import torch
from test_refine import ORDER, field, phantom, refine_field  # noqa: F401

from esdmri.reconst.losses import CAUCHY_SIGMA, LossWeights, neighbour_pairs, total_variation
from esdmri.reconst.network import SAMPLING_NSIDE, stacked_forward_matrix
from esdmri.reconst.refine import CoupledObjective, VoxelLoss
from esdmri.reconst.rician import RicianVoxelLoss
from esdmri.shm import n_coeffs, sh_matrix
from esdmri.sphere import HealpixSphere

WEIGHTS = LossWeights(intensity=0.7, sparsity=2e-4, nonnegativity=0.3)


def plain_rician_loss(coefficients, measured, sigma, matrix, sampler, n_wm, weights):
    """Each voxel's loss as the formula reads, the mean through I_0 and I_1 (unscaled:
    moderate SNR only) and reflected through the floor for negative signals, float64:
    the brute-force reference."""
    forward = coefficients @ matrix
    sigma = sigma.unsqueeze(1)
    x = forward**2 / (4 * sigma**2)
    floor = sigma * math.sqrt(math.pi / 2)
    rician = floor * torch.exp(-x) * ((1 + 2 * x) * torch.special.i0(x)
                                      + 2 * x * torch.special.i1(x))
    mean = torch.where(forward >= 0, rician, 2 * floor - rician)
    samples = coefficients[:, :n_wm] @ sampler.T
    return (weights.intensity * ((mean - measured) ** 2).mean(1)
            + weights.sparsity * (2 * torch.log1p(samples**2 / (2 * CAUCHY_SIGMA))).mean(1)
            + weights.nonnegativity * (torch.relu(-samples) ** 2).mean(1))


def test_rician_voxel_loss_is_the_autograd_gradient_of_the_plain_formula():
    """Random data, float64, forward signals on both sides of the floor and of zero."""
    rng = np.random.default_rng(3)
    n, n_wm, n_measurements = 60, n_coeffs(ORDER), 40
    matrix = torch.as_tensor(rng.normal(0, 0.3, (n_wm + 2, n_measurements)))
    sampler = torch.as_tensor(sh_matrix(ORDER, HealpixSphere(4, hemisphere=True).vertices))
    coefficients = torch.tensor(rng.normal(0, 0.1, (n, n_wm + 2)), requires_grad=True)
    measured = torch.as_tensor(rng.uniform(0, 1, (n, n_measurements)))
    sigma = torch.as_tensor(rng.uniform(0.05, 0.3, n))
    expected = plain_rician_loss(coefficients, measured, sigma, matrix, sampler, n_wm, WEIGHTS)
    expected_gradient = torch.autograd.grad(expected.sum(), coefficients)[0]
    voxel_loss = RicianVoxelLoss(matrix, sampler, n_wm, WEIGHTS, sigma, VoxelLoss,
                                 approximate=False)
    gradient, loss = voxel_loss(coefficients.detach(), *voxel_loss.project(measured),
                                return_loss=True)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-13)


def rician_problem(phantom, field, sigma_scale=1.0, dtype=torch.float64,  # noqa: F811
                   approximate=False):
    """The coupled objective with the Rician term (its Bessel form unless
    ``approximate``) on the field's masked voxels."""
    signal, mask, start = field
    matrix = torch.as_tensor(stacked_forward_matrix(phantom.response.normalized(),
                                                    phantom.gtab, ORDER), dtype=dtype)
    sampler = torch.as_tensor(sh_matrix(ORDER, HealpixSphere(SAMPLING_NSIDE,
                                                             hemisphere=True).vertices),
                              dtype=dtype)
    measured = torch.as_tensor(signal[mask], dtype=dtype)
    sigma = torch.full((len(measured),), 0.1 * sigma_scale, dtype=dtype)
    first, second = neighbour_pairs(mask)
    pair_weights = torch.full((len(first),), 1e-3, dtype=dtype)
    objective = CoupledObjective(measured, matrix, sampler, n_coeffs(ORDER), WEIGHTS, first,
                                 second, pair_weights, 1e-3, batch_voxels=37,
                                 noise_sigma=sigma)
    objective.voxel_loss.approximate = approximate
    return (objective, measured, sigma, matrix, sampler, first, second, pair_weights,
            torch.as_tensor(start[mask], dtype=dtype))


def test_coupled_objective_with_the_rician_term_is_its_autograd_gradient(phantom,  # noqa: F811
                                                                         field):  # noqa: F811
    objective, measured, sigma, matrix, sampler, first, second, pair_weights, start = (
        rician_problem(phantom, field))
    reference = start.clone().requires_grad_(True)
    expected = (plain_rician_loss(reference, measured, sigma, matrix, sampler,
                                  n_coeffs(ORDER), WEIGHTS).sum()
                + total_variation(reference, first, second, pair_weights, 1e-3))
    expected_gradient = torch.autograd.grad(expected, reference)[0]
    value, gradient = objective(start)
    assert value == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-12)
    assert_gradient_is_the_finite_difference(objective, start, gradient, seed=0)


def assert_gradient_is_the_finite_difference(objective, start, gradient, seed):
    """Along random directions, the gradient is the central finite difference of the value."""
    rng = np.random.default_rng(seed)
    for _ in range(3):
        direction = torch.as_tensor(rng.normal(size=start.shape))
        step = 1e-6
        difference = (objective(start + step * direction)[0]
                      - objective(start - step * direction)[0]) / (2 * step)
        slope = float((gradient * direction).sum())
        assert difference == pytest.approx(slope, rel=1e-6)


def test_float32_objective_is_the_float64_one(phantom, field):  # noqa: F811
    """The refinement evaluates in float32: value and gradient to float32 round-off."""
    objective64, *_, start = rician_problem(phantom, field)
    objective32, *_ = rician_problem(phantom, field, dtype=torch.float32)
    value64, gradient64 = objective64(start)
    value32, gradient32 = objective32(start.float())
    assert value32 == pytest.approx(value64, rel=1e-5)
    assert float((gradient32.double() - gradient64).norm()) < 1e-4 * float(gradient64.norm())


@pytest.mark.parametrize("tv", [0.0, 20.0])
def test_refinement_tends_to_least_squares_as_sigma_vanishes(phantom, field, tv):  # noqa: F811
    """With a tiny noise level the Rician mean is the forward signal's magnitude, and the
    refinement (float64, L-BFGS) ends where the least-squares one does; at the phantom's
    own noise level it ends elsewhere (the term is not least squares in disguise)."""
    signal, mask, start = field
    options = dict(dtype=torch.float64, steps=30, total_variation=tv, similarity=True)
    plain, plain_history = refine_field(phantom, phantom.gtab, signal, mask, start, WEIGHTS,
                                        **options)
    tiny = np.where(mask, 1e-7, 0.0)
    rician, rician_history = refine_field(phantom, phantom.gtab, signal, mask, start,
                                          WEIGHTS, noise_sigma=tiny, **options)
    assert rician_history.evaluations == plain_history.evaluations
    # The refinement returns float32: equal to its round-off (float64 inside).
    np.testing.assert_allclose(rician, plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    noisy, _ = refine_field(phantom, phantom.gtab, signal, mask, start, WEIGHTS,
                            noise_sigma=np.where(mask, 1 / 30, 0.0), **options)
    assert np.abs(noisy - plain).max() > 1e-3 * np.abs(plain).max()


def test_bad_noise_sigma(phantom, field):  # noqa: F811
    signal, mask, start = field
    with pytest.raises(ValueError, match="noise_sigma must be > 0"):
        refine_field(phantom, phantom.gtab, signal, mask, start, WEIGHTS,
                     noise_sigma=np.zeros(mask.shape))


def test_model_option_uses_the_scans_noise_level_and_is_recorded(phantom, tmp_path):  # noqa: F811
    from esdmri import RTESDModel, load_model
    from esdmri.reconst.inputs import noise_floor_variance

    model = RTESDModel(phantom.gtab, phantom.response, noise_floor="model", pretrained=False,
                       refine_steps=5, verbose=False)
    scan = model.prepare(phantom.data)
    mean_b0 = phantom.data[..., phantom.gtab.b0s_mask].mean(-1)
    sigma = np.sqrt(noise_floor_variance(phantom.data, phantom.gtab, scan.mask))
    np.testing.assert_allclose(scan.noise_sigma[scan.mask], sigma / mean_b0[scan.mask],
                               rtol=1e-6)
    assert (scan.noise_sigma[~scan.mask] == 0).all()
    # The magnitudes are left as they are (the floor is in the data term).
    plain = RTESDModel(phantom.gtab, phantom.response, pretrained=False, verbose=False)
    np.testing.assert_array_equal(scan.normalized, plain.prepare(phantom.data).normalized)
    assert plain.prepare(phantom.data).noise_sigma is None
    path = tmp_path / "model.pt"
    model.save(path)
    assert load_model(path, verbose=False).config.network.noise_floor == "model"
