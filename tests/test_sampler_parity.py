"""The sampler's parity split (esdmri.reconst.sampler_parity) against the single stacked
product: the orbits on the grid itself, the loss and gradient, and the refinement."""

from unittest import mock

import numpy as np
import pytest
import torch
from test_fused_objective import threads  # noqa: F401
from test_refine import COUPLED, field, phantom, refine_field  # noqa: F401

from esdmri.reconst import fused_objective, sampler_parity
from esdmri.reconst.losses import LossWeights
from esdmri.reconst.network import SAMPLING_NSIDE, build_fodf_sampler
from esdmri.reconst.refine import VoxelLoss
from esdmri.shm import n_coeffs, sh_matrix
from esdmri.sphere import HealpixSphere


def _same_axis(a, b):
    """Whether two unit vectors are the same axis (antipodes identified)."""
    return min(np.abs(a - b).max(), np.abs(a + b).max()) < 1e-9


def test_orbits_are_the_grids_mirror_images():
    """On the sampler's own grid every orbit is a point and its images under x -> -x,
    y -> -y and both (antipodes identified), checked on the vertices, not the matrix; the
    classes hold every coefficient once."""
    vertices = HealpixSphere(SAMPLING_NSIDE, hemisphere=True).vertices
    parity = sampler_parity.sampler_parity(build_fodf_sampler(12))
    orbits = parity["orbits"].numpy()
    assert orbits.shape == (4, 88) and len(parity["rest"]) == 32
    assert sorted(np.concatenate([orbits.ravel(), parity["rest"].numpy()])) == list(range(384))
    mirrors = [np.array(m) for m in ((1, 1, 1), (1, -1, 1), (-1, 1, 1), (-1, -1, 1))]
    for rows in orbits.T:
        images = [vertices[rows[0]] * m for m in mirrors]
        matched = [i for row in rows for i, image in enumerate(images)
                   if _same_axis(vertices[row], image)]
        assert sorted(matched) == [0, 1, 2, 3]
    classes = parity["classes"]
    assert [len(c) for c in classes] == [28, 21, 21, 21]
    assert sorted(torch.cat(classes).tolist()) == list(range(n_coeffs(12)))


def test_no_split_without_the_symmetry_or_out_of_class_order():
    """A random sphere has no parity; the grid's sampler in its own (degree) order has one
    but no contiguous classes: both evaluate through the single product."""
    rng = np.random.default_rng(0)
    vertices = rng.normal(size=(100, 3))
    vertices /= np.linalg.norm(vertices, axis=1, keepdims=True)
    random = torch.as_tensor(sh_matrix(8, vertices))
    assert sampler_parity.sampler_parity(random) is None
    assert sampler_parity.parity_order(random, n_coeffs(8) + 2) is None
    weights = LossWeights()
    matrix = torch.as_tensor(rng.normal(size=(n_coeffs(8) + 2, 30)))
    assert VoxelLoss(matrix, random, n_coeffs(8), weights).split is None
    assert VoxelLoss(matrix, build_fodf_sampler(8).double(), n_coeffs(8), weights).split is None


def _class_order_losses(order, n_measurements, n, dtype, rng):
    """A random forward matrix and signals, the grid's sampler, the coefficients in class
    order: the split loss, the torch reference on the same inputs, and the signals."""
    n_wm = n_coeffs(order)
    sampler = build_fodf_sampler(order).to(dtype)
    permutation = sampler_parity.parity_order(sampler, n_wm + 2)
    matrix = torch.as_tensor(rng.normal(0, 0.3, (n_wm + 2, n_measurements)), dtype=dtype)
    matrix, sampler = matrix[permutation], sampler[:, permutation[:n_wm]]
    measured = torch.as_tensor(rng.uniform(0, 1, (n, n_measurements)), dtype=dtype)
    weights = LossWeights(intensity=0.7, sparsity=2e-2, nonnegativity=0.3)
    split = VoxelLoss(matrix, sampler, n_wm, weights)
    assert split.split is not None
    with mock.patch.object(fused_objective, "ENABLED", False):
        reference = VoxelLoss(matrix, sampler, n_wm, weights)
    assert reference.split is None and not reference.fused
    return split, reference, measured


