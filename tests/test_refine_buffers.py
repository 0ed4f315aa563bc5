"""The refinement's reused buffers (issue 28) keep what it computes: the objective
evaluated into buffers that hold another point's values, and the L-BFGS that swaps them,
against independent references (autograd of the plain formula, scipy's L-BFGS-B)."""

import torch
from scipy.optimize import minimize
from test_refine import (COUPLED, ORDER, field, phantom,  # noqa: F401
                         plain_voxel_loss, refine_field)

from esdmri.reconst.losses import LossWeights, neighbour_pairs, total_variation
from esdmri.reconst.network import SAMPLING_NSIDE, stacked_forward_matrix
from esdmri.reconst.refine import (CoupledObjective, coupling_scale, noise_variance,
                                   pair_distances, signal_similarity)
from esdmri.reconst.sampler_parity import parity_order
from esdmri.shm import n_coeffs, sh_matrix
from esdmri.sphere import HealpixSphere


def coupled_problem(phantom, field, weights, tv, class_order=False):  # noqa: F811
    """The refinement's objective on the field's masked voxels, in float64, with the
    pair weights ``refine_coefficients`` gives ``COUPLED``'s options; with
    ``class_order`` the coefficients in the sampler's parity-class order, as
    ``refine_coefficients`` orders them (its products split by class, and the signal
    term by increments)."""
    signal, mask, start = field
    matrix = torch.as_tensor(stacked_forward_matrix(phantom.response.normalized(),
                                                    phantom.gtab, ORDER))
    sampler = torch.as_tensor(sh_matrix(ORDER, HealpixSphere(SAMPLING_NSIDE,
                                                             hemisphere=True).vertices))
    start = torch.as_tensor(start[mask])
    if class_order:
        order = parity_order(sampler, len(matrix))
        matrix, start = matrix[order], start[:, order]
        sampler = sampler[:, order[:sampler.shape[1]]]
    measured = torch.as_tensor(signal[mask], dtype=torch.float64)
    first, second = neighbour_pairs(mask)
    distances = pair_distances(measured, first, second)
    variance = noise_variance(distances)
    pair_weights = (signal_similarity(distances, variance)
                    * tv * coupling_scale(variance, measured.shape[1]))
    objective = CoupledObjective(measured, matrix, sampler, n_coeffs(ORDER), weights, first,
                                 second, pair_weights, COUPLED["smoothing"], batch_voxels=37)
    return objective, measured, matrix, sampler, start, pair_weights


def test_objective_into_reused_buffers_is_the_autograd_gradient(phantom, field):  # noqa: F811
    """Evaluated into a gradient buffer full of another point's gradient, after the pairs'
    buffer held another point's differences, the objective equals the plain formula's
    value and autograd gradient (float64), as a fresh evaluation does."""
    weights = LossWeights()
    objective, measured, matrix, sampler, start, pair_weights = coupled_problem(
        phantom, field, weights, COUPLED["total_variation"])
    n_wm = n_coeffs(ORDER)
    other = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64)
    buffer = torch.empty_like(start)
    objective(other, out=buffer)  # the buffers now hold the other point's values
    value, gradient = objective(start, out=buffer)
    assert gradient.data_ptr() == buffer.data_ptr()
    reference = start.clone().requires_grad_(True)
    first, second = objective.first, objective.second
    expected = (plain_voxel_loss(reference, measured, matrix, sampler, n_wm, weights).sum()
                + total_variation(reference, first, second, pair_weights, COUPLED["smoothing"]))
    expected_gradient = torch.autograd.grad(expected, reference)[0]
    expected = float(expected.detach())
    assert abs(value - expected) < 1e-12 * abs(expected)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-10, atol=1e-12)
    fresh_value, fresh_gradient = objective(start)
    assert fresh_value == value
    torch.testing.assert_close(fresh_gradient, gradient, rtol=1e-12, atol=1e-15)


def test_lbfgs_reaches_scipys_minimum_of_a_convex_objective(phantom, field):  # noqa: F811
    """On the convex objective (signal fit, non-negativity, total variation; no Cauchy
    sparsity), the projected L-BFGS with its swapped buffers and preconditioner stops
    where scipy's L-BFGS-B (float64, the same bound) does."""
    convex = LossWeights(sparsity=0.0)
    objective, *_, start, _ = coupled_problem(phantom, field, convex,
                                              COUPLED["total_variation"])
    n_wm = n_coeffs(ORDER)
    signal, mask, start_field = field
    _, history = refine_field(phantom, phantom.gtab, signal, mask, start_field, convex,
                              dtype=torch.float64, steps=600, tolerance=1e-12,
                              check_every=5, **COUPLED)
    shape = start.shape

    def value_and_gradient(x):
        value, gradient = objective(torch.as_tensor(x.reshape(shape)))
        return value, gradient.numpy().ravel()

    bounds = [(None, None) if column < n_wm else (0, None)
              for _ in range(shape[0]) for column in range(shape[1])]
    reference = minimize(value_and_gradient, start.numpy().ravel(), jac=True,
                         method="L-BFGS-B", bounds=bounds,
                         options=dict(maxiter=20000, maxfun=40000, ftol=1e-15, gtol=1e-11))
    ours, theirs = history[-1], reference.fun / shape[0]
    print(f"ours {ours:.12g} ({history.evaluations} evaluations), scipy {theirs:.12g} "
          f"({reference.nfev} evaluations)")
    assert abs(ours - theirs) < 1e-7 * theirs
