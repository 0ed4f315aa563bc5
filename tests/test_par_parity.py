"""The sampler's parity blocks (esdmri.reconst.refine.sampler_parity) and the loss through them."""

from unittest import mock

import numpy as np
import torch

import esdmri.reconst.refine as refine
from esdmri.reconst.losses import LossWeights
from esdmri.reconst.network import SAMPLING_NSIDE, build_fodf_sampler
from esdmri.shm import n_coeffs, sh_matrix
from esdmri.sphere import HealpixSphere


def _same_axis(a, b):
    """Whether two unit vectors are the same axis (antipodes identified)."""
    return min(np.abs(a - b).max(), np.abs(a + b).max()) < 1e-9


def test_orbits_are_the_grids_mirror_images():
    """On the sampler's own grid every orbit is a point and its mirror images under x -> -x,
    y -> -y and both (antipode identified), checked on the vertices, not the matrix."""
    vertices = HealpixSphere(SAMPLING_NSIDE, hemisphere=True).vertices
    parity = refine.sampler_parity(build_fodf_sampler(12))
    orbits = parity["orbits"].numpy()
    assert orbits.shape == (4, 88) and len(parity["rest"]) == 32
    assert sorted(np.concatenate([orbits.ravel(), parity["rest"].numpy()])) == list(range(384))
    mirrors = [np.array(m) for m in ((1, 1, 1), (1, -1, 1), (-1, 1, 1), (-1, -1, 1))]
    for rows in orbits.T:
        images = [vertices[rows[0]] * m for m in mirrors]
        members = [vertices[row] for row in rows]
        # The members are the four mirror images, one each.
        matched = [[i for i, image in enumerate(images) if _same_axis(member, image)]
                   for member in members]
        assert sorted(i for found in matched for i in found) == [0, 1, 2, 3]
    assert sum(len(c) for c in parity["classes"]) == n_coeffs(12)


def test_no_blocks_without_symmetry():
    vertices = np.random.default_rng(0).normal(size=(100, 3))
    vertices /= np.linalg.norm(vertices, axis=1, keepdims=True)
    assert refine.sampler_parity(torch.as_tensor(sh_matrix(8, vertices))) is None


def test_loss_through_the_blocks_equals_the_single_product():
    """float64, SH order 8 on the HEALPix grid: value and gradient with the parity blocks equal
    those of the single stacked product (the function patched to find none)."""
    rng = np.random.default_rng(1)
    order, n, n_measurements = 8, 70, 60
    n_wm = n_coeffs(order)
    sampler = build_fodf_sampler(order).double()
    matrix = torch.as_tensor(rng.normal(0, 0.3, (n_wm + 2, n_measurements)))
    coefficients = torch.as_tensor(rng.normal(0, 0.01, (n, n_wm + 2)))
    measured = torch.as_tensor(rng.uniform(0, 1, (n, n_measurements)))
    weights = LossWeights(intensity=0.7, sparsity=2e-4, nonnegativity=0.3)
    blocks = refine.VoxelLoss(matrix, sampler, n_wm, weights)
    assert len(blocks.blocks) == 4
    with mock.patch.object(refine, "sampler_parity", return_value=None):
        single = refine.VoxelLoss(matrix, sampler, n_wm, weights)
    assert not single.blocks
    gradient, loss = blocks(coefficients, *blocks.project(measured), return_loss=True)
    expected_gradient, expected = single(coefficients, *single.project(measured),
                                         return_loss=True)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-10, atol=1e-15)