def _losses(order, dtype):
    """The split loss in class order and the torch reference on the same reordered inputs."""
    rng = np.random.default_rng(order)
    n = 700
    coefficients = torch.as_tensor(rng.normal(0, 0.3, (n, n_coeffs(order) + 2)), dtype=dtype)
    split, reference, measured = _class_order_losses(order, 60, n, dtype, rng)
    return [loss(coefficients, *loss.project(measured), return_loss=True)
            for loss in (split, reference)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("order", [8, 12])
def test_split_loss_and_gradient_equal_the_single_product(order, dtype, tolerance,
                                                         threads):  # noqa: F811
    """One thread runs the serial kernel, two the parallel one."""
    (gradient, loss), (expected_gradient, expected) = _losses(order, dtype)
    # Samples of both signs: the negative part and the Cauchy term are both exercised.
    torch.testing.assert_close(loss, expected, rtol=tolerance, atol=0)
    scale = expected_gradient.abs().max()
    assert float((gradient - expected_gradient).abs().max()) <= tolerance * float(scale)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n_measurements", [60, 30])
def test_increments_from_a_reference_equal_the_single_product(dtype, tolerance, n_measurements,
                                                             threads):  # noqa: F811
    """Evaluations from a reference point that moves with them (the refinement's use: steps
    large and small, of both signs), each against the torch reference at that point; the
    state carried to the last point is the state computed there anew. With 30
    measurements ``R`` has fewer rows than coefficients (``G`` is singular)."""
    rng = np.random.default_rng(3)
    n, order = 500, 8
    loss, reference_loss, measured = _class_order_losses(order, n_measurements, n, dtype, rng)
    assert loss.incremental
    projected, constant = loss.project(measured)
    point = torch.as_tensor(rng.normal(0, 0.3, (n, n_coeffs(order) + 2)), dtype=dtype)
    state = loss.reference_state(point, projected)
    for scale in (0.3, 1e-3, 0.1, 1e-6, 0.0, 0.5):
        point = point + torch.as_tensor(rng.normal(0, scale, point.shape), dtype=dtype)
        gradient, value = loss(point, projected, constant, return_loss=True, reference=state)
        expected_gradient, expected = reference_loss(point, *reference_loss.project(measured),
                                                     return_loss=True)
        torch.testing.assert_close(value, expected, rtol=tolerance, atol=0)
        error = (gradient - expected_gradient).abs().max() / expected_gradient.abs().max()
        assert float(error) <= tolerance
    assert torch.equal(state[0], point)
    for carried, fresh in zip(state[1:], loss.reference_state(point, projected)[1:]):
        scale = float(fresh.abs().max())
        torch.testing.assert_close(carried, fresh, rtol=0, atol=tolerance * scale)


def test_no_increments_where_the_gram_matrix_costs_more():
    """With fewer measurements than half the coefficients, ``G``'s product (C x C) costs more
    than ``R``'s two (k x C each): the split evaluates from ``R``."""
    order = 8
    n_wm = n_coeffs(order)
    sampler = build_fodf_sampler(order).double()
    permutation = sampler_parity.parity_order(sampler, n_wm + 2)
    for n_measurements, incremental in ((20, False), (23, False), (24, True)):
        matrix = torch.as_tensor(np.random.default_rng(0).normal(size=(n_wm + 2, n_measurements)))
        loss = VoxelLoss(matrix[permutation], sampler[:, permutation[:n_wm]], n_wm, LossWeights())
        assert loss.split is not None and loss.incremental == incremental
    # Asked for a reference anyway, it says so by name.
    loss = VoxelLoss(matrix[permutation][:, :20], sampler[:, permutation[:n_wm]], n_wm,
                     LossWeights())
    coefficients = torch.zeros((3, n_wm + 2), dtype=torch.float64)
    projected, constant = loss.project(torch.ones((3, 20), dtype=torch.float64))
    with pytest.raises(ValueError, match="reference needs an incremental VoxelLoss"):
        loss.reference_state(coefficients, projected)
    with pytest.raises(ValueError, match="call it without reference"):
        loss(coefficients, projected, constant, reference=(coefficients, coefficients, constant))


@pytest.mark.parametrize("method, dtype", [("lbfgs", torch.float64), ("lbfgs", torch.float32),
                                           ("adam", torch.float64)])
def test_refinement_through_the_split_equals_the_single_product(phantom, field, method,  # noqa: F811
                                                                dtype):
    """The coupled refinement in class order (split products; Adam's degree groups
    reordered with the coefficients) against the one in the input order with the single
    stacked product: the same result to round-off."""
    weights = LossWeights(sparsity=1e-3)
    options = dict(COUPLED, method=method, steps=30, dtype=dtype)
    split, split_history = refine_field(phantom, phantom.gtab, *field, weights, **options)
    with mock.patch.object(sampler_parity, "ENABLED", False):
        single, single_history = refine_field(phantom, phantom.gtab, *field, weights, **options)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-3
    assert np.linalg.norm(split - single) <= tolerance * np.linalg.norm(single)
    # float32's round-off, amplified over 30 L-BFGS steps, moves the history by 4e-6
    # (the dense preconditioner) to 1.2e-5 (its degree block); float64 checks the paths.
    np.testing.assert_allclose(split_history, single_history,
                               rtol=1e-12 if dtype == torch.float64 else 3e-5)
