import numpy as np
import pytest
from dipy.core.sphere import sphere2cart
from dipy.data import get_sphere
from dipy.io.peaks import load_pam, save_pam
from dipy.reconst.dirspeed import peak_directions
from dipy.reconst.odf import gfa
from dipy.reconst.shm import sf_to_sh, sh_to_sf
from dipy.sims.voxel import multi_tensor_odf

from esdmri.peaks import (
    default_peak_sphere,
    peaks_from_sh,
    peaks_threshold_sweep,
    peaks_to_dipy,
    sh_order_from_coeffs,
)

DENSE = get_sphere(name="repulsion724").subdivide(n=1)
EVALS = np.array([[1.7e-3, 0.2e-3, 0.2e-3]] * 3)


def unit(theta_deg, phi_deg):
    return np.array(sphere2cart(1, np.radians(theta_deg), np.radians(phi_deg)))


def fodf_sh(angles, fractions, sh_order_max=8, basis_type="descoteaux07"):
    """SH of a multi-tensor ODF with fibres at (theta, phi) angles in degrees."""
    odf = multi_tensor_odf(DENSE.vertices, EVALS[:len(angles)], angles, fractions)
    return sf_to_sh(odf, DENSE, sh_order_max=sh_order_max, basis_type=basis_type,
                    legacy=False)


def axis_angle(a, b):
    return np.degrees(np.arccos(np.clip(abs(np.dot(a, b)), 0, 1)))


def random_fodfs(n_voxels, seed=0):
    """Varied fODFs: 1 to 3 random fibres plus SH noise (spurious small lobes)."""
    rng = np.random.default_rng(seed)
    coeffs = []
    for _ in range(n_voxels):
        k = rng.integers(1, 4)
        angles = list(zip(rng.uniform(0, 180, k), rng.uniform(0, 360, k)))
        fractions = rng.dirichlet(np.ones(k)) * 100
        coeffs.append(fodf_sh(angles, fractions))
    coeffs = np.array(coeffs)
    return coeffs + rng.normal(scale=0.02, size=coeffs.shape) * np.abs(coeffs[:, :1])


@pytest.mark.parametrize("separation", [55, 70, 90])
def test_two_fibre_fodf_peaks_found_within_three_degrees(separation):
    angles = [(60, 20), (60 + separation, 50)]
    true = [unit(*a) for a in angles]
    directions, values = peaks_from_sh(fodf_sh(angles, [60, 40]), relative_peak_threshold=0.2)
    assert directions.shape == (5, 3) and values.shape == (5,)
    assert np.isfinite(directions[:2]).all() and np.isnan(directions[2:]).all()
    assert np.all(values[2:] == 0) and values[0] >= values[1] > 0
    # The larger fibre gives the larger peak.
    assert axis_angle(directions[0], true[0]) < 3
    assert axis_angle(directions[1], true[1]) < 3
    np.testing.assert_allclose(np.linalg.norm(directions[:2], axis=-1), 1)


def test_matches_dipy_peak_directions_voxel_by_voxel():
    coeffs = random_fodfs(12).reshape(3, 4, -1)
    directions, values = peaks_from_sh(coeffs, sphere=DENSE, relative_peak_threshold=0.25,
                                       min_separation_angle=20, npeaks=3)
    odfs = sh_to_sf(coeffs, DENSE, sh_order_max=8, basis_type="descoteaux07", legacy=False)
    for idx in np.ndindex(3, 4):
        ref_dirs, ref_values, _ = peak_directions(
            odfs[idx], DENSE, relative_peak_threshold=0.25, min_separation_angle=20)
        n = min(3, len(ref_values))
        # A full sphere holds both v and -v: DIPY may report either.
        np.testing.assert_allclose(
            np.abs(np.sum(directions[idx][:n] * ref_dirs[:n], axis=-1)), 1)
        np.testing.assert_allclose(values[idx][:n], ref_values[:n], rtol=1e-10)
        assert np.isnan(directions[idx][n:]).all() and np.all(values[idx][n:] == 0)


def test_threshold_sweep_equals_separate_searches():
    coeffs = random_fodfs(30, seed=1)
    thresholds = [0.9, 0.05, 0.3, 0.5, 0.7]
    seen = []
    for threshold, directions, values in peaks_threshold_sweep(coeffs, thresholds, npeaks=4):
        ref_dirs, ref_values = peaks_from_sh(coeffs, relative_peak_threshold=threshold,
                                             npeaks=4)
        np.testing.assert_array_equal(directions, ref_dirs)
        np.testing.assert_array_equal(values, ref_values)
        seen.append(threshold)
    assert seen == thresholds
    # The sweep is not trivial: higher thresholds drop peaks in some voxels.
    n_low = np.isfinite(peaks_from_sh(coeffs, relative_peak_threshold=0.05)[0][..., 0]).sum()
    n_high = np.isfinite(peaks_from_sh(coeffs, relative_peak_threshold=0.9)[0][..., 0]).sum()
    assert n_high < n_low


