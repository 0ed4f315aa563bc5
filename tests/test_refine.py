"""Refinement of network fODFs, voxel-wise and spatially coupled (esdmri.reconst.refine)."""

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table
from scipy.spatial.transform import Rotation

from esdmri.metrics import threshold_sweep
from esdmri.reconst.config import RefinementConfig
from esdmri.reconst.losses import (CAUCHY_SIGMA, LossWeights, difference_operators,
                                   neighbour_pairs, total_variation)
from esdmri.reconst.models import ESDModel
from esdmri.reconst.network import SAMPLING_NSIDE, ForwardModel, stacked_forward_matrix
from esdmri.reconst.refine import (CoupledObjective, DegreeAdam, VoxelLoss, degree_groups,
                                   noise_variance, pair_distances, refine_coefficients,
                                   voxel_loss_gradient)
from esdmri.reconst.training import coefficient_loss
from esdmri.shm import n_coeffs, sh_matrix
from esdmri.sims import make_phantom
from esdmri.sphere import HealpixSphere

ORDER = 6


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((12, 12, 12), snr=30, max_fibres=2, seed=4)


def test_voxel_loss_gradient_is_the_gradient_of_the_training_loss(phantom):
    rng = np.random.default_rng(0)
    forward_model = ForwardModel(stacked_forward_matrix(phantom.response.normalized(),
                                                        phantom.gtab, ORDER)).double()
    matrix = forward_model.matrix
    sampler = torch.as_tensor(sh_matrix(ORDER, HealpixSphere(4, hemisphere=True).vertices))
    n, n_wm = 50, n_coeffs(ORDER)
    # Small coefficients: sampled fODFs straddle zero, so every term is active.
    coefficients = torch.tensor(rng.normal(0, 0.01, (n, len(matrix))), requires_grad=True)
    measured = torch.as_tensor(rng.uniform(0, 1, (n, matrix.shape[1])))
    weights = LossWeights(intensity=0.7, sparsity=2e-4, nonnegativity=0.3)
    loss, _ = coefficient_loss(coefficients.T.reshape(1, -1, n, 1, 1), n_wm,
                               forward_model, sampler,
                               measured.T.reshape(1, -1, n, 1, 1),
                               torch.ones((1, n, 1, 1), dtype=torch.bool), weights)
    expected = torch.autograd.grad(loss * n, coefficients)[0]
    ours, losses = voxel_loss_gradient(coefficients.detach(), measured, matrix, sampler, n_wm,
                                       weights, return_loss=True)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(losses.sum(), loss.detach() * n, rtol=1e-10, atol=1e-14)


def plain_voxel_loss(coefficients, measured, matrix, sampler, n_wm, weights):
    """Each voxel's loss written as the formula reads: the brute-force reference."""
    residual = coefficients @ matrix - measured
    samples = coefficients[:, :n_wm] @ sampler.T
    return (weights.intensity * (residual**2).mean(1)
            + weights.sparsity * (2 * torch.log1p(samples**2 / (2 * CAUCHY_SIGMA))).mean(1)
            + weights.nonnegativity * (torch.relu(-samples) ** 2).mean(1))


@pytest.mark.parametrize("n_measurements", [40, 20])
def test_fused_voxel_loss_is_the_autograd_gradient_of_the_plain_formula(n_measurements):
    """Random data, float64: the QR form of the signal term (and, with 20 measurements for
    28 coefficients, a rank-deficient forward matrix) gives the plain formula's value and
    its autograd gradient."""
    rng = np.random.default_rng(3)
    n, n_wm = 60, n_coeffs(ORDER)
    matrix = torch.as_tensor(rng.normal(0, 0.3, (n_wm + 2, n_measurements)))
    sampler = torch.as_tensor(sh_matrix(ORDER, HealpixSphere(4, hemisphere=True).vertices))
    coefficients = torch.tensor(rng.normal(0, 0.01, (n, n_wm + 2)), requires_grad=True)
    measured = torch.as_tensor(rng.uniform(0, 1, (n, n_measurements)))
    weights = LossWeights(intensity=0.7, sparsity=2e-4, nonnegativity=0.3)
    expected = plain_voxel_loss(coefficients, measured, matrix, sampler, n_wm, weights)
    expected_gradient = torch.autograd.grad(expected.sum(), coefficients)[0]
    voxel_loss = VoxelLoss(matrix, sampler, n_wm, weights)
    gradient, loss = voxel_loss(coefficients.detach(), *voxel_loss.project(measured),
                                return_loss=True)
    assert voxel_loss.rank == min(n_measurements, n_wm + 2)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-10, atol=1e-14)


