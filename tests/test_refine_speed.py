"""Issue 28's faster paths keep what they compute: the preconditioned L-BFGS and the
masked-voxel pretrained correction."""

import numpy as np
import pytest
import torch
from test_refine import (COUPLED, ORDER, equivariance_errors, field, phantom,  # noqa: F401
                         plain_voxel_loss, refine_field)

from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.reconst import pretrained
from esdmri.reconst.losses import LossWeights
from esdmri.reconst.network import stacked_forward_matrix
from esdmri.reconst.refine import signal_preconditioner
from esdmri.shm import n_coeffs


def test_signal_preconditioner_inverts_the_autograd_hessian_of_the_signal_term(
        phantom):  # noqa: F811
    """``(H + mu I)^-1`` with ``H`` the Hessian of one voxel's plain loss without its
    sparsity terms, by autograd, and ``mu`` the damping times H's mean diagonal."""
    matrix = torch.as_tensor(stacked_forward_matrix(phantom.response.normalized(),
                                                    phantom.gtab, ORDER))
    weights = LossWeights(intensity=1.5, sparsity=0.0, nonnegativity=0.0)
    measured = torch.as_tensor(np.random.default_rng(3).normal(size=(1, matrix.shape[1])))
    sampler = torch.zeros((4, n_coeffs(ORDER)), dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(
        lambda c: plain_voxel_loss(c[None], measured, matrix, sampler, n_coeffs(ORDER),
                                   weights).sum(),
        torch.zeros(matrix.shape[0], dtype=torch.float64))
    damping = 3.0
    expected = torch.linalg.inv(hessian + damping * hessian.diagonal().mean()
                                * torch.eye(len(hessian), dtype=torch.float64))
    result = signal_preconditioner(matrix, weights, damping)
    assert torch.allclose(result, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    assert torch.allclose(result, result.T)


def converged(phantom, field, weights, damping, **options):  # noqa: F811
    signal, mask, start = field
    options = dict(steps=400, tolerance=1e-9, check_every=5, damping=damping, **options)
    return refine_field(phantom, phantom.gtab, signal, mask, start, weights,
                        dtype=torch.float64, **options)


def test_preconditioned_lbfgs_reaches_the_plain_minimiser(phantom, field):  # noqa: F811
    """On a convex objective (signal fit, non-negativity, total variation; no Cauchy
    sparsity) both solvers run to the same minimum; on the default, nonconvex one the
    preconditioned solver stops at least as low, in fewer evaluations."""
    convex = LossWeights(sparsity=0.0)
    plain, plain_history = converged(phantom, field, convex, None, **COUPLED)
    fast, fast_history = converged(phantom, field, convex, 10.0, **COUPLED)
    assert abs(fast_history[-1] - plain_history[-1]) < 1e-6 * plain_history[-1]
    # Coefficients the signal barely sees (its Hessian's smallest eigenvalues are about
    # 1e-9 of its largest) are set by the total variation alone, so compare predictions.
    signal, mask, _ = field
    matrix = stacked_forward_matrix(phantom.response.normalized(), phantom.gtab, ORDER)
    scale = np.linalg.norm(plain[mask] @ matrix)
    assert np.linalg.norm((fast - plain)[mask] @ matrix) < 1e-3 * scale
    default = LossWeights()
    signal_options = dict(COUPLED, lr=1e-3)
    _, plain_history = converged(phantom, field, default, None, **signal_options)
    _, fast_history = converged(phantom, field, default, 10.0, **signal_options)
    print(f"plain {plain_history[-1]:.8g} in {plain_history.evaluations} evaluations, "
          f"preconditioned {fast_history[-1]:.8g} in {fast_history.evaluations}")
    assert fast_history[-1] <= plain_history[-1] * (1 + 1e-4)


@pytest.mark.parametrize("damping", [None, 10.0])
def test_preconditioned_refinement_is_equivariant(phantom, field, damping):  # noqa: F811
    """Quarter turns of the grid with the matching sphere rotation, and a random SO(3)
    rotation of q-space, commute with the fit with and without the preconditioner (the
    signal fit and total variation, float64; test_refine.py says why these bounds)."""
    errors = equivariance_errors(phantom, field, LossWeights(sparsity=0.0, nonnegativity=0.0),
                                 dict(COUPLED, dtype=torch.float64, damping=damping))
    print(f"damping {damping}: relative errors {errors}")
    assert errors["quarter"] < 1e-9
    assert errors["random"] < 1e-6


def test_bad_damping(phantom, field):  # noqa: F811
    signal, mask, start = field
    with pytest.raises(ValueError, match="damping"):
        refine_field(phantom, phantom.gtab, signal, mask, start, LossWeights(), damping=0.0)


def test_masked_voxel_correction_equals_the_network_on_the_whole_volume():
    """apply_correction runs the spherical U-Net on masked voxels only, slab by slab: the
    same values as the correction module on the whole zero-padded volume at once."""
    scan = make_heldout_phantom((12, 11, 10), snr=20, seed=903, geometry_seed=902)
    correction = pretrained.load_correction(True)
    rng = np.random.default_rng(7)
    mask = scan.mask.copy()
    # The mask's bounding box starts at x = 1: with slabs of 4, x = 5..8 is a slab with no
    # masked voxel (skipped), between two that have some.
    mask[5:9] = False
    assert mask[1:5].any() and mask[9:].any() and not mask[0].any()
    coefficients = np.where(mask[..., None],
                            rng.normal(0, 0.1, mask.shape + (n_coeffs(ORDER) + 2,)), 0)
    coefficients[..., 0] = np.where(mask, 0.3, 0)
    coefficients[..., -2:] = np.where(mask[..., None], np.abs(coefficients[..., -2:]), 0)
    tissues = ("wm", "gm", "csf")
    result = pretrained.apply_correction(correction, coefficients, mask, tissues, slab=4)
    volume = torch.as_tensor(coefficients, dtype=torch.float32).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        whole = correction(torch.nn.functional.pad(volume, (1,) * 6), tissues)
    expected = whole[0, :, 1:-1, 1:-1, 1:-1].permute(1, 2, 3, 0).numpy()
    expected[~mask] = 0
    assert result.dtype == np.float32 and result.shape == coefficients.shape
    assert np.abs(result - expected).max() < 1e-5 * np.abs(expected).max()
    # The correction changed something: the check can fail.
    assert np.abs(expected - np.where(mask[..., None], coefficients, 0)).max() > 1e-3
