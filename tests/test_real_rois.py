"""esdmri on the three real brain ROIs that ship with DIPY (offline).

``small_64D`` (10^3 voxels, one b0 + 64 directions at b 1000), ``small_25``
(10 x 8 x 2 voxels, one b0 + 25 directions at b 2000) and ``small_101D``
(6 x 10 x 10 voxels, one b0 + 101 q-space samples at b 310-4065: no shells).
The reference is DIPY's CSD (``auto_response_ssst``, order 8) on the same
data. The fits are the default path (the shipped network's correction of the
linear prior, then the spatially coupled refinement; no training on the scan):
its main peaks must lie within 10 degrees of CSD's (median over the voxels
where the tensor FA exceeds 0.5; issue 27's goal, measured 8.1, 4.1 and 8.8
degrees, docs/benchmarks.md "Real brain ROIs"), its signal error within 1.3x
CSD's, and two seeds must agree.
"""

import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.data import get_fnames
from dipy.io.gradients import read_bvals_bvecs
from dipy.io.image import load_nifti
from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel, auto_response_ssst
from dipy.reconst.dti import TensorModel

from esdmri import shm
from esdmri.peaks import peaks_from_sh
from esdmri.reconst.models import RTESDModel
from esdmri.response import TissueResponse, estimate_response
from esdmri.shm import ShellInterpolator, legacy_to_descoteaux

ROIS = ("small_64D", "small_25", "small_101D")
README = Path(__file__).resolve().parents[1] / "README.md"


def load_roi(name):
    files = get_fnames(name=name)
    data, affine = load_nifti(files[0])
    bvals, bvecs = read_bvals_bvecs(str(files[1]), str(files[2]))
    return data.astype(np.float64), affine, gradient_table(bvals, bvecs=bvecs)


def main_directions(shm_coeff_descoteaux07):
    directions, _ = peaks_from_sh(shm_coeff_descoteaux07)
    return directions[..., 0, :]


def angles(a, b):
    cosine = np.clip(np.abs(np.sum(a * b, axis=-1)), 0, 1)
    return np.degrees(np.arccos(cosine))


def dw_nrmse(predicted, data, gtab):
    """Relative error of the diffusion-weighted signal over the whole ROI."""
    dw = ~gtab.b0s_mask
    return np.linalg.norm(predicted[..., dw] - data[..., dw]) / np.linalg.norm(data[..., dw])


@pytest.fixture(scope="module")
def csd():
    """DIPY's CSD on each ROI: main directions, signal error and tensor FA."""
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ROIS:
            data, _, gtab = load_roi(name)
            response, _ = auto_response_ssst(gtab, data, roi_radii=10, fa_thr=0.7)
            fit = ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=8).fit(data)
            predicted = fit.predict(gtab=gtab, S0=response[1])
            low = gtab.bvals <= 1500 if name == "small_101D" else np.ones(len(gtab.bvals), bool)
            tensor = TensorModel(gradient_table(gtab.bvals[low], bvecs=gtab.bvecs[low]))
            fa = np.nan_to_num(tensor.fit(data[..., low]).fa)
            results[name] = dict(directions=main_directions(legacy_to_descoteaux(
                fit.shm_coeff, 8)), nrmse=dw_nrmse(predicted, data, gtab), fa=fa)
    return results