def test_objective_in_float32_is_the_plain_formula_on_a_real_shaped_scan():
    """The refinement's float32 objective (SH order 12, 384 samples, a b0 + 3 x 64
    acquisition) against the plain formula in float64: the value to float32's precision,
    the gradient to its relative round-off."""
    phantom = make_phantom((10, 10, 10), snr=20, max_fibres=2, seed=6)
    order, n_wm = 12, n_coeffs(12)
    normalized = phantom.data / phantom.data[..., phantom.gtab.b0s_mask].mean(-1, keepdims=True)
    measured = torch.as_tensor(normalized[phantom.mask], dtype=torch.float64)
    matrix = torch.as_tensor(stacked_forward_matrix(phantom.response.normalized(),
                                                    phantom.gtab, order))
    sampler = torch.as_tensor(sh_matrix(order, HealpixSphere(SAMPLING_NSIDE,
                                                             hemisphere=True).vertices))
    # A ridge fit: a start at the scale of the refinement's (the plain least-squares fit
    # of order 12 is all noise).
    gram = matrix @ matrix.T
    start = torch.linalg.solve(gram + 1e-2 * gram.trace() / len(gram) * torch.eye(len(gram)),
                               matrix @ measured.T).T
    start[:, n_wm:] = start[:, n_wm:].abs()
    weights = LossWeights()
    first, second = neighbour_pairs(phantom.mask)
    pair_weights = torch.full((len(first),), 1e-3, dtype=torch.float64)
    objective = CoupledObjective(measured.float(), matrix.float(), sampler.float(), n_wm,
                                 weights, first, second, pair_weights.float(), 1e-3,
                                 batch_voxels=100)
    value, gradient = objective(start.float())
    reference = start.clone().requires_grad_(True)
    expected = (plain_voxel_loss(reference, measured, matrix, sampler, n_wm, weights).sum()
                + total_variation(reference, first, second, pair_weights, 1e-3))
    expected_gradient = torch.autograd.grad(expected, reference)[0]
    expected = float(expected.detach())
    print(f"value {value} against {expected}: relative {abs(value - expected) / expected:.2g}")
    assert abs(value - expected) < 1e-6 * expected
    assert (float((gradient.double() - expected_gradient).norm())
            < 1e-5 * float(expected_gradient.norm()))


def test_neighbour_pairs_are_the_face_neighbours_inside_the_mask():
    mask = np.random.default_rng(0).random((4, 5, 3)) > 0.3
    points = np.argwhere(mask)
    first, second = neighbour_pairs(mask)
    found = {tuple(sorted((int(a), int(b)))) for a, b in zip(first, second)}
    brute = {(a, b) for a in range(len(points)) for b in range(a + 1, len(points))
             if np.abs(points[a] - points[b]).sum() == 1}
    assert found == brute and len(first) == len(brute)


def test_total_variation_gradient_is_the_autograd_gradient():
    rng = np.random.default_rng(2)
    mask = np.ones((3, 4, 2), dtype=bool)
    first, second = (torch.as_tensor(a) for a in neighbour_pairs(mask))
    coefficients = torch.tensor(rng.normal(size=(mask.sum(), 7)), requires_grad=True)
    weights = torch.as_tensor(rng.uniform(0.2, 1, len(first)))
    difference = coefficients[first] - coefficients[second]
    expected_value = (weights * torch.sqrt((difference**2).sum(1) + 0.1**2)).sum()
    expected = torch.autograd.grad(expected_value, coefficients)[0]
    operators = difference_operators(first, second, len(coefficients), dtype=torch.float64)
    for given in (None, operators):
        value, gradient = total_variation(coefficients.detach(), first, second, weights, 0.1,
                                          gradient=True, operators=given)
        torch.testing.assert_close(value, expected_value.detach())
        torch.testing.assert_close(gradient, expected)


