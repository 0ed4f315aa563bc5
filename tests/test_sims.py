import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.data import default_sphere, get_3shell_gtab
from dipy.direction import peaks_from_model
from dipy.io.gradients import read_bvals_bvecs
from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel
from scipy import ndimage
from dipy.sims.voxel import multi_tensor, single_tensor

from esdmri.shm import sh_matrix
from esdmri.sims import Phantom, default_gtab, load_phantom, make_phantom

WM_EVALS = np.array([1.7e-3, 0.3e-3, 0.3e-3])
GM_D, CSF_D = 0.8e-3, 3.0e-3
S0 = 100.0


@pytest.fixture(scope="module")
def noisy():
    return make_phantom((20, 20, 20), snr=30, seed=0)


@pytest.fixture(scope="module")
def clean():
    return make_phantom((16, 16, 16), snr=None)


def axis_angles(a, b):
    """Angles in degrees between axes a and b (..., 3)."""
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, axis=-1)), 0, 1)))


def orthonormal_frame(u):
    """3x3 matrix whose first column is u (eigenvectors for dipy sims)."""
    helper = np.array([1.0, 0, 0]) if abs(u[0]) < 0.9 else np.array([0, 1.0, 0])
    v = np.cross(u, helper)
    v /= np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)], axis=1)


def test_default_gtab_is_multishell_and_spread():
    gtab = default_gtab()
    assert gtab.bvals.shape == (196,)
    np.testing.assert_array_equal(np.unique(gtab.bvals), [0, 1000, 2000, 3000])
    assert gtab.b0s_mask.sum() == 4
    for b in (1000, 2000, 3000):
        bvecs = gtab.bvecs[gtab.bvals == b]
        assert len(bvecs) == 64
        np.testing.assert_allclose(np.linalg.norm(bvecs, axis=1), 1, atol=1e-12)
        cosines = np.abs(bvecs @ bvecs.T)
        np.fill_diagonal(cosines, 0)
        # 64 random axes come as close as ~1 degree; repulsion spreads them.
        assert np.degrees(np.arccos(cosines.max())) > 8
    # Different rotation per shell: the shells do not share directions.
    assert not np.allclose(gtab.bvecs[gtab.bvals == 1000], gtab.bvecs[gtab.bvals == 2000])


def test_same_seed_same_data_other_seed_other_noise(noisy):
    again = make_phantom((20, 20, 20), snr=30, seed=0)
    assert again == noisy
    other = make_phantom((20, 20, 20), snr=30, seed=1)
    assert not np.array_equal(other.data, noisy.data)
    np.testing.assert_array_equal(other.fibre_dirs, noisy.fibre_dirs)


def test_tissue_fractions_sum_to_one_in_mask(noisy):
    fractions = noisy.tissue_fractions
    assert fractions.min() >= 0
    np.testing.assert_allclose(fractions[noisy.mask].sum(axis=-1), 1, atol=1e-12)
    np.testing.assert_array_equal(fractions[~noisy.mask], 0)
    # Partial volume: all three tissues dominate somewhere and mix elsewhere.
    inside = fractions[noisy.mask]
    assert np.all((inside > 0.9).any(axis=0))
    assert np.count_nonzero((inside[:, 0] > 0.1) & (inside[:, 0] < 0.9)) > 50


def test_fibre_fractions_sum_to_one_where_wm(noisy):
    wm = noisy.tissue_fractions[..., 0] > 0
    np.testing.assert_allclose(noisy.fibre_fractions[wm].sum(axis=-1), 1, atol=1e-12)
    np.testing.assert_array_equal(noisy.fibre_fractions[~wm], 0)
    np.testing.assert_array_equal(noisy.n_fibres[~wm], 0)


def test_fibre_counts_match_nans_and_angles(noisy):
    present = ~np.isnan(noisy.fibre_dirs).any(axis=-1)
    assert np.array_equal(np.isnan(noisy.fibre_dirs).all(axis=-1), ~present)
    np.testing.assert_array_equal(present.sum(axis=-1), noisy.n_fibres)
    np.testing.assert_array_equal(noisy.fibre_fractions > 0, present)
    np.testing.assert_allclose(np.linalg.norm(noisy.fibre_dirs[present], axis=-1), 1,
                               atol=1e-12)
    np.testing.assert_array_equal(np.isnan(noisy.crossing_angle), noisy.n_fibres < 2)
    assert all(np.count_nonzero(noisy.n_fibres == n) > 10 for n in (1, 2, 3))