def fit_roi(name, seed=0):
    data, _, gtab = load_roi(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = RTESDModel(gtab, seed=seed, verbose=False)
        fit = model.fit(data)
        shm_coeff = fit.shm_coeff
    predicted = fit.predict(S0=data[..., gtab.b0s_mask].mean(-1))
    return dict(model=model, fit=fit, shm_coeff=shm_coeff, warnings=caught,
                directions=main_directions(fit.shm_coeff_descoteaux07),
                nrmse=dw_nrmse(predicted, data, gtab))


@pytest.fixture(scope="module")
def fits():
    # DIPY's clustering warning is issued once per scheme and process: start
    # afresh so that the fits below see it whatever ran before.
    shm.cluster_bvals.cache_clear()
    return {name: fit_roi(name) for name in ROIS}


@pytest.mark.slow
@pytest.mark.parametrize("name", ROIS)
def test_main_peaks_and_signal_agree_with_csd(name, csd, fits):
    reference, ours = csd[name], fits[name]
    anisotropic = reference["fa"] > 0.5
    median = np.median(angles(ours["directions"], reference["directions"])[anisotropic])
    assert median < 10.0, f"{name}: median angle to CSD {median:.1f} degrees"
    assert ours["nrmse"] <= 1.3 * reference["nrmse"], (
        f"{name}: signal error {ours['nrmse']:.3f}, CSD {reference['nrmse']:.3f}")


@pytest.mark.slow
def test_two_seeds_agree(csd, fits):
    # small_101D: the non-shelled ROI, where seeds disagreed by 21 degrees.
    other = fit_roi("small_101D", seed=1)
    anisotropic = csd["small_101D"]["fa"] > 0.5
    median = np.median(angles(other["directions"],
                              fits["small_101D"]["directions"])[anisotropic])
    assert median < 5.0


@pytest.mark.slow
def test_tissues_and_normalisation_follow_the_scheme(fits):
    # b0 + one shell at b 1000 with 64 axes: the three tissues, the isotropic ones
    # charged (esdmri.response.low_shell), unnormalised.
    assert fits["small_64D"]["fit"].response.tissues == ("wm", "gm", "csf")
    assert not fits["small_64D"]["fit"].normalizes
    assert fits["small_25"]["fit"].response.tissues == ("wm",)
    # No shells: all three tissues, normalised like multi-shell scans.
    assert fits["small_101D"]["fit"].response.tissues == ("wm", "gm", "csf")
    assert fits["small_101D"]["fit"].normalizes
    fractions = fits["small_64D"]["fit"].volume_fractions
    total = sum(fractions.values())
    np.testing.assert_allclose(total[fits["small_64D"]["fit"].mask], 1.0, atol=1e-5)
    # The ROI holds CSF (tensor MD above 2e-3 mm^2/s in some voxels).
    assert fractions["csf"].max() > 0.5


@pytest.mark.slow
def test_warnings_are_few_and_say_something(fits):
    for name in ROIS:
        messages = [str(w.message) for w in fits[name]["warnings"]]
        assert len(messages) == len(set(messages)), f"{name}: repeated warnings {messages}"
        categories = {w.category for w in fits[name]["warnings"]}
        assert PendingDeprecationWarning not in categories
    # small_25: 25 directions cannot determine 45 coefficients of order 8.
    assert any("45 SH coefficients" in str(w.message) and "25 distinct" in str(w.message)
               for w in fits["small_25"]["warnings"])
    assert any("do not form well-separated shells" in str(w.message)
               for w in fits["small_101D"]["warnings"])
    # Reading shm_coeff again, or the peaks in DIPY's basis, warns about nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits["small_64D"]["fit"].shm_coeff
        fits["small_64D"]["fit"].peaks()


def test_response_of_non_shelled_roi_is_smooth_in_b():
    data, _, gtab = load_roi("small_101D")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        response = estimate_response(gtab, data)
    # 31 b-value clusters of 1 to 6 directions, each with a row of one smooth
    # function: positive and decreasing in b (DIPY's per-cluster tensors gave
    # rows that were exactly zero at b 1818, 1877 and 2732).
    assert len(response.bvals) == 32
    for tissue in response.tissues:
        mean_signal = response[tissue][:, 0]
        assert np.all(mean_signal > 0)
        assert np.all(np.diff(mean_signal) <= 1e-9 * mean_signal[0])
    wm = response.normalized()["wm"]
    assert np.all(wm[1:, 1] < 0)  # prolate: less signal along the fibre
    # CSF decays fastest, then GM, then WM.
    b1000 = np.argmin(np.abs(response.bvals - 1000))
    ratios = {t: response.normalized()[t][b1000, 0] for t in response.tissues}
    assert ratios["csf"] < ratios["gm"] < ratios["wm"]


def test_single_shell_wm_response_matches_dipy():
    # Independent reference: the tensor of DIPY's auto_response_ssst (FA >= 0.7
    # in a central ROI), which works on these two ROIs.
    for name in ("small_64D", "small_25"):
        data, _, gtab = load_roi(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = estimate_response(gtab, data).normalized()["wm"]
            dipy = TissueResponse.from_dipy_ssst(gtab, data).normalized()["wm"]
        # Spherical mean (l = 0) and anisotropy (l = 2) at the shell. The voxel
        # sets differ (DIPY averages all FA >= 0.7 voxels of a central cube,
        # 135 on small_64D, some with a corrupted b0 and FA 1.0; esdmri takes
        # fewer, consistent ones), so only roughly: measured l = 0 within 15%,
        # l = 2 within a factor 1.4 (esdmri's are the sharper).
        np.testing.assert_allclose(ours[1, 0], dipy[1, 0], rtol=0.15, err_msg=name)
        assert 0.9 < ours[1, 1] / dipy[1, 1] < 1.45, name


def test_virtual_shells_reproduce_an_analytic_signal():
    # A tensor signal sampled at small_101D's 101 q-space points, resampled onto
    # the virtual shells, must match the same tensor evaluated exactly at the
    # virtual b-values and the grid directions.
    _, _, gtab = load_roi("small_101D")
    grid = np.random.default_rng(0).normal(size=(200, 3))
    grid /= np.linalg.norm(grid, axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpolator = ShellInterpolator(gtab, grid)
    assert interpolator.resampled
    assert 3 <= len(interpolator.shell_bvals) <= 5
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    tensor = rotation @ np.diag([1.7e-3, 0.4e-3, 0.4e-3]) @ rotation.T

    def signal(bvals, bvecs):
        return np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, tensor, bvecs))

    measured = signal(gtab.bvals, gtab.bvecs)
    resampled = interpolator(measured)
    for channel, bval in enumerate(interpolator.shell_bvals[1:], start=1):
        exact = signal(np.full(len(grid), bval), grid)
        error = np.abs(resampled[channel] - exact).max()
        assert error < 0.1, f"virtual shell b={bval:g}: max error {error:.3f}"
    np.testing.assert_allclose(resampled[0], measured[gtab.b0s_mask].mean(), rtol=1e-12)


def test_readme_example_runs_on_single_shell_data(tmp_path, monkeypatch):
    # The README's Python example, verbatim, on small_25 (b0 + one shell, no
    # CSF voxel: WM only), with its file names.
    data, affine, gtab = load_roi("small_25")
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), tmp_path / "dwi.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(data.shape[:3], np.uint8), affine),
             tmp_path / "mask.nii.gz")
    np.savetxt(tmp_path / "dwi.bval", gtab.bvals[None])
    np.savetxt(tmp_path / "dwi.bvec", gtab.bvecs.T)
    code = re.search(r"## In Python\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    # Only the progress bar is silenced; everything else is the README's.
    monkeypatch.setitem(RTESDModel.__init__.__kwdefaults__, "verbose", False)
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(README), "exec"), namespace)
    assert set(namespace["fractions"]) == {"wm"}
    assert namespace["peaks"].peak_dirs.shape[:3] == data.shape[:3]