def test_noise_variance_of_a_noise_field():
    """Neighbours with equal signal differ by noise alone: sigma^2 is recovered."""
    rng = np.random.default_rng(3)
    mask = np.ones((10, 10, 10), dtype=bool)
    signal = 0.5 + rng.normal(0, 0.05, (mask.sum(), 60))
    first, second = (torch.as_tensor(a) for a in neighbour_pairs(mask))
    variance = noise_variance(pair_distances(torch.as_tensor(signal), first, second))
    assert abs(variance / 0.05**2 - 1) < 0.02


def rotate_sh(coefficients, rotation, sh_order_max):
    """Coefficients of ``f(R^T v)``, by least squares on a dense sphere (brute force)."""
    points = HealpixSphere(8, hemisphere=False).vertices
    basis = sh_matrix(sh_order_max, points)
    rotated = sh_matrix(sh_order_max, points @ rotation)  # rows Y(R^T v)
    return coefficients @ (np.linalg.pinv(basis) @ rotated).T


def descend(coefficients, measured, matrix, sampler, n_wm, groups, steps=40, lr=1e-2):
    """Refinement steps on the signal-fit term alone, which rotations leave exact."""
    weights = LossWeights(sparsity=0.0, nonnegativity=0.0)
    c = torch.as_tensor(coefficients).clone()
    optimizer = DegreeAdam(c, groups, lr)
    for _ in range(steps):
        optimizer.step(voxel_loss_gradient(c, measured, matrix, sampler, n_wm, weights))
    return c.numpy()


def test_degree_adam_commutes_with_rotations_and_adam_does_not(phantom):
    """Rotating the gradient directions and the start rotates the result."""
    rotation = Rotation.random(random_state=7).as_matrix()
    gtab = phantom.gtab
    rotated_gtab = gradient_table(gtab.bvals, bvecs=gtab.bvecs @ rotation.T,
                                  b0_threshold=gtab.b0_threshold)
    response = phantom.response.normalized()
    n_wm = n_coeffs(ORDER)
    sampler = torch.as_tensor(sh_matrix(ORDER, HealpixSphere(2, hemisphere=True).vertices))
    rng = np.random.default_rng(1)
    start = rng.normal(0, 0.05, (20, n_wm + 2))
    start[:, n_wm:] = np.abs(start[:, n_wm:])
    measured = torch.as_tensor(rng.uniform(0.1, 1, (20, len(gtab.bvals))))

    def rotate(c):
        return np.concatenate([rotate_sh(c[:, :n_wm], rotation, ORDER), c[:, n_wm:]], axis=1)

    errors = {}
    for name, groups in (("degree", degree_groups(ORDER, 2)), ("adam", np.arange(n_wm + 2))):
        plain = descend(start, measured,
                        torch.as_tensor(stacked_forward_matrix(response, gtab, ORDER)),
                        sampler, n_wm, groups)
        turned = descend(rotate(start), measured,
                         torch.as_tensor(stacked_forward_matrix(response, rotated_gtab, ORDER)),
                         sampler, n_wm, groups)
        errors[name] = np.abs(turned - rotate(plain)).max() / np.abs(plain).max()
    assert errors["degree"] < 1e-9
    assert errors["adam"] > 1e-4  # per-coefficient scaling breaks the symmetry


def crossing_error(phantom, fit):
    crossing = phantom.mask & (phantom.n_fibres == 2)
    sweep = threshold_sweep(fit.shm_coeff_descoteaux07, phantom.fibre_dirs, crossing,
                            thresholds=[0.1, 0.2, 0.3, 0.4, 0.5])
    return sweep["results"][sweep["best_index"]]["all"]


def test_refinement_sharpens_crossings(phantom):
    torch.manual_seed(0)
    model = ESDModel(phantom.gtab, phantom.response, sh_order_max=8, nside=4, depth=2,
                     filter_start=4, block_size=6, epochs=1, pretrained=False, refine_steps=0,
                     verbose=False)
    network = crossing_error(phantom, model.fit(phantom.data, mask=phantom.mask))
    refined = model.with_options(refine_steps=100)  # the trained network, refined
    refined = crossing_error(phantom, refined.fit(phantom.data, mask=phantom.mask))
    assert refined["angular_error"] < network["angular_error"]
    assert refined["success_rate"] > network["success_rate"] + 0.05


