"""Bad input at every public entry point: a clear error, or a warning that counts.

The bad-input classes (shape mismatch, NaNs, missing b0, wrong b-value units,
too few directions, response/shell mismatch, empty mask, corrupt or
truncated files, unwritable output) are walked through the models, the
responses, the fetchers and every command-line workflow. Python entry points
must raise ``ValueError``/``TypeError`` (or ``OSError`` for files) naming the
problem; commands must exit with one line, ``<command>: error: <message>``,
and no traceback. DIPY's behaviour is the reference for what is accepted:
NaN outside the mask, negative diffusion-weighted values (with a warning
here), single voxels whose b0 is not positive (left out, with a warning).
The DIPY interop items (``fit.predict`` at a subset of shells, ``fit[...]``
indexing, ``peaks_from_model``) are checked against independent references:
the full prediction, the unindexed maps, and the error message.
"""

import gzip
import warnings

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table
from dipy.data import default_sphere
from dipy.direction import peaks_from_model
from test_workflows import (  # noqa: F401 (fixtures)
    SHAPE,
    TINY_MODEL,
    assert_one_line_error,
    in_process,
    phantom,
    run_cli,
    save_nifti,
)

from esdmri.data_fetchers import fetch_disco, fetch_tractometer
from esdmri.reconst.inputs import check_data, check_gtab
from esdmri.reconst.models import MODEL_CLASSES, RTESDModel, load_model
from esdmri.response import TissueResponse, estimate_response
from esdmri.workflows.apply import ApplyFlow
from esdmri.workflows.demo import DemoFlow
from esdmri.workflows.evaluate import EvaluateFlow
from esdmri.workflows.fit import FitFlow
from esdmri.workflows.plot import PlotFlow
from esdmri.workflows.response import ResponseFlow
from esdmri.workflows.track import TrackFlow
from esdmri.workflows.train import TrainFlow

TINY = dict(sh_order_max=4, nside=2, depth=2, filter_start=2, block_size=8, epochs=1,
            pretrained=False, refine_steps=1, verbose=False)


def write_gradients(folder, name, bvals, bvecs):
    np.savetxt(folder / f"{name}.bval", np.asarray(bvals)[None])
    np.savetxt(folder / f"{name}.bvec", np.asarray(bvecs).T)
    return folder / f"{name}.bval", folder / f"{name}.bvec"


@pytest.fixture(scope="module")
def tiny_fit(phantom):
    model = RTESDModel(phantom.gtab, phantom.response, **TINY)
    return model, model.fit(phantom.data, mask=phantom.mask)