@pytest.mark.parametrize("crossing_angles", [(30, 90), (45, 70)])
def test_crossing_angles_within_range(crossing_angles):
    phantom = make_phantom((20, 20, 20), snr=None, crossing_angles=crossing_angles)
    dirs = phantom.fibre_dirs
    low, high = crossing_angles
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        both = phantom.n_fibres > j
        angles = axis_angles(dirs[both][:, i], dirs[both][:, j])
        assert np.all((angles > low - 1e-6) & (angles < high + 1e-6))
    crossing = phantom.crossing_angle[phantom.n_fibres >= 2]
    # Every quarter of the range holds crossings to evaluate on.
    counts, _ = np.histogram(crossing, np.linspace(low, high + 1e-6, 5))
    assert np.all(counts >= 5), counts
    brute = np.fmin.reduce([axis_angles(dirs[..., i, :], dirs[..., j, :])
                            for i, j in [(0, 1), (0, 2), (1, 2)]])
    np.testing.assert_allclose(phantom.crossing_angle, brute, equal_nan=True)


def test_straight_fibres_run_along_their_bundles():
    phantom = make_phantom((32, 32, 32), snr=None)
    # The WM fraction varies only across a bundle, so its gradient is
    # perpendicular to the fibres wherever a single bundle is around.
    gradient = np.stack(np.gradient(phantom.tissue_fractions[..., 0]), axis=-1)
    n = phantom.n_fibres
    alone = (ndimage.minimum_filter(n, size=3) == 1) & (ndimage.maximum_filter(n, size=3) == 1)
    alone &= np.linalg.norm(gradient, axis=-1) > 0.05
    cosines = (np.abs(np.sum(gradient[alone] * phantom.fibre_dirs[alone][:, 0], axis=-1))
               / np.linalg.norm(gradient[alone], axis=-1))
    assert alone.sum() > 200
    assert np.median(cosines) < 0.05


def test_curved_fibres_follow_the_arc_tangent():
    phantom = make_phantom((32, 32, 32), snr=None)
    # The arc lies in the ribbon's plane y = 0 (the ribbon runs along x).
    dirs = phantom.fibre_dirs[..., 0, :]
    on_arc = (phantom.n_fibres == 1) & (np.abs(dirs[..., 1]) < 1e-12)
    on_arc &= np.abs(dirs[..., 0]) < 1 - 1e-9
    positions, tangents = np.argwhere(on_arc)[:, [0, 2]], dirs[on_arc][:, [0, 2]]
    assert len(positions) > 50
    assert np.ptp(np.degrees(np.arctan2(tangents[:, 1], tangents[:, 0])) % 180) > 60
    # Tangents of one circle are perpendicular to the radius: u . (p - c) = 0.
    centre, *_ = np.linalg.lstsq(tangents, np.sum(tangents * positions, axis=1), rcond=None)
    radii = np.linalg.norm(positions - centre, axis=1)
    np.testing.assert_allclose(np.sum(tangents * (positions - centre), axis=1), 0, atol=1e-9)
    # All within one tube (radius 3.5 voxels at 40^3) of the same circle.
    assert np.ptp(radii) <= 2 * 3.5 * 32 / 40


@pytest.mark.parametrize("max_fibres", [1, 2])
def test_max_fibres_caps_the_count(max_fibres):
    phantom = make_phantom((16, 16, 16), snr=None, max_fibres=max_fibres)
    assert phantom.n_fibres.max() == max_fibres
    assert np.isnan(phantom.fibre_dirs[..., max_fibres:, :]).all()


