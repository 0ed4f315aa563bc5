"""Apparent diffusivities of a response (esdmri.response.apparent_diffusivities)."""

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from dipy.sims.voxel import single_tensor

from esdmri.response import TissueResponse, apparent_diffusivities, estimate_response


@pytest.mark.parametrize("evals", [(1.7e-3, 0.3e-3, 0.3e-3), (1.2e-3, 0.6e-3, 0.6e-3)])
def test_tensor_response_gives_its_eigenvalues(evals):
    # Analytic case: the zonal series of an axially symmetric tensor, summed
    # back along and across its axis, is exp(-b lambda) up to its truncation.
    bvals = np.array([0.0, 1000.0, 2000.0, 3000.0])
    response = TissueResponse.from_tensors(bvals, evals, s0=100.0, sh_order_max=12)
    shells, axial, radial, fa = apparent_diffusivities(response)
    np.testing.assert_array_equal(shells, bvals[1:])
    np.testing.assert_allclose(axial, evals[0], rtol=5e-3)
    np.testing.assert_allclose(radial, evals[1], rtol=5e-3)
    a, r = evals[0], evals[1]
    np.testing.assert_allclose(fa, abs(a - r) / np.sqrt(a * a + 2 * r * r), atol=5e-3)


def test_estimated_response_of_a_tensor_agrees_with_dipy_dti():
    # Noise-free single-tensor voxels along random axes: the estimated
    # response's apparent diffusivities are DIPY's DTI eigenvalues.
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(60, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    gtab = gradient_table(np.r_[0, 0, np.full(60, 1000.0)], bvecs=np.r_[[[0, 0, 0]] * 2,
                                                                         directions])
    evals = np.array([1.5e-3, 0.4e-3, 0.4e-3])
    axes = rng.normal(size=(8, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    data = np.empty((8, 1, 1, len(gtab.bvals)))
    for i, axis in enumerate(axes):
        other = np.cross(axis, [1.0, 0.0, 0.0] if abs(axis[0]) < 0.9 else [0.0, 1.0, 0.0])
        other /= np.linalg.norm(other)
        evecs = np.column_stack([axis, other, np.cross(axis, other)])
        data[i, 0, 0] = single_tensor(gtab, 100.0, evals=evals, evecs=evecs)
    response = estimate_response(gtab, data, tissues=("wm",))
    _, axial, radial, _ = apparent_diffusivities(response)
    dti = TensorModel(gtab).fit(data[0, 0, 0]).evals
    np.testing.assert_allclose(axial, dti[0], rtol=1e-3)
    np.testing.assert_allclose(radial, dti[1:].mean(), rtol=1e-3)


@pytest.mark.parametrize("snr", [0.0, 0.3, 1.0, 3.0, 30.0])
def test_rician_mean_matches_scipy(snr):
    from scipy.stats import rice

    from esdmri.response import rician_mean

    sigma = 0.1
    assert rician_mean(np.array([snr * sigma]), sigma)[0] == pytest.approx(
        rice.mean(snr, scale=sigma), rel=1e-9)


def test_rician_mean_at_high_snr_and_without_noise():
    from esdmri.response import rician_mean

    # E[M] = S + sigma^2 / (2 S) + O(sigma^4 / S^3) (scipy's rice fails there).
    for signal in (1e3, 1e5):
        assert rician_mean(np.array([signal]), 1.0)[0] == pytest.approx(
            signal + 0.5 / signal, rel=1e-9)
    assert rician_mean(np.array([0.5]), 0.0)[0] == 0.5


def test_rician_fit_recovers_a_sharp_response_at_snr_10():
    # Single-fibre voxels of DIPY's tensor with Rician noise at SNR 10: along
    # the fibre at b = 3000 the signal (0.6 % of s0) lies on the noise floor.
    # Taking magnitudes as the signal makes the response far too fat (under
    # 0.4 of the axial diffusivity); the Rician fit comes back to 0.7-1.15 of it
    # (0.75-0.96 over seven noise seeds: the kept voxels are the 40 of highest,
    # noisy, FA).
    rng = np.random.default_rng(1)
    directions = rng.normal(size=(64, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bvals = np.r_[np.zeros(4), np.full(64, 1000.0), np.full(64, 3000.0)]
    gtab = gradient_table(bvals, bvecs=np.r_[np.zeros((4, 3)), directions, directions])
    evals = np.array([1.7e-3, 0.3e-3, 0.3e-3])
    # 2000 voxels: the estimator keeps 2 % of them (40).
    n = 2000
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    data = np.empty((n, 1, 1, len(bvals)))
    for i, axis in enumerate(axes):
        other = np.cross(axis, [1.0, 0.0, 0.0] if abs(axis[0]) < 0.9 else [0.0, 1.0, 0.0])
        other /= np.linalg.norm(other)
        evecs = np.column_stack([axis, other, np.cross(axis, other)])
        clean = single_tensor(gtab, 100.0, evals=evals, evecs=evecs)
        real, imaginary = rng.normal(scale=10.0, size=(2, len(bvals)))
        data[i, 0, 0] = np.hypot(clean + real, imaginary)
    for rician, low, high in ((True, 0.7, 1.15), (False, 0.0, 0.4)):
        response = estimate_response(gtab, data, tissues=("wm",), rician=rician)
        _, axial, _, _ = apparent_diffusivities(response)
        assert low * evals[0] < axial[-1] < high * evals[0], (rician, axial)
