import warnings

import healpy as hp
import numpy as np
import pytest
from dipy.core.gradients import gradient_table, unique_bvals_tolerance
from dipy.data import get_3shell_gtab, get_isbi2013_2shell_gtab
from dipy.reconst.mcsd import (MultiShellDeconvModel, mask_for_response_msmt,
                               multi_shell_fiber_response, response_from_mask_msmt)
from dipy.reconst.shm import real_sh_descoteaux, sph_harm_ind_list
from dipy.sims.voxel import multi_tensor, single_tensor
from scipy.integrate import dblquad

from esdmri.response import TissueResponse, tensor_zonal_coefficients
from esdmri.shm import group_shells, n_coeffs, sh_matrix

WM_EVALS = np.array([1.7e-3, 0.3e-3, 0.3e-3])
SQRT_4PI = np.sqrt(4 * np.pi)


@pytest.fixture(autouse=True)
def quiet_dipy():
    # DIPY warns about b > 1200 for DTI and about deprecated defaults.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def gtab_3shell():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_3shell_gtab()


def frame_with_first_axis(direction):
    """Orthonormal frame (columns) whose first column is ``direction``."""
    direction = np.asarray(direction, dtype=float) / np.linalg.norm(direction)
    helper = np.eye(3)[np.argmin(np.abs(direction))]
    second = np.cross(direction, helper)
    second /= np.linalg.norm(second)
    return np.column_stack([direction, second, np.cross(direction, second)])


def healpix_vertices(nside):
    return np.stack(hp.pix2vec(nside, np.arange(12 * nside**2), nest=True), axis=1)


def spherical_mean(bval, evals, s0=1.0):
    """Mean of ``s0 exp(-b g^T diag(evals) g)`` over the sphere, by adaptive cubature."""
    def integrand(theta, phi):
        g = np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi),
                      np.cos(theta)])
        return np.exp(-bval * np.dot(evals, g**2)) * np.sin(theta)

    integral, _ = dblquad(integrand, 0, 2 * np.pi, 0, np.pi, epsabs=1e-13, epsrel=1e-12)
    return s0 * integral / (4 * np.pi)


# ---------------------------------------------------------------- analytic responses

def test_from_tensors_matches_dipy_multi_shell_fiber_response():
    bvals = np.array([0.0, 1000.0, 2000.0, 3500.0])
    ours = TissueResponse.from_tensors(bvals, sh_order_max=8, s0={"wm": 1.0, "gm": 1.2,
                                                                  "csf": 2.0})
    rows = np.ones((3, 1))
    dipy = multi_shell_fiber_response(
        8, bvals, np.hstack([np.tile(WM_EVALS, (3, 1)), rows]),
        np.hstack([np.full((3, 3), 0.8e-3), 1.2 * rows]),
        np.hstack([np.full((3, 3), 3.0e-3), 2.0 * rows]))
    # DIPY layout: columns [csf, gm, wm_l0, wm_l2, ...], b0 row first.
    np.testing.assert_allclose(ours["wm"], dipy.response[:, 2:], atol=1e-5)
    np.testing.assert_allclose(ours["gm"][:, 0], dipy.response[:, 1], rtol=1e-12)
    np.testing.assert_allclose(ours["csf"][:, 0], dipy.response[:, 0], rtol=1e-12)
    np.testing.assert_allclose(ours["gm"][:, 0], 1.2 * np.exp(-bvals * 0.8e-3) * SQRT_4PI)
    # And our own export to DIPY reproduces that layout.
    np.testing.assert_allclose(ours.to_dipy().response, dipy.response, atol=1e-5)
    np.testing.assert_allclose(ours.to_dipy().S0, [2.0, 1.2, 1.0])