def test_equal_and_given_fibre_fractions():
    equal = make_phantom((16, 16, 16), snr=None, fibre_fractions="equal")
    with_wm = equal.n_fibres > 0
    np.testing.assert_allclose(
        equal.fibre_fractions[with_wm].max(axis=-1), 1 / equal.n_fibres[with_wm])
    given = make_phantom((16, 16, 16), snr=None, fibre_fractions=(0.5, 0.3, 0.2))
    for n, expected in [(3, [0.5, 0.3, 0.2]), (2, [0.625, 0.375, 0]), (1, [1, 0, 0])]:
        fractions = given.fibre_fractions[given.n_fibres == n]
        np.testing.assert_allclose(fractions, np.broadcast_to(expected, fractions.shape))


def isotropic_signal(gtab, diffusivity):
    return single_tensor(gtab, S0, evals=np.full(3, diffusivity), evecs=np.eye(3))


def test_noise_free_single_fibre_matches_dipy_single_tensor(clean):
    gtab = clean.gtab
    gm, csf = isotropic_signal(gtab, GM_D), isotropic_signal(gtab, CSF_D)
    single = np.argwhere(clean.n_fibres == 1)
    # The straight ribbon, tubes and the curved arc all have single-fibre voxels.
    for voxel in single[np.linspace(0, len(single) - 1, 12).astype(int)]:
        voxel = tuple(voxel)
        wm_f, gm_f, csf_f = clean.tissue_fractions[voxel]
        fibre = single_tensor(gtab, S0, evals=WM_EVALS,
                              evecs=orthonormal_frame(clean.fibre_dirs[voxel][0]))
        np.testing.assert_allclose(clean.data[voxel], wm_f * fibre + gm_f * gm + csf_f * csf,
                                   rtol=1e-5, atol=1e-4)


def test_noise_free_crossing_matches_dipy_multi_tensor(clean):
    gtab = clean.gtab
    for n in (2, 3):
        voxel = tuple(np.argwhere(clean.n_fibres == n)[0])
        dirs = clean.fibre_dirs[voxel][:n]
        fractions = clean.fibre_fractions[voxel][:n]
        angles = np.stack([np.degrees(np.arccos(dirs[:, 2])),
                           np.degrees(np.arctan2(dirs[:, 1], dirs[:, 0]))], axis=1)
        fibres, _ = multi_tensor(gtab, np.tile(WM_EVALS, (n, 1)), S0=S0, angles=angles,
                                 fractions=100 * fractions, snr=None)
        wm_f, gm_f, csf_f = clean.tissue_fractions[voxel]
        expected = (wm_f * fibres + gm_f * isotropic_signal(gtab, GM_D)
                    + csf_f * isotropic_signal(gtab, CSF_D))
        np.testing.assert_allclose(clean.data[voxel], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dipy_gtab, sh_order_max, tolerance",
                         [(False, 12, 1e-4), (False, 16, 1e-5), (True, 16, 1e-5)])
def test_noise_free_signal_equals_response_forward_model(dipy_gtab, sh_order_max, tolerance):
    gtab = get_3shell_gtab() if dipy_gtab else None
    phantom = make_phantom((16, 16, 16), gtab=gtab, snr=None, sh_order_max=sh_order_max)
    matrices = phantom.response.forward_matrices(phantom.gtab, sh_order_max)
    mask = phantom.mask
    dirs = phantom.fibre_dirs[mask]
    dirs = np.where(np.isnan(dirs), [0.0, 0.0, 1.0], dirs)  # weight 0 where absent
    # A delta fODF along u has SH coefficients Y_lm(u).
    delta = sh_matrix(sh_order_max, dirs.reshape(-1, 3)).reshape(*dirs.shape[:2], -1)
    wm, gm, csf = np.moveaxis(phantom.tissue_fractions[mask], -1, 0)
    wm_coeffs = wm[:, None] * np.einsum("vk,vkc->vc", phantom.fibre_fractions[mask], delta)
    # An isotropic tissue of fraction f has the l = 0 coefficient f / sqrt(4 pi).
    predicted = (wm_coeffs @ matrices["wm"] + gm[:, None] @ matrices["gm"] / np.sqrt(4 * np.pi)
                 + csf[:, None] @ matrices["csf"] / np.sqrt(4 * np.pi))
    # Truncating the WM response at order 12 costs ~6e-5 of s0 at b = 3000.
    np.testing.assert_allclose(phantom.data[mask], predicted, rtol=0, atol=tolerance * S0)