@pytest.mark.parametrize("option, value", [("refine_steps", -1), ("refine_steps", 2.5),
                                           ("refine_lr", 0.0)])
def test_bad_refinement_options(phantom, option, value):
    with pytest.raises(ValueError, match=option):
        ESDModel(phantom.gtab, phantom.response, **{option: value})


def refine_field(phantom, gtab, signal, mask, start, weights, dtype=torch.float32, **options):
    options = {"lr": 1e-2, "steps": 30, **options}
    matrix = torch.as_tensor(stacked_forward_matrix(phantom.response.normalized(), gtab, ORDER),
                             dtype=dtype)
    sampler = torch.as_tensor(sh_matrix(ORDER, HealpixSphere(SAMPLING_NSIDE,
                                                             hemisphere=True).vertices),
                              dtype=dtype)
    refined, history = refine_coefficients(start, signal, mask, matrix, sampler,
                                           n_coeffs(ORDER), ORDER, weights, normalize=False,
                                           **options)
    return refined.astype(np.float64), history


@pytest.fixture(scope="module")
def field(phantom):
    """A cropped, b0-normalised phantom volume with a noisy start."""
    from esdmri.reconst.inputs import normalize_by_b0

    normalized, mask = normalize_by_b0(phantom.data.astype(np.float32), phantom.gtab,
                                       phantom.mask)
    crop = (slice(3, 9), slice(2, 8), slice(4, 9))
    signal, mask = normalized[crop], mask[crop]
    # Start from the least-squares fit plus noise, as the refinement starts from a fit.
    matrix = stacked_forward_matrix(phantom.response.normalized(), phantom.gtab, ORDER)
    start = signal @ np.linalg.pinv(matrix)
    start += np.random.default_rng(5).normal(0, 0.02, start.shape)
    start[..., n_coeffs(ORDER):] = np.abs(start[..., n_coeffs(ORDER):])
    return signal, mask, np.where(mask[..., None], start, 0)


def equivariance_errors(phantom, field, weights, options):
    """Relative L2 errors of the refinement under a random SO(3) rotation of q-space and
    under a 90-degree grid rotation with the matching sphere rotation."""
    signal, mask, start = field
    n_wm = n_coeffs(ORDER)
    gtab = phantom.gtab
    plain, _ = refine_field(phantom, gtab, signal, mask, start, weights, **options)

    def turned(rotation, grid_turn):
        rotated_gtab = gradient_table(gtab.bvals, bvecs=gtab.bvecs @ rotation.T,
                                      b0_threshold=gtab.b0_threshold)

        def rotate(c):
            return np.concatenate([rotate_sh(c[..., :n_wm], rotation, ORDER), c[..., n_wm:]],
                                  axis=-1)

        result, _ = refine_field(phantom, rotated_gtab, grid_turn(signal), grid_turn(mask),
                                 grid_turn(rotate(start)), weights, **options)
        scale = np.linalg.norm(plain)
        # The check can fail: the result is not the unrotated one.
        assert np.linalg.norm(result - grid_turn(plain)) / scale > 0.05
        return np.linalg.norm(result - grid_turn(rotate(plain))) / scale

    random = Rotation.random(random_state=11).as_matrix()
    # np.rot90 over axes (0, 1) moves the voxel at (x, y) to (-y, x): +90 degrees about z.
    quarter = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    return {"random": turned(random, lambda v: v),
            "quarter": turned(quarter,
                              lambda v: np.ascontiguousarray(np.rot90(v, 1, axes=(0, 1))))}