def test_mask_zero_voxels_and_npeaks():
    one = fodf_sh([(90, 0), (90, 90), (0, 0)], [34, 33, 33])
    coeffs = np.stack([one, np.zeros_like(one), one, np.full_like(one, np.nan), -one])
    mask = np.array([True, True, False, True, True])
    directions, values = peaks_from_sh(coeffs, mask=mask, npeaks=2,
                                       relative_peak_threshold=0.1)
    assert directions.shape == (5, 2, 3)
    assert np.isfinite(directions[0]).all()  # 3 fibres, only the 2 largest kept
    # Empty, masked out, failed (NaN) and nowhere-positive fODFs have no peaks.
    assert np.isnan(directions[1:]).all() and np.all(values[1:] == 0)


def test_tournier_basis_gives_same_peaks():
    angles = [(40, 10), (110, 80)]
    d1, v1 = peaks_from_sh(fodf_sh(angles, [50, 50]))
    d2, v2 = peaks_from_sh(fodf_sh(angles, [50, 50], basis_type="tournier07"),
                           basis_type="tournier07")
    np.testing.assert_allclose(d1, d2, atol=1e-12)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)


def test_peaks_to_dipy_round_trips_through_pam5(tmp_path):
    coeffs = random_fodfs(8, seed=2).reshape(2, 2, 2, -1)
    coeffs[1, 1, 1] = 0
    directions, values = peaks_from_sh(coeffs)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    pam = peaks_to_dipy(directions, values, coeffs, affine=affine)

    assert np.all(pam.peak_dirs[np.isnan(directions)] == 0)
    has_peak = pam.peak_indices >= 0
    np.testing.assert_array_equal(has_peak, np.isfinite(directions[..., 0]))
    # Peaks are sphere vertices: indices point at them exactly.
    vertices = default_peak_sphere().vertices
    np.testing.assert_allclose(vertices[pam.peak_indices[has_peak]], directions[has_peak])
    odfs = sh_to_sf(coeffs, default_peak_sphere(), sh_order_max=8,
                    basis_type="descoteaux07", legacy=False)
    np.testing.assert_allclose(pam.gfa, np.nan_to_num(gfa(odfs)))
    # DIPY's peaks_from_model: (peak - fODF min) / largest peak of the volume.
    expected_qa = np.where(has_peak, values - odfs.min(axis=-1, keepdims=True), 0)
    np.testing.assert_allclose(pam.qa, expected_qa / values.max())

    save_pam(str(tmp_path / "peaks.pam5"), pam)
    loaded = load_pam(str(tmp_path / "peaks.pam5"))
    np.testing.assert_allclose(loaded.peak_dirs, pam.peak_dirs)
    np.testing.assert_allclose(loaded.peak_values, values)
    np.testing.assert_array_equal(loaded.peak_indices, pam.peak_indices)
    np.testing.assert_allclose(loaded.shm_coeff, coeffs)
    np.testing.assert_allclose(loaded.affine, affine)


def test_sh_order_from_coeffs():
    assert [sh_order_from_coeffs(c) for c in (1, 6, 15, 45, 91)] == [0, 2, 4, 8, 12]
    with pytest.raises(ValueError, match="shm_coeff"):
        sh_order_from_coeffs(10)


def test_bad_input_names_the_argument():
    coeffs = np.zeros((2, 15))
    with pytest.raises(ValueError, match="shm_coeff"):
        peaks_from_sh(np.zeros((2, 16)))
    with pytest.raises(ValueError, match="mask"):
        peaks_from_sh(coeffs, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="relative_peak_threshold"):
        peaks_from_sh(coeffs, relative_peak_threshold=1.5)
    with pytest.raises(ValueError, match="basis_type"):
        peaks_from_sh(coeffs, basis_type="mrtrix")
    with pytest.raises(ValueError, match="npeaks"):
        peaks_from_sh(coeffs, npeaks=0)
    with pytest.raises(TypeError, match="sphere"):
        peaks_from_sh(coeffs, sphere=np.eye(3))
    with pytest.raises(ValueError, match="thresholds"):
        next(peaks_threshold_sweep(coeffs, []))
    with pytest.raises(ValueError, match="directions"):
        peaks_to_dipy(np.zeros((3, 5, 3)), np.zeros((3, 5)), coeffs)