def test_rician_noise_level(noisy):
    sigma = S0 / 30
    assert noisy.sigma == pytest.approx(sigma)
    # At b = 0 every tissue gives s0: the spread is the noise alone.
    b0 = noisy.data[noisy.mask][:, noisy.gtab.b0s_mask]
    assert b0.std() == pytest.approx(sigma, rel=0.04)
    assert b0.mean() == pytest.approx(np.sqrt(S0**2 + sigma**2), abs=4 * sigma / np.sqrt(b0.size))
    # The tissue-free background is Rayleigh: mean sigma sqrt(pi / 2), not 0.
    background = noisy.data[~noisy.mask]
    assert background.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.02)


# DIPY's CSD model fits in its legacy basis internally; only peaks are used.
@pytest.mark.filterwarnings("ignore:The legacy descoteaux07:PendingDeprecationWarning")
def test_csd_recovers_single_fibre_directions(clean):
    keep = clean.gtab.bvals <= 1000
    gtab = gradient_table(bvals=clean.gtab.bvals[keep], bvecs=clean.gtab.bvecs[keep])
    model = ConstrainedSphericalDeconvModel(gtab, (WM_EVALS, S0), sh_order_max=8)
    single = clean.n_fibres == 1
    peaks = peaks_from_model(model, clean.data[..., keep], default_sphere,
                             relative_peak_threshold=0.5, min_separation_angle=25,
                             mask=single, npeaks=1, return_sh=False)
    errors = axis_angles(peaks.peak_dirs[single][:, 0], clean.fibre_dirs[single][:, 0])
    assert errors.mean() < 10
    assert np.mean(errors < 10) >= 0.9


@pytest.mark.parametrize("snr", [30, None])
def test_save_load_round_trip(tmp_path, snr):
    phantom = make_phantom((12, 12, 12), snr=snr, seed=3)
    paths = phantom.save(tmp_path / "phantom")
    loaded = load_phantom(tmp_path / "phantom")
    assert isinstance(loaded, Phantom)
    assert loaded == phantom
    assert loaded.snr == snr
    bvals, bvecs = read_bvals_bvecs(str(paths["bvals"]), str(paths["bvecs"]))
    np.testing.assert_array_equal(bvals, phantom.gtab.bvals)
    np.testing.assert_array_equal(bvecs, phantom.gtab.bvecs)
    with pytest.raises(FileExistsError, match="dwi.nii.gz"):
        phantom.save(tmp_path / "phantom")
    other = make_phantom((12, 12, 12), snr=snr, seed=4, crossing_angles=(40, 80))
    other.save(tmp_path / "phantom", force=True)
    assert load_phantom(tmp_path / "phantom") == other != phantom


@pytest.mark.parametrize("kwargs, match", [
    ({"snr": 0}, "snr"),
    ({"snr": -5}, "snr"),
    ({"crossing_angles": (0, 90)}, "crossing_angles"),
    ({"crossing_angles": (30, 95)}, "crossing_angles"),
    ({"crossing_angles": (60, 30)}, "crossing_angles"),
    ({"shape": (7, 20, 20)}, "shape"),
    ({"max_fibres": 0}, "max_fibres"),
    ({"max_fibres": 4}, "max_fibres"),
    ({"fibre_fractions": (0.5, 0.4, 0.2)}, "fibre_fractions must sum to 1"),
    ({"fibre_fractions": (0.5, 0.5)}, "fibre_fractions"),
    ({"wm_evals": (1.7e-3, 0.3e-3, 0.2e-3)}, "wm_evals"),
])
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_phantom(**{"shape": (12, 12, 12), **kwargs})


def test_bad_types_raise():
    with pytest.raises(TypeError, match="gtab"):
        make_phantom((12, 12, 12), gtab="bvals.txt")
    with pytest.raises(TypeError, match="shape"):
        make_phantom((12.5, 12, 12))