@pytest.fixture(scope="module")
def bad(phantom, tmp_path_factory):
    """Bad variants of the phantom's files, by name."""
    folder = tmp_path_factory.mktemp("bad")
    gtab, data = phantom.gtab, phantom.data
    files = {"folder": folder}
    good = phantom.dwi[0].read_bytes()
    files["random_nifti"] = folder / "random.nii.gz"
    files["random_nifti"].write_bytes(np.random.default_rng(0).bytes(2000))
    files["truncated_nifti"] = folder / "truncated.nii.gz"
    files["truncated_nifti"].write_bytes(good[:len(good) // 2])
    # A valid gzip stream holding a broken NIfTI header.
    files["bad_header_nifti"] = folder / "bad_header.nii.gz"
    files["bad_header_nifti"].write_bytes(gzip.compress(b"\0" * 400))
    files["ms_units"] = write_gradients(folder, "ms", gtab.bvals / 1000, gtab.bvecs)
    weighted = ~gtab.b0s_mask
    files["no_b0_dwi"] = save_nifti(folder / "no_b0.nii.gz", data[..., weighted])
    files["no_b0"] = write_gradients(folder, "no_b0", gtab.bvals[weighted],
                                     gtab.bvecs[weighted])
    few = np.r_[np.flatnonzero(gtab.b0s_mask)[:1],
                np.flatnonzero(np.abs(gtab.bvals - 1000) < 20)[:4]]
    files["few_dwi"] = save_nifti(folder / "few.nii.gz", data[..., few])
    files["few"] = write_gradients(folder, "few", gtab.bvals[few], gtab.bvecs[few])
    nan = np.where(phantom.mask[..., None], np.nan, data)
    files["nan_dwi"] = save_nifti(folder / "nan.nii.gz", nan)
    files["empty_mask"] = save_nifti(folder / "empty_mask.nii.gz", np.zeros(SHAPE))
    files["small_mask"] = save_nifti(folder / "small_mask.nii.gz", np.ones((4, 4, 4)))
    # A WM response of other shells than the scan's.
    other = TissueResponse(("wm",), [0, 1500], [phantom.response["wm"][:2]])
    files["other_response"] = folder / "wm_other.txt"
    other.to_mrtrix(files["other_response"])
    files["random_model"] = folder / "random.pt"
    files["random_model"].write_bytes(np.random.default_rng(1).bytes(5000))
    files["random_npz"] = folder / "truth.npz"
    files["random_npz"].write_bytes(b"PK\3\4 not really a zip")
    files["random_pam"] = folder / "peaks.pam5"
    files["random_pam"].write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    files["a_file"] = folder / "a_file"
    files["a_file"].write_text("a file where a folder should be")
    return files


# --------------------------------------------------------------------------
# Models: construction and fit
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(MODEL_CLASSES))
def test_models_refuse_bad_gradient_tables(phantom, kind):
    gtab = phantom.gtab
    model_class = MODEL_CLASSES[kind]
    # b-values in ms/um^2 (all below ~50): named as such, whichever b0_threshold.
    for threshold in (50, 0.01):
        ms = gradient_table(gtab.bvals / 1000, bvecs=gtab.bvecs, b0_threshold=threshold)
        with pytest.raises(ValueError, match=r"look like ms/um\^2.*multiply .* by 1000"):
            model_class(ms, **TINY)
        with pytest.raises(ValueError, match=r"look like ms/um\^2"):
            model_class(ms, phantom.response, **TINY)
    weighted = ~gtab.b0s_mask
    no_b0 = gradient_table(gtab.bvals[weighted], bvecs=gtab.bvecs[weighted])
    with pytest.raises(ValueError, match="no b0 volume"):
        model_class(no_b0, **TINY)
    few = np.r_[0, np.flatnonzero(np.abs(gtab.bvals - 1000) < 20)[:4]]
    with pytest.raises(ValueError, match="4 distinct diffusion-weighted directions"):
        model_class(gradient_table(gtab.bvals[few], bvecs=gtab.bvecs[few]), **TINY)
    # Antipodal directions are the same axis.
    doubled = np.r_[few, few[1:]]
    bvecs = gtab.bvecs[doubled].copy()
    bvecs[len(few):] *= -1
    with pytest.raises(ValueError, match="4 distinct"):
        model_class(gradient_table(gtab.bvals[doubled], bvecs=bvecs), **TINY)
    two_shells = gradient_table(gtab.bvals[gtab.bvals < 2500],
                                bvecs=gtab.bvecs[gtab.bvals < 2500])
    with pytest.raises(ValueError, match="response shells .* do not match the gtab shells"):
        model_class(two_shells, phantom.response, **TINY)
    with pytest.raises(TypeError, match="response must be"):
        model_class(gtab, "wm.txt", **TINY)
    with pytest.raises(TypeError, match="GradientTable"):
        model_class(gtab.bvals, **TINY)


def test_fit_refuses_bad_data_before_training(phantom):
    model = RTESDModel(phantom.gtab, phantom.response, **TINY)
    data, mask = phantom.data, phantom.mask
    cases = [
        (data[..., :-1], mask, "data has 195 volumes but gtab has 196"),
        (data[0], mask, r"4D array"),
        (data, np.zeros(SHAPE), "mask is empty"),
        (data, np.ones((4, 4, 4)), "mask has shape"),
        (np.where(mask[..., None], np.nan, data), mask,
         "NaN or inf values in .* voxels of the mask"),
        (np.where(mask[..., None], np.inf, data), None, "pass a mask that leaves them out"),
        (data.astype(np.float64) * 1e40, mask, "beyond the float32 range"),
        (data.astype(np.complex64), mask, "real numbers"),
    ]
    for values, voxels, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            model.fit(values, mask=voxels)
    assert model.network is None  # nothing was trained


def test_float64_beyond_float32_is_refused_not_fitted_as_nan(phantom):
    # Issue 17, item 4: the finite check ran before the cast to float32.
    data = phantom.data.astype(np.float64)
    data[2, 2, 2, 5] = 1e39
    with pytest.raises(ValueError, match=r"values up to 1e\+39, beyond the float32 range"):
        check_data(data, phantom.gtab, phantom.mask)


def test_dirty_voxels_warn_once_with_counts_and_nan_outside_the_mask_is_accepted(
        phantom, tiny_fit):
    data = phantom.data.copy()
    mask = phantom.mask.copy()
    inside = np.argwhere(mask)
    # Two voxels of the user's mask without b0 signal, one with a negative b0.
    for index, b0 in ((inside[0], 0.0), (inside[1], -5.0)):
        data[tuple(index)][phantom.gtab.b0s_mask] = b0
    negative_voxel = tuple(inside[2])
    data[negative_voxel][~phantom.gtab.b0s_mask][:3] = -1.0
    weighted = np.flatnonzero(~phantom.gtab.b0s_mask)
    data[negative_voxel + (weighted[:3],)] = -1.0
    n_negative = np.count_nonzero(data[mask][:, weighted] < 0)
    n_negative_voxels = np.count_nonzero((data[mask][:, weighted] < 0).any(-1))
    clean = data.copy()
    data[~mask] = np.nan  # DIPY accepts NaN where the mask excludes it

    model = RTESDModel(phantom.gtab, phantom.response, **TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = model.fit(data, mask=mask)
    messages = [str(warning.message) for warning in caught]
    negative = [m for m in messages if "negative diffusion-weighted" in m]
    assert negative == [f"data has {n_negative} negative diffusion-weighted values in "
                        f"{n_negative_voxels} voxels of the mask: they are used as they are "
                        "(noise around a zero signal); clip them at 0 first if that is "
                        "wrong"]
    dropped = [m for m in messages if "mean b0" in m]
    assert len(dropped) == 1
    assert dropped[0].startswith(f"2 of the {mask.sum()} voxels of the mask have a mean b0 "
                                 "signal <= 0 and are left out")
    assert not fit.mask[tuple(inside[0])] and not fit.mask[tuple(inside[1])]
    assert fit.mask.sum() == mask.sum() - 2
    assert np.all(np.isfinite(fit.shm_coeff))

    # NaN outside the mask changes nothing: the same fit as with finite values there.
    reference = RTESDModel(phantom.gtab, phantom.response, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference.fit(clean, mask=mask)
    np.testing.assert_array_equal(fit.shm_coeff, expected.shm_coeff)


def test_without_a_user_mask_empty_voxels_are_left_out_silently(phantom):
    # The default mask is documented as "every voxel with a positive b0".
    model = RTESDModel(phantom.gtab, phantom.response, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        data = np.where(phantom.mask[..., None], phantom.data, 0)
        fit = model.fit(data)
    np.testing.assert_array_equal(fit.mask, phantom.mask)


# --------------------------------------------------------------------------
# Fits: DIPY interop
# --------------------------------------------------------------------------

def test_predict_at_a_subset_of_the_response_shells(phantom, tiny_fit):
    _, fit = tiny_fit
    gtab = phantom.gtab
    full = fit.predict()
    for keep in (gtab.bvals < 1500,  # b0 + b = 1000
                 np.abs(gtab.bvals - 2000) < 20,  # one shell, no b0
                 (gtab.bvals < 50) | (gtab.bvals > 2500)):  # b0 + b = 3000
        subset = gradient_table(gtab.bvals[keep], bvecs=gtab.bvecs[keep],
                                b0_threshold=gtab.b0_threshold)
        np.testing.assert_allclose(fit.predict(subset), full[..., keep], rtol=1e-6,
                                   atol=1e-7)
    s0 = np.full(SHAPE, 100.0)
    np.testing.assert_allclose(fit.predict(subset, S0=s0), 100 * full[..., keep], rtol=1e-6)
    unknown = gradient_table(np.r_[0, np.full(6, 1500.0)], bvecs=np.r_[
        [[0, 0, 0]], gtab.bvecs[np.abs(gtab.bvals - 1000) < 20][:6]])
    with pytest.raises(ValueError, match=r"shells \[1500.0\] that the response"):
        fit.predict(unknown)


def test_fits_are_indexed_like_dipy_fits(tiny_fit):
    _, fit = tiny_fit
    part = fit[2:4, :, :]
    assert part.shape == (2,) + SHAPE[1:]
    np.testing.assert_array_equal(part.shm_coeff, fit.shm_coeff[2:4])
    np.testing.assert_array_equal(part.odf(default_sphere), fit.odf(default_sphere)[2:4])
    np.testing.assert_array_equal(part.predict(), fit.predict()[2:4])
    np.testing.assert_array_equal(part.gfa, fit.gfa[2:4])
    for tissue, values in fit.volume_fractions.items():
        np.testing.assert_array_equal(part.volume_fractions[tissue], values[2:4])
    whole_peaks, part_peaks = fit.peaks(), part.peaks()
    np.testing.assert_array_equal(part_peaks.peak_dirs, whole_peaks.peak_dirs[2:4])
    np.testing.assert_array_equal(part_peaks.peak_values, whole_peaks.peak_values[2:4])

    voxel = fit[3, 4, 5]
    assert voxel.shape == ()
    np.testing.assert_array_equal(voxel.shm_coeff, fit.shm_coeff[3, 4, 5])
    # One voxel's fODF comes from a matrix-vector product, the volume's from a
    # matrix product: the last bits differ, and the sub-vertex peaks follow them.
    np.testing.assert_allclose(voxel.peaks().peak_dirs, whole_peaks.peak_dirs[3, 4, 5],
                               rtol=0, atol=1e-12)
    np.testing.assert_array_equal(fit[..., 1].shm_coeff, fit.shm_coeff[:, :, 1])
    np.testing.assert_array_equal(fit[fit.mask].shm_coeff, fit.shm_coeff[fit.mask])
    with pytest.raises(IndexError, match="3 voxel axes"):
        fit[1, 2, 3, 4]


def test_peaks_from_model_is_refused_before_any_training(phantom):
    # DIPY's peaks_from_model calls model.fit(data[idx]) voxel by voxel: one
    # network per voxel. It must stop at the first voxel, pointing to fit.peaks.
    model = RTESDModel(phantom.gtab, phantom.response, **TINY)
    with pytest.raises(ValueError, match=r"peaks_from_model, which fits voxel by voxel, use "
                                         r"fit\.peaks\(\)"):
        peaks_from_model(model, phantom.data, default_sphere, relative_peak_threshold=0.5,
                         min_separation_angle=25, mask=phantom.mask, parallel=False)
    assert model.network is None


def test_one_voxel_is_refused_with_the_volume_and_slice_to_use(phantom):
    model = RTESDModel(phantom.gtab, phantom.response, **{**TINY, "epochs": 0})
    with pytest.raises(ValueError, match=r"one voxel's signal of shape \(\d+,\).*"
                                         r"fit\[x, y, z\]\.odf\(sphere\).*"
                                         r"data\[x:x\+1, y:y\+1, z:z\+1\]"):
        model.fit(phantom.data[5, 5, 5])
    # What the message proposes works: a (1, 1, 1, N) volume is fitted.
    single = model.fit(phantom.data[5:6, 5:6, 5:6])
    assert single.shm_coeff.shape[:3] == (1, 1, 1)
    assert np.all(np.isfinite(single.shm_coeff))


def test_dipy_response_objects_name_their_converter(phantom):
    from dipy.reconst.mcsd import MultiShellResponse

    # auto_response_ssst(gtab, data)[0]: DIPY's (evals, S0) tuple.
    dipy_tuple = (np.array([1.7e-3, 0.3e-3, 0.3e-3]), 100.0)
    with pytest.raises(TypeError, match=r"got tuple: .*TissueResponse\.from_dipy_ssst"):
        RTESDModel(phantom.gtab, dipy_tuple, **TINY)
    msmt = MultiShellResponse(np.ones((2, 7)), 8, [0.0, 1000.0])  # 2 isotropic tissues
    with pytest.raises(TypeError, match=r"TissueResponse\.from_dipy_msmt"):
        RTESDModel(phantom.gtab, msmt, **TINY)
    with pytest.raises(TypeError, match=r"TissueResponse or None, got str$"):
        RTESDModel(phantom.gtab, "wm.txt", **TINY)


# --------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------

def test_model_files_that_are_not_models_give_one_line(tiny_fit, tmp_path):
    model, _ = tiny_fit
    model.save(tmp_path / "model.pt")
    whole = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"weights": 1}, tmp_path / "dict.pt")
    for name, message in (("truncated.pt", "truncated, corrupt or not written by torch.save"),
                          ("random.pt", "truncated, corrupt or not written by torch.save"),
                          ("empty.pt", "truncated, corrupt or not written by torch.save"),
                          ("list.pt", "it holds a list, not a dict"),
                          ("dict.pt", "no format_version")):
        with pytest.raises(ValueError) as error:
            load_model(tmp_path / name)
        text = str(error.value)
        assert message in text and "\n" not in text and "weights_only" not in text
        assert len(text) < 200
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_model(tmp_path / "absent.pt")
    assert load_model(tmp_path / "model.pt", verbose=False).training_history


# --------------------------------------------------------------------------
# Responses and fetchers
# --------------------------------------------------------------------------

def test_responses_refuse_bad_input(phantom, bad, tmp_path):
    with pytest.raises(ValueError, match="no voxel of the mask|no response voxels found"):
        estimate_response(phantom.gtab, phantom.data, np.zeros(SHAPE, bool))
    with pytest.raises(ValueError, match="response shells .* do not match"):
        TissueResponse.from_mrtrix(bad["other_response"], ("wm",)).validate(phantom.gtab)
    with pytest.raises(FileNotFoundError):
        TissueResponse.from_mrtrix(tmp_path / "absent.txt", ("wm",))
    (tmp_path / "words.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match="expected numbers"):
        TissueResponse.from_mrtrix(tmp_path / "words.txt", ("wm",))
    with pytest.raises(ValueError, match=r"look like ms/um\^2"):
        check_gtab(gradient_table(phantom.gtab.bvals / 1000, bvecs=phantom.gtab.bvecs))


def test_fetchers_refuse_bad_arguments_and_unusable_folders(bad):
    with pytest.raises(ValueError, match="phantom must be 1, 2 or 3"):
        fetch_disco(7)
    with pytest.raises(ValueError, match="snr must be"):
        fetch_disco(1, snr=33)
    with pytest.raises(ValueError, match="parts must be"):
        fetch_tractometer(["nope"])
    # A file where the cache folder should be: refused before any download.
    with pytest.raises(NotADirectoryError, match=str(bad["a_file"])):
        fetch_disco(1, resolution="high", snr=30, data_home=bad["a_file"], quiet=True)
    with pytest.raises(NotADirectoryError, match=str(bad["a_file"])):
        fetch_tractometer(["dwi"], data_home=bad["a_file"], quiet=True)


# --------------------------------------------------------------------------
# Workflows: every bad-input class gives one line
# --------------------------------------------------------------------------

def test_corrupt_scan_gives_one_line_in_a_real_process(phantom, bad, tmp_path):
    # Issue 17, item 5: nibabel's EOFError went out as a traceback. (The other
    # corrupt files go through the same entry-point code in process below.)
    result = run_cli("response", bad["truncated_nifti"], *phantom.dwi[1:], "--out_dir",
                     tmp_path)
    assert_one_line_error(result, "esdmri_response", "cannot be read as a NIfTI image")
    assert list(tmp_path.iterdir()) == []


def test_fit_and_response_workflows_refuse_each_bad_input(phantom, bad, in_process,
                                                          tmp_path):
    dwi, bvals, bvecs = phantom.dwi
    mask = phantom.folder / "mask.nii.gz"
    out = ["--out_dir", tmp_path / "out"]
    cases = [
        ([dwi, *bad["ms_units"]], r"look like ms/um^2"),
        ([bad["no_b0_dwi"], *bad["no_b0"]], "no b0 volume"),
        ([bad["few_dwi"], *bad["few"]], "4 distinct diffusion-weighted directions"),
        ([bad["nan_dwi"], bvals, bvecs, "--mask", mask], "NaN or inf values"),
        ([dwi, bvals, bvecs, "--mask", bad["empty_mask"]], "mask is empty"),
        ([dwi, bvals, bvecs, "--mask", bad["small_mask"]], "has shape (4, 4, 4)"),
        ([bad["truncated_nifti"], bvals, bvecs], "cannot be read as a NIfTI image"),
        ([bad["bad_header_nifti"], bvals, bvecs], "cannot be read as a NIfTI image"),
        ([dwi, bvals, bvecs, "--mask", bad["random_nifti"]], "mask"),
    ]
    for flow in (FitFlow(), ResponseFlow()):
        extra = TINY_MODEL if isinstance(flow, FitFlow) else []
        for args, message in cases:
            text = in_process(flow, *args, *extra, *out, fails=True)
            assert message in text, (flow.get_short_name(), text)
        text = in_process(flow, *phantom.dwi, *extra, "--out_dir", bad["a_file"] / "sub",
                          fails=True)
        assert "is a file, not a folder" in text
    text = in_process(FitFlow(), *phantom.dwi, "--response_wm", bad["other_response"],
                      *TINY_MODEL, *out, fails=True)
    assert "do not match the gtab shells" in text
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_apply_track_plot_eval_train_demo_refuse_bad_input(phantom, bad, in_process,
                                                          tmp_path):
    out = ["--out_dir", tmp_path / "out"]
    dwi, bvals, bvecs = phantom.dwi
    # esdmri_apply: a model file of random bytes (item 11), a scan of other shells.
    text = in_process(ApplyFlow(), bad["random_model"], *phantom.dwi, *out, fails=True)
    assert "is not an esdmri model file" in text and "weights_only" not in text
    # SH input of the fODF commands, and its corrupt variants.
    sh = save_nifti(tmp_path / "sh.nii.gz", np.ones(SHAPE + (15,)))
    for flow in (TrackFlow(), PlotFlow(), EvaluateFlow()):
        extra = [phantom.folder / "ground_truth.npz"] if isinstance(flow, EvaluateFlow) else []
        for corrupt, message in ((bad["truncated_nifti"], "cannot be read as a NIfTI"),
                                 (bad["random_pam"], "cannot be read as a DIPY .pam5"),
                                 (bad["random_nifti"], "cannot be read as a NIfTI")):
            text = in_process(flow, corrupt, *extra, *out, fails=True)
            assert message in text, (flow.get_short_name(), text)
        text = in_process(flow, sh, *extra, "--out_dir", bad["a_file"], fails=True)
        assert "is a file, not a folder" in text
    # Maps on another grid than the fODFs.
    small = bad["small_mask"]
    assert "seed mask has shape" in in_process(TrackFlow(), sh, "--seeds", small, *out,
                                               fails=True)
    assert "no seed voxel" in in_process(TrackFlow(), sh, "--seeds", bad["empty_mask"],
                                         *out, fails=True)
    assert "stopping map has shape" in in_process(TrackFlow(), sh, "--stop", small, *out,
                                                  fails=True)
    assert "background" in in_process(PlotFlow(), sh, "--background", small, *out,
                                      fails=True)
    assert "stopping map" in in_process(TrackFlow(), sh, "--stop", bad["truncated_nifti"],
                                        *out, fails=True)
    # esdmri_eval: a corrupt ground truth, a ground truth of another grid.
    assert "cannot be read as a .npz" in in_process(EvaluateFlow(), sh, bad["random_npz"],
                                                    *out, fails=True)
    other_grid = save_nifti(tmp_path / "sh_small.nii.gz", np.ones((4, 4, 4, 15)))
    assert "covers a (8, 8, 8) grid" in in_process(
        EvaluateFlow(), other_grid, phantom.folder / "ground_truth.npz", *out, fails=True)
    # esdmri_train: a subjects file naming a corrupt scan, or lacking columns.
    table = tmp_path / "subjects.tsv"
    table.write_text(f"dwi\tbval\tbvec\n{bad['truncated_nifti']}\t{bvals}\t{bvecs}\n")
    text = in_process(TrainFlow(), table, *TINY_MODEL[:-2], *out, fails=True)
    assert f"{bad['truncated_nifti']} cannot be read" in text
    table.write_text("dwi\tbval\n")
    assert "missing bvec" in in_process(TrainFlow(), table, *out, fails=True)
    # The checkpoint of an interrupted run is kept (to resume), and named as such.
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "checkpoint.pt").write_bytes(b"")
    text = in_process(TrainFlow(), table, "--out_dir", tmp_path / "group", fails=True)
    assert "checkpoint" in text and "pass --resume to continue it" in text
    # esdmri_demo: an output folder that cannot exist.
    assert "is a file, not a folder" in in_process(
        DemoFlow(), "--quick", "--out_dir", bad["a_file"] / "demo", fails=True)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