COUPLED = dict(total_variation=20.0, similarity=True, smoothing=1e-2)


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_coupled_refinement_is_equivariant(phantom, field, method):
    """The signal fit and the total variation commute with rotations, in float64: float32's
    round-off, which L-BFGS's curvature pairs amplify to about 2e-5 in 30 steps, would hide
    a small symmetry error. Measured: 3e-8 for the random rotation (the floor of
    ``rotate_sh``'s least-squares reference), for both methods; for the quarter turn 4e-15
    (Adam) and 8e-11 (L-BFGS): the signal term goes through the QR factors of the rotated
    forward matrix, which are not a permutation of the unrotated one's, and L-BFGS amplifies
    their 1e-16 round-off (with the forward matrix itself, an exact permutation: 4e-15)."""
    errors = equivariance_errors(phantom, field, LossWeights(sparsity=0.0, nonnegativity=0.0),
                                 dict(COUPLED, method=method, dtype=torch.float64))
    print(f"{method}, signal fit + total variation: relative errors {errors}")
    assert errors["quarter"] < (1e-9 if method == "lbfgs" else 1e-12)
    assert errors["random"] < 1e-6


def test_coupling_adds_no_symmetry_error_to_the_full_loss(phantom, field):
    """With the sparsity terms, sampled on a HEALPix grid that a random rotation does not
    map onto itself (a 90-degree turn about z does), the refinement is equivariant only
    approximately; the spatial coupling must not make that worse. The quarter turn's
    error is round-off that L-BFGS amplifies (as in the test above): measured 1.4e-11
    with the whole preconditioner, 1.8e-12 with its block of degrees 0-4."""
    weights = LossWeights()
    # float64, so that round-off does not stand in for a symmetry error.
    voxelwise = equivariance_errors(phantom, field, weights, dict(dtype=torch.float64))
    coupled = equivariance_errors(phantom, field, weights, dict(COUPLED, dtype=torch.float64))
    print(f"full loss: voxel-wise {voxelwise}, coupled {coupled}")
    assert coupled["quarter"] < 1e-10
    assert coupled["random"] < 1.2 * voxelwise["random"] + 1e-3


def test_coupling_smooths_the_field_and_early_stopping_stops(phantom, field):
    signal, mask, start = field
    weights = LossWeights()
    voxelwise, _ = refine_field(phantom, phantom.gtab, signal, mask, start, weights)
    coupled, history = refine_field(phantom, phantom.gtab, signal, mask, start, weights,
                                    total_variation=50.0)
    first, second = (pairs.numpy() for pairs in neighbour_pairs(mask))

    def variation(c):
        values = c[mask]
        return np.linalg.norm(values[first] - values[second], axis=1).sum()

    assert variation(coupled) < 0.9 * variation(voxelwise)
    assert history[-1] < history[0]
    _, stopped = refine_field(phantom, phantom.gtab, signal, mask, start, weights,
                              total_variation=50.0, tolerance=0.5)
    assert len(stopped) < len(history)


def test_lbfgs_reaches_a_lower_objective_than_adam_and_says_why_it_stopped(phantom, field,
                                                                           capsys):
    """The same objective, minimised further in as many steps at the models' default step
    size (Adam with a 10x larger one is on par on this start); the bar ends with its
    reason."""
    signal, mask, start = field
    weights = LossWeights()
    default_lr = RefinementConfig().refine_lr
    _, adam = refine_field(phantom, phantom.gtab, signal, mask, start, weights,
                           total_variation=20.0, method="adam", lr=default_lr)
    _, lbfgs = refine_field(phantom, phantom.gtab, signal, mask, start, weights,
                            total_variation=20.0, method="lbfgs", lr=default_lr, verbose=True)
    assert lbfgs[-1] < adam[-1] and adam[-1] < adam[0]
    assert np.all(np.diff(lbfgs) <= 0)  # the line search only accepts decreases
    assert (lbfgs.stop_reason, lbfgs.steps) == ("step budget reached", 30)
    assert lbfgs.evaluations >= 31 and adam.evaluations == 31
    assert "step budget reached" in capsys.readouterr().err
    _, stopped = refine_field(phantom, phantom.gtab, signal, mask, start, weights,
                              total_variation=20.0, tolerance=0.5, verbose=True)
    assert stopped.stop_reason == f"converged at step {stopped.steps}" and stopped.steps < 30
    assert stopped.stop_reason in capsys.readouterr().err


def test_bad_solver_options(phantom, field):
    signal, mask, start = field
    with pytest.raises(ValueError, match="method"):
        refine_field(phantom, phantom.gtab, signal, mask, start, LossWeights(), method="sgd")
    with pytest.raises(ValueError, match="refine_method"):
        ESDModel(phantom.gtab, phantom.response, refine_method="newton")