def test_zonal_projection_is_exact_for_non_axisymmetric_tensor():
    # The l = 0 coefficient is sqrt(4 pi) times the spherical mean.
    evals = np.array([1.9e-3, 0.5e-3, 0.1e-3])
    coefficients = tensor_zonal_coefficients([0.0, 3000.0], evals, 2.0, 8)
    assert coefficients.shape == (2, 5)
    np.testing.assert_allclose(coefficients[0], [2.0 * SQRT_4PI, 0, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(coefficients[1, 0] / SQRT_4PI,
                               spherical_mean(3000.0, evals, 2.0), rtol=1e-10)


# ---------------------------------------------------------------- forward model

@pytest.mark.parametrize("direction", [[0.0, 0.0, 1.0], [0.3, -0.5, 0.8], [1.0, 1.0, 0.0]])
def test_forward_of_delta_fodf_is_the_tensor_signal(gtab_3shell, direction):
    response = TissueResponse.from_tensors([0, 1000, 2000, 3500], s0=1.0, sh_order_max=12)
    matrices = response.forward_matrices(gtab_3shell, sh_order_max=12)
    assert set(matrices) == {"wm", "gm", "csf"}
    assert matrices["wm"].shape == (n_coeffs(12), len(gtab_3shell.bvals))
    assert matrices["gm"].shape == matrices["csf"].shape == (1, len(gtab_3shell.bvals))
    delta = sh_matrix(12, np.array([direction]))[0]  # unit-integral delta, even part
    predicted = delta @ matrices["wm"]
    expected = single_tensor(gtab_3shell, 1.0, evals=WM_EVALS,
                             evecs=frame_with_first_axis(direction))
    np.testing.assert_allclose(predicted, expected, atol=1e-3)
    # Isotropic tissue with fODF integral f predicts f exp(-b D), b of the
    # response row matching the volume's shell.
    _, shell_index = group_shells(gtab_3shell)
    np.testing.assert_allclose(0.25 / SQRT_4PI * matrices["csf"][0],
                               0.25 * np.exp(-response.bvals[shell_index] * 3.0e-3), rtol=1e-12)


def test_forward_matches_dipy_msmt_prediction():
    """Whole forward model against DIPY's MultiShellDeconvModel.predict."""
    gtab = get_isbi2013_2shell_gtab()
    bvals = np.concatenate([[0.0, 0.0], gtab.bvals])
    bvecs = np.concatenate([np.zeros((2, 3)), gtab.bvecs])
    gtab = gradient_table(bvals, bvecs=bvecs)
    response = TissueResponse.from_tensors([0, 1500, 2500], s0={"wm": 1.0, "gm": 1.3,
                                                                "csf": 2.5}, sh_order_max=8)
    dipy_model = MultiShellDeconvModel(gtab, response.to_dipy(), sh_order_max=8)
    rng = np.random.default_rng(0)
    wm = rng.normal(size=(6, n_coeffs(8)))
    gm, csf = rng.uniform(size=(6, 1)), rng.uniform(size=(6, 1))
    # DIPY's MSMT model works in the legacy descoteaux07 basis: refit the same
    # functions there.
    vertices = healpix_vertices(8)
    theta = np.arccos(vertices[:, 2])
    phi = np.arctan2(vertices[:, 1], vertices[:, 0])
    legacy_basis, _, _ = real_sh_descoteaux(8, theta, phi, legacy=True)
    wm_legacy = np.linalg.lstsq(legacy_basis, (wm @ sh_matrix(8, vertices).T).T,
                                rcond=None)[0].T
    expected = dipy_model.predict(np.hstack([csf, gm, wm_legacy]))
    matrices = response.forward_matrices(gtab, 8)
    predicted = wm @ matrices["wm"] + gm @ matrices["gm"] + csf @ matrices["csf"]
    np.testing.assert_allclose(predicted, expected, atol=1e-10)


def test_forward_orders_gtab_without_b0_and_normalisation(gtab_3shell):
    response = TissueResponse.from_tensors([0, 1000, 2000, 3500], s0=3.0, sh_order_max=8)
    full = response.forward_matrices(gtab_3shell, 12)
    _, l_values = sph_harm_ind_list(12)
    # Orders beyond the response's are zero, lower ones are unchanged.
    assert np.all(full["wm"][l_values > 8][:, 1:] == 0)
    np.testing.assert_allclose(response.forward_matrices(gtab_3shell, 8)["wm"],
                               full["wm"][l_values <= 8])
    weighted = ~gtab_3shell.b0s_mask
    no_b0 = gradient_table(gtab_3shell.bvals[weighted], bvecs=gtab_3shell.bvecs[weighted])
    np.testing.assert_allclose(response.forward_matrices(no_b0, 12)["wm"],
                               full["wm"][:, weighted])
    normalized = response.normalized()
    for tissue in normalized.tissues:
        assert normalized[tissue][0, 0] == pytest.approx(SQRT_4PI)
        np.testing.assert_allclose(normalized[tissue], response[tissue] / 3.0)
    # b0 signal of a voxel = sum of tissue fODF integrals with a normalised response.
    matrices = normalized.forward_matrices(gtab_3shell, 8)
    fractions = {"wm": 0.5, "gm": 0.3, "csf": 0.2}
    delta = sh_matrix(8, np.array([[0.0, 1.0, 0.0]]))[0]
    signal = (fractions["wm"] * delta @ matrices["wm"]
              + sum(fractions[t] / SQRT_4PI * matrices[t][0] for t in ("gm", "csf")))
    assert signal[gtab_3shell.b0s_mask] == pytest.approx(1.0)


# ---------------------------------------------------------------- DIPY estimation

def simulated_volume(gtab, rng):
    """(4, 4, 4) volume: WM single fibres, WM crossings, GM and CSF voxels."""
    wm, crossing = [1.7e-3, 0.3e-3, 0.3e-3], [1.7e-3, 0.3e-3, 0.3e-3]
    gm_evals = np.array([0.75e-3, 0.55e-3, 0.55e-3])  # FA 0.18: GM but not CSF mask
    signals = []
    for voxel in range(64):
        kind = voxel % 4
        angles = [tuple(rng.uniform([0, 0], [180, 360]))]
        if kind == 0:
            signal, _ = multi_tensor(gtab, np.array([wm]), S0=100.0, angles=angles,
                                     fractions=[100], snr=None)
        elif kind == 1:
            angles.append((angles[0][0] + 90, angles[0][1]))
            signal, _ = multi_tensor(gtab, np.array([crossing, crossing]), S0=100.0,
                                     angles=angles, fractions=[50, 50], snr=None)
        elif kind == 2:
            signal, _ = multi_tensor(gtab, np.array([gm_evals]), S0=120.0, angles=angles,
                                     fractions=[100], snr=None)
        else:
            signal, _ = multi_tensor(gtab, np.full((1, 3), 3.0e-3), S0=200.0,
                                     angles=angles, fractions=[100], snr=None)
        signals.append(signal)
    return np.array(signals).reshape(4, 4, 4, -1), gm_evals


# esdmri keeps CSF voxels with MD above csf_md_thr (DIPY 1.12 keeps those below
# it, i.e. grey matter); 2.5e-3 separates the CSF (3e-3) from everything else.
MSMT_THRESHOLDS = dict(roi_radii=10, gm_md_thr=0.0008, csf_md_thr=0.0025)
# DIPY's inverted CSF test picks the same CSF voxels here with a threshold above them.
DIPY_THRESHOLDS = dict(MSMT_THRESHOLDS, csf_md_thr=0.0035)


def test_from_dipy_msmt_agrees_with_dipy_multi_shell_response(gtab_3shell):
    data, gm_evals = simulated_volume(gtab_3shell, np.random.default_rng(1))
    ours = TissueResponse.from_dipy_msmt(gtab_3shell, data, sh_order_max=8,
                                         **MSMT_THRESHOLDS)
    assert ours.tissues == ("wm", "gm", "csf")
    np.testing.assert_allclose(ours.bvals, [0, 1000, 2000, 3500], atol=1e-2)
    masks = mask_for_response_msmt(gtab_3shell, data, **DIPY_THRESHOLDS)
    assert [int(m.sum()) for m in masks] == [16, 16, 16]
    # Same shells as DIPY's clustering; DIPY labels a shell by its largest
    # b-value, we by the mean, so DIPY gets our labels to compare like for like.
    np.testing.assert_allclose(ours.bvals[1:], unique_bvals_tolerance(gtab_3shell.bvals)[1:],
                               atol=1e-2)
    dipy = multi_shell_fiber_response(8, ours.bvals,
                                      *response_from_mask_msmt(gtab_3shell, data, *masks))
    scale = ours["wm"][0, 0]
    np.testing.assert_allclose(ours["wm"], dipy.response[:, 2:], atol=1e-5 * scale)
    np.testing.assert_allclose(ours["csf"][:, 0], dipy.response[:, 0], rtol=1e-9)
    # Both equal the analytic ground truth of the simulation.
    truth = TissueResponse.from_tensors(ours.bvals, wm_evals=WM_EVALS, csf_diffusivity=3e-3,
                                        s0={"wm": 100.0, "gm": 120.0, "csf": 200.0},
                                        sh_order_max=8, tissues=("wm", "csf"))
    np.testing.assert_allclose(ours["wm"], truth["wm"], rtol=1e-7, atol=1e-9 * scale)
    np.testing.assert_allclose(ours["csf"], truth["csf"], rtol=1e-7)
    # GM: ours is the spherical mean of the GM tensor signal; DIPY uses
    # S0 exp(-b lambda_1), smaller for an anisotropic tensor.
    for row, bval in enumerate(ours.bvals):
        expected = SQRT_4PI * spherical_mean(bval, gm_evals, 120.0)
        assert ours["gm"][row, 0] == pytest.approx(expected, rel=1e-9)
        dipy_gm = 120.0 * np.exp(-bval * gm_evals[0]) * SQRT_4PI
        assert dipy.response[row, 1] == pytest.approx(dipy_gm, rel=1e-9)
        if bval > 0:
            assert ours["gm"][row, 0] > dipy.response[row, 1]


def test_from_dipy_msmt_reports_empty_tissue(gtab_3shell):
    data, _ = simulated_volume(gtab_3shell, np.random.default_rng(1))
    no_csf = np.ones(data.shape[:3], dtype=bool)
    no_csf.reshape(-1)[3::4] = False
    with pytest.raises(ValueError, match=r"\['csf'\]"):
        TissueResponse.from_dipy_msmt(gtab_3shell, data, mask=no_csf, **MSMT_THRESHOLDS)


def test_from_dipy_ssst_recovers_simulated_tensor(gtab_3shell):
    keep = gtab_3shell.bvals < 1500
    gtab = gradient_table(gtab_3shell.bvals[keep], bvecs=gtab_3shell.bvecs[keep])
    data, _ = simulated_volume(gtab, np.random.default_rng(2))
    response = TissueResponse.from_dipy_ssst(gtab, data, roi_radii=10, sh_order_max=8)
    assert response.tissues == ("wm",)
    truth = TissueResponse.from_tensors(response.bvals, wm_evals=WM_EVALS, s0=100.0,
                                        sh_order_max=8, tissues=("wm",))
    np.testing.assert_allclose(response["wm"], truth["wm"], rtol=1e-7, atol=1e-7)
    with pytest.raises(ValueError, match="exactly one diffusion-weighted shell"):
        TissueResponse.from_dipy_ssst(gtab_3shell, np.zeros((2, 2, 2, 193)))


# ---------------------------------------------------------------- MRtrix3 files

def test_mrtrix_round_trip(tmp_path):
    response = TissueResponse.from_tensors([0, 1000, 2000, 3000], sh_order_max=8, s0=123.4)
    files = [tmp_path / f"{t}.txt" for t in response.tissues]
    response.to_mrtrix(files)
    lines = files[0].read_text().splitlines()
    assert lines[0] == "# Shells: 0,1000,2000,3000"
    assert len(lines) == 5 and len(lines[1].split()) == 5
    assert len(files[1].read_text().splitlines()[1].split()) == 1
    back = TissueResponse.from_mrtrix(files, response.tissues)
    np.testing.assert_array_equal(back.bvals, response.bvals)
    for tissue in response.tissues:
        np.testing.assert_array_equal(back[tissue], response[tissue])
    with pytest.raises(FileExistsError, match="wm.txt"):
        response.to_mrtrix(files)
    response.normalized().to_mrtrix(files, force=True)
    assert TissueResponse.from_mrtrix(files, response.tissues)["gm"][0, 0] == pytest.approx(
        SQRT_4PI)


def test_mrtrix_files_are_written_together_or_not_at_all(tmp_path):
    response = TissueResponse.from_tensors([0, 1000, 2000, 3000], sh_order_max=8)
    # The last target's folder is missing: the first two files must not appear.
    files = [tmp_path / "wm.txt", tmp_path / "gm.txt", tmp_path / "absent" / "csf.txt"]
    with pytest.raises(FileNotFoundError, match="absent"):
        response.to_mrtrix(files)
    assert sorted(tmp_path.iterdir()) == []


def test_mrtrix_reading_like_mrtrix_writes(tmp_path):
    path = tmp_path / "wm.txt"
    path.write_text("# Shells: 0,1000\n# command_history: dwi2response dhollander\n"
                    "  1000.5 0 0\n 520.1 -210.3 40.7\n")
    response = TissueResponse.from_mrtrix(path, "wm")
    np.testing.assert_array_equal(response.bvals, [0, 1000])
    np.testing.assert_array_equal(response["wm"], [[1000.5, 0, 0], [520.1, -210.3, 40.7]])
    bare = tmp_path / "csf.txt"
    bare.write_text("3000\n900\n")
    with pytest.raises(ValueError, match="pass bvals"):
        TissueResponse.from_mrtrix(bare, "csf")
    assert TissueResponse.from_mrtrix(bare, "csf", bvals=[0, 1000])["csf"].shape == (2, 1)
    with pytest.raises(ValueError, match="disagree"):
        TissueResponse.from_mrtrix(path, "wm", bvals=[0, 3000])
    ragged = tmp_path / "ragged_wm.txt"
    ragged.write_text("# Shells: 0,1000\n1000 0 0\n500 -200\n")
    with pytest.raises(ValueError, match="ragged_wm.txt"):
        TissueResponse.from_mrtrix(ragged, "wm")
    with pytest.raises(ValueError, match="csf.txt has 2 rows"):
        TissueResponse.from_mrtrix(bare, "csf", bvals=[0, 1000, 2000])


# ---------------------------------------------------------------- validation

def test_validate_rejects_mismatched_shells(gtab_3shell):
    response = TissueResponse.from_tensors([0, 1000, 2000, 3000])
    with pytest.raises(ValueError, match=r"1000.0, 2000.0, 3000.0\].*3500.0\]"):
        response.validate(gtab_3shell)
    with pytest.raises(ValueError, match="do not match"):
        response.forward_matrices(gtab_3shell, 8)
    TissueResponse.from_tensors([0, 1000, 2000, 3500]).validate(gtab_3shell)
    TissueResponse.from_tensors([0, 1010, 2000, 3490]).validate(gtab_3shell)


def test_validate_needs_as_many_shells_as_tissues(gtab_3shell):
    keep = (gtab_3shell.bvals < 50) | ((gtab_3shell.bvals > 1500) & (gtab_3shell.bvals < 2500))
    single_shell = gradient_table(gtab_3shell.bvals[keep], bvecs=gtab_3shell.bvecs[keep])
    response = TissueResponse.from_tensors([0, 2000])
    with pytest.raises(ValueError, match=r"drop \['gm'\].*\('wm', 'csf'\)"):
        response.validate(single_shell)
    response.select_tissues(("wm", "csf")).validate(single_shell)
    keep = gtab_3shell.bvals < 1500
    response = TissueResponse.from_tensors([0, 1000])
    no_b0 = gradient_table(gtab_3shell.bvals[keep][1:], bvecs=gtab_3shell.bvecs[keep][1:])
    with pytest.raises(ValueError, match=r"drop \['csf'\]"):
        response.select_tissues(("wm", "csf")).validate(no_b0)
    assert group_shells(no_b0)[0].shape == (1,)


def test_validate_takes_three_tissues_on_b0_and_one_shell_at_b_1000(gtab_3shell):
    # One equation short there; the default fit charges the isotropic fractions.
    keep = gtab_3shell.bvals < 1500
    low = gradient_table(gtab_3shell.bvals[keep], bvecs=gtab_3shell.bvecs[keep])
    TissueResponse.from_tensors([0, 1000]).validate(low)
    # 29 axes are too few for it.
    few = keep & (np.cumsum(gtab_3shell.bvals > 500) <= 29)
    sparse = gradient_table(gtab_3shell.bvals[few], bvecs=gtab_3shell.bvecs[few])
    with pytest.raises(ValueError, match=r"drop \['gm'\]"):
        TissueResponse.from_tensors([0, 1000]).validate(sparse)


def test_constructor_rejects_bad_input():
    good = np.ones((2, 3))
    with pytest.raises(ValueError, match="tissues"):
        TissueResponse(("wm", "grey"), [0, 1000], [good, np.ones((2, 1))])
    with pytest.raises(ValueError, match="ascending"):
        TissueResponse(("wm",), [0, 2000, 1000], [np.ones((3, 3))])
    with pytest.raises(ValueError, match="b0 row"):
        TissueResponse(("wm",), [1000, 2000], [good])
    with pytest.raises(ValueError, match=r"'wm' must have shape \(3, L/2 \+ 1\)"):
        TissueResponse(("wm",), [0, 1000, 2000], [good])
    with pytest.raises(ValueError, match="ragged"):
        TissueResponse(("wm",), [0, 1000], [[[1.0, 0.0], [1.0]]])
    with pytest.raises(ValueError, match="one column"):
        TissueResponse(("wm", "csf"), [0, 1000], [good, good])
    with pytest.raises(ValueError, match="one array per tissue"):
        TissueResponse(("wm", "csf"), [0, 1000], [good])
    with pytest.raises(TypeError, match="sequence of names"):
        TissueResponse("wm", [0, 1000], [good])


def test_response_is_immutable():
    response = TissueResponse.from_tensors([0, 1000], sh_order_max=4)
    assert response.sh_order_max == 4 and response.n_shells == 2
    with pytest.raises(AttributeError):
        response.bvals = np.array([0, 2000])
    with pytest.raises(ValueError, match="read-only"):
        response["wm"][0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        response.bvals[1] = 5.0


# ---------------------------------------------------------------- estimate_response

FA_069_EVALS = (1.7e-3, 0.45e-3, 0.45e-3)  # single-fibre FA 0.689


@pytest.mark.parametrize("snr", [None, 30])
def test_estimate_response_needs_no_fa_threshold(snr):
    # DIPY's FA >= 0.7 rule finds no single-fibre voxel when the fibres have
    # FA 0.69 (neonatal, older or low-resolution scans); the estimator does,
    # and recovers the phantom's analytic WM response.
    from esdmri.response import estimate_response
    from esdmri.sims import make_phantom
    phantom = make_phantom((12, 12, 12), seed=1, snr=snr, wm_evals=FA_069_EVALS)
    if snr is None:  # (noise lifts the FA of a few voxels above 0.7)
        with pytest.raises(ValueError, match="no response voxels found for tissues \\['wm'"):
            TissueResponse.from_dipy_msmt(phantom.gtab, phantom.data, mask=phantom.mask)
    response = estimate_response(phantom.gtab, phantom.data, phantom.mask)
    assert response.tissues == ("wm", "gm", "csf")
    np.testing.assert_allclose(response.bvals, phantom.response.bvals, atol=1e-6)
    ours = response.normalized()["wm"]
    truth = phantom.response.normalized()["wm"][:, :ours.shape[1]]
    if snr is None:
        # Pure single-fibre voxels are pure tensors: exact.
        np.testing.assert_allclose(ours, truth, rtol=1e-5, atol=1e-8)
        # GM: the purest voxels of the phantom still hold a little CSF.
        np.testing.assert_allclose(response.normalized()["gm"],
                                   phantom.response.normalized()["gm"], rtol=0.02)
    else:
        # l = 0 and 2 at b 1000 within 5%, at b 2000 within 12%; at b 3000 the
        # signal along the fibre is under the Rician noise floor, which the
        # estimate includes (SNR 30).
        np.testing.assert_allclose(ours[:2, :2], truth[:2, :2], rtol=0.05, atol=1e-9)
        np.testing.assert_allclose(ours[2, :2], truth[2, :2], rtol=0.12)
        np.testing.assert_allclose(ours[3, :2], truth[3, :2], rtol=0.25)


def test_tensor_fit_in_chunks_matches_dipy_and_ignores_the_thread_count(monkeypatch):
    # The response's tensor fit runs DIPY's WLS fit in fixed chunks of the mask on
    # torch's threads: the values are DIPY's whole-volume fit's to round-off, and
    # the same to the bit on one thread or two (the response must not move with
    # the adaptive thread count).
    import torch
    from dipy.reconst.dti import TensorModel

    from esdmri import response as module
    from esdmri.sims import make_phantom
    phantom = make_phantom((12, 12, 12), seed=1, snr=30)
    mask = phantom.mask.astype(bool)
    low = module._low_b_volumes(phantom.gtab)
    tensor = TensorModel(module._subset(phantom.gtab, low)).fit(phantom.data[..., low],
                                                                 mask=mask)
    monkeypatch.setattr(module, "_TENSOR_CHUNK", 97)  # several chunks, the last one short
    assert mask.sum() > 3 * 97
    threads = torch.get_num_threads()
    try:
        fits = []
        for count in (1, 2):
            torch.set_num_threads(count)
            fits.append(module._tensor_fit(phantom.gtab, phantom.data, mask))
    finally:
        torch.set_num_threads(threads)
    for ours, other in zip(*fits):
        np.testing.assert_array_equal(ours, other)
    fa, md, evecs = fits[0]
    np.testing.assert_allclose(fa, np.nan_to_num(tensor.fa), rtol=0, atol=1e-10)
    np.testing.assert_allclose(md, np.nan_to_num(tensor.md), rtol=1e-10, atol=0)
    assert not fa[~mask].any() and not md[~mask].any()
    # Eigenvectors up to sign, where the first eigenvalue is distinct.
    reference = np.nan_to_num(tensor.evecs[..., 0])
    distinct = mask & (fa > 0.1)
    cosines = np.abs(np.sum(evecs * reference, axis=-1))[distinct]
    np.testing.assert_allclose(cosines, 1, atol=1e-8)


def test_estimate_response_tissues_follow_the_shells(gtab_3shell):
    from esdmri.response import estimate_response
    from esdmri.sims import make_phantom
    phantom = make_phantom((12, 12, 12), seed=2)
    single = phantom.gtab.bvals < 1500
    gtab = gradient_table(phantom.gtab.bvals[single], bvecs=phantom.gtab.bvecs[single])
    # b0 + one shell separates two tissues, WM and CSF; at b <= 1500 with 30 axes or
    # more the three, which the default fit's charges tell apart.
    response = estimate_response(gtab, phantom.data[..., single], phantom.mask)
    assert response.tissues == ("wm", "gm", "csf")
    assert estimate_response(gtab, phantom.data[..., single], phantom.mask,
                             tissues=("wm", "csf")).tissues == ("wm", "csf")
    few = single & (np.cumsum(phantom.gtab.bvals > 500) <= 29)  # 29 axes: two tissues
    few_gtab = gradient_table(phantom.gtab.bvals[few], bvecs=phantom.gtab.bvecs[few])
    assert estimate_response(few_gtab, phantom.data[..., few],
                             phantom.mask).tissues == ("wm", "csf")
    # CSF decays much faster than WM.
    normalized = response.normalized()
    assert normalized["csf"][1, 0] < 0.5 * normalized["wm"][1, 0]
    with pytest.raises(ValueError, match="tissues must be a subset"):
        estimate_response(gtab, phantom.data[..., single], tissues=("gm",))
    with pytest.raises(ValueError, match="data must have shape"):
        estimate_response(gtab, phantom.data)
    isotropic = np.broadcast_to(phantom.data[..., single][:1, :1, :1, gtab.b0s_mask].mean(),
                                (3, 3, 3, int(single.sum()))).copy()
    with pytest.raises(ValueError, match="no voxel of the mask has an anisotropic tensor"):
        estimate_response(gtab, isotropic)


def test_at_bvals_interpolates_between_rows():
    response = TissueResponse.from_tensors([0, 1000, 2000, 3000], sh_order_max=8)
    same = response.at_bvals(response.bvals)
    for ours, theirs in zip(same.coefficients, response.coefficients):
        np.testing.assert_array_equal(ours, theirs)
    middle = response.at_bvals([0, 1500])
    np.testing.assert_allclose(middle["wm"][1], (response["wm"][1] + response["wm"][2]) / 2)
    with pytest.raises(ValueError, match="cannot be extrapolated"):
        response.at_bvals([0, 4000])


# ---------------------------------------------------------------- to_dict, average

def test_dict_round_trip_is_exact_and_json_safe():
    import json

    response = TissueResponse.from_tensors([0, 995.5, 2000, 3010], s0={"wm": 3.0, "gm": 2.0,
                                                                      "csf": 1.5},
                                           sh_order_max=8)
    saved = json.loads(json.dumps(response.to_dict()))
    restored = TissueResponse.from_dict(saved)
    assert restored.tissues == response.tissues
    np.testing.assert_array_equal(restored.bvals, response.bvals)
    for ours, theirs in zip(restored.coefficients, response.coefficients, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match=r"no \['coefficients'\]"):
        TissueResponse.from_dict({"tissues": ["wm"], "bvals": [0, 1000]})
    with pytest.raises(TypeError, match="saved must be a dict"):
        TissueResponse.from_dict(response)


def test_average_is_the_weighted_mean():
    rng = np.random.default_rng(0)
    responses = [TissueResponse(("wm", "csf"), [0, 1000 + 10 * k, 2000 - 5 * k],
                                [rng.random((3, 5)), rng.random((3, 1))]) for k in range(3)]
    weights = [1.0, 2.0, 0.5]
    averaged = TissueResponse.average(responses, weights)
    total = sum(weights)
    np.testing.assert_allclose(averaged.bvals,
                               sum(w * r.bvals for w, r in zip(weights, responses)) / total)
    for t in range(2):
        brute = sum(w * r.coefficients[t] for w, r in zip(weights, responses)) / total
        np.testing.assert_allclose(averaged.coefficients[t], brute, rtol=1e-14)
    plain = TissueResponse.average(responses)
    np.testing.assert_allclose(plain["wm"], sum(r["wm"] for r in responses) / 3, rtol=1e-14)
    assert plain.tissues == ("wm", "csf")


def test_average_of_normalized_responses_weighs_scans_equally():
    truth = TissueResponse.from_tensors([0, 1000, 2000, 3000], sh_order_max=8)
    brighter = TissueResponse.from_tensors([0, 1000, 2000, 3000], s0=7.0, sh_order_max=8)
    averaged = TissueResponse.average([truth.normalized(), brighter.normalized()])
    for ours, expected in zip(averaged.coefficients, truth.normalized().coefficients):
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_average_truncates_wm_to_the_lowest_order():
    high = TissueResponse.from_tensors([0, 1000], sh_order_max=8, tissues=("wm",))
    low = TissueResponse.from_tensors([0, 1000], sh_order_max=4, tissues=("wm",))
    averaged = TissueResponse.average([high, low])
    assert averaged.sh_order_max == 4
    np.testing.assert_allclose(averaged["wm"], (high["wm"][:, :3] + low["wm"]) / 2)


def test_average_refuses_responses_that_disagree():
    response = TissueResponse.from_tensors([0, 1000, 2000], sh_order_max=8)
    with pytest.raises(ValueError, match="cannot average"):
        TissueResponse.average([response, response.select_tissues(("wm", "csf"))])
    with pytest.raises(ValueError, match="cannot average"):
        TissueResponse.average([response, TissueResponse.from_tensors([0, 1000],
                                                                      sh_order_max=8)])
    far = TissueResponse.from_tensors([0, 1000, 2100], sh_order_max=8)
    with pytest.raises(ValueError, match=r"responses\[0\] has shells .* from the mean"):
        TissueResponse.average([response, far])
    with pytest.raises(ValueError, match="responses is empty"):
        TissueResponse.average([])
    with pytest.raises(TypeError, match="got one TissueResponse"):
        TissueResponse.average(response)
    with pytest.raises(TypeError, match=r"TissueResponse objects, got \['dict'\]"):
        TissueResponse.average([response, response.to_dict()])
    for weights in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, np.nan]):
        with pytest.raises(ValueError, match="weights must be 2 finite non-negative"):
            TissueResponse.average([response, response], weights)


def test_default_fit_estimates_the_response_at_the_fodf_order():
    # Issue 26: the model's forward model sees the WM response's degrees up to
    # the fODF's (here 12); estimated at order 8 they were zero-padded. The l =
    # 10 and 12 terms of the noise-free phantom's tensor response, from DIPY,
    # are small but not zero.
    from esdmri import RTESDModel
    from esdmri.sims import make_phantom
    phantom = make_phantom((12, 12, 12), seed=1, snr=None, wm_evals=FA_069_EVALS)
    model = RTESDModel(phantom.gtab, verbose=False, refine_steps=0, sh_order_max=12)
    fit = model.fit(phantom.data, mask=phantom.mask)
    assert model.config.network.sh_order_max == 12
    ours = fit.response.normalized()["wm"]
    shells = len(phantom.response.bvals) - 1
    rows = np.ones((shells, 1))
    dipy = multi_shell_fiber_response(
        12, phantom.response.bvals, np.hstack([np.tile(FA_069_EVALS, (shells, 1)), rows]),
        np.hstack([np.full((shells, 3), 0.8e-3), rows]),
        np.hstack([np.full((shells, 3), 3.0e-3), rows])).response[:, 2:]
    assert ours.shape == dipy.shape
    high = dipy[:, 5:]  # l = 10 and 12
    assert np.abs(high).max() > 1e-3
    np.testing.assert_allclose(ours, dipy, atol=1e-5)


def test_high_b_single_shell_warns_why_csf_is_missing_and_gm_is_the_way_out():
    # One shell at b = 3000, SNR 10: free water's signal sits on the noise floor,
    # so no voxel reaches CSF_MIN_MD; the warning says why and names the option
    # that gives the fit an isotropic tissue, which then estimates.
    from dipy.core.sphere import HemiSphere, disperse_charges

    from esdmri.heldout_phantom import make_heldout_phantom
    from esdmri.response import estimate_response

    rng = np.random.default_rng(0)
    start = rng.normal(size=(64, 3))
    hemisphere, _ = disperse_charges(HemiSphere(xyz=start / np.linalg.norm(start, axis=1,
                                                                            keepdims=True)), 200)
    gtab = gradient_table(np.r_[np.zeros(4), np.full(64, 3000.0)],
                          bvecs=np.r_[np.zeros((4, 3)), hemisphere.vertices])
    phantom = make_heldout_phantom((10, 10, 10), gtab=gtab, snr=10, seed=1, geometry_seed=3)
    with pytest.warns(UserWarning, match=r"no volume at b <= 1500.*tissues=\('wm', 'gm'\)"):
        response = estimate_response(gtab, phantom.data, phantom.mask)
    assert response.tissues == ("wm",)
    both = estimate_response(gtab, phantom.data, phantom.mask, tissues=("wm", "gm"))
    assert both.tissues == ("wm", "gm")
    # The GM response is isotropic and decays with b.
    assert 0 < both["gm"][1, 0] < both["gm"][0, 0]
