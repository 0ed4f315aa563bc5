"""Voxel-wise refinement of network fODFs (esdmri.reconst.refine)."""

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table
from scipy.spatial.transform import Rotation

from esdmri.metrics import threshold_sweep
from esdmri.reconst.losses import LossWeights
from esdmri.reconst.models import ESDModel
from esdmri.reconst.network import ForwardModel, stacked_forward_matrix
from esdmri.reconst.refine import DegreeAdam, degree_groups, voxel_loss_gradient
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
    ours = voxel_loss_gradient(coefficients.detach(), measured, matrix, sampler, n_wm, weights)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)


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
                     filter_start=4, block_size=6, epochs=1, refine_steps=0, verbose=False)
    network = crossing_error(phantom, model.fit(phantom.data, phantom.mask))
    model.config.refine_steps = 100  # the trained network, refined
    refined = crossing_error(phantom, model.fit(phantom.data, phantom.mask))
    assert refined["angular_error"] < network["angular_error"]
    assert refined["success_rate"] > network["success_rate"] + 0.05


@pytest.mark.parametrize("option, value", [("refine_steps", -1), ("refine_steps", 2.5),
                                           ("refine_lr", 0.0)])
def test_bad_refinement_options(phantom, option, value):
    with pytest.raises(ValueError, match=option):
        ESDModel(phantom.gtab, phantom.response, **{option: value})
