"""Command-line workflows on a tiny phantom.

Every command runs at least once as a subprocess (exit status, files that
load, stderr); further runs of the same command go through
:func:`run_workflow` in this process, the code path of the entry points
without another interpreter start-up. Values are checked against independent
references: the phantom's analytic response, fODFs synthesised with DIPY's
``sf_to_sh`` from known directions, and the fit's own files (an applied model
must reproduce its fit, a tournier07 copy must convert back to the DIPY-basis
file).
"""

import csv
import os
import signal
import subprocess
import sys
import time
from functools import cache

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from dipy.data import get_sphere
from dipy.io.peaks import load_pam
from dipy.io.streamline import load_tractogram
from dipy.reconst.shm import sh_to_sf, sh_to_sf_matrix

from esdmri.atomic import PARTIAL_PREFIX
from esdmri.peaks import peaks_from_sh
from esdmri.reconst.models import RTESDModel, load_model
from esdmri.response import TissueResponse
from esdmri.shm import descoteaux_to_legacy, descoteaux_to_tournier, tournier_to_descoteaux
from esdmri.sims import make_phantom
from esdmri.tracking import sh_peak_amplitude
from esdmri.workflows.demo import DemoFlow
from esdmri.workflows.evaluate import EvaluateFlow
from esdmri.workflows.fit import FitFlow
from esdmri.shm import legacy_to_descoteaux
from esdmri.workflows.io import run_workflow
from esdmri.workflows.plot import PlotFlow
from esdmri.workflows.response import ResponseFlow
from esdmri.workflows.track import TrackFlow

SHAPE = (8, 8, 8)
SPHERE = get_sphere(name="repulsion724")
# Smallest network: 24-vertex hemisphere (nside 2) > 15 coefficients of order 4.
TINY_MODEL = ["--sh_order_max", "4", "--nside", "2", "--depth", "2", "--filter_start", "2",
              "--block_size", "8", "--epochs", "1"]


def run_cli(module, *args, cwd=None):
    """Run ``python -m esdmri.workflows.<module> args``; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", f"esdmri.workflows.{module}",
                           *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_ok(result):
    assert result.returncode == 0, result.stderr[-3000:]


def assert_one_line_error(result, command, match):
    """Non-zero exit, no traceback, and a last stderr line naming the problem."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{command}: error: "), result.stderr[-2000:]
    assert match in last, last


@pytest.fixture
def in_process(monkeypatch):
    """Run a workflow through its entry point's code path in this process.

    ``in_process(flow, *args)`` returns what ``flow.run`` returns;
    ``in_process(flow, *args, fails=True)`` returns the one-line message
    ``run_workflow`` exits with (status 1).
    """
    def run(flow, *args, fails=False):
        monkeypatch.setattr(sys, "argv", [flow.get_short_name()])
        argv = [str(arg) for arg in args]
        if not fails:
            return run_workflow(flow, argv)
        with pytest.raises(SystemExit) as exit_info:
            run_workflow(flow, argv)
        message = exit_info.value.code
        assert isinstance(message, str) and "\n" not in message
        assert message.startswith(f"{flow.get_short_name()}: error: ")
        return message
    return run


@cache
def sf_to_legacy_sh(sh_order_max):
    """DIPY's least-squares map from values on SPHERE to legacy descoteaux07 SH."""
    _, inverse = sh_to_sf_matrix(SPHERE, sh_order_max=sh_order_max, basis_type="descoteaux07",
                                 legacy=True)
    return inverse


def lobe_sh(directions, weights, sh_order_max=12, kappa=60.0):
    """Legacy descoteaux07 SH of a sum of sharp lobes along ``directions``.

    Parameters
    ----------
    directions : ndarray (..., K, 3), NaN-padded
    weights : ndarray (..., K), 0 where absent
    """
    unit = np.nan_to_num(directions)
    cosine = np.einsum("...kc,vc->...kv", unit, SPHERE.vertices)
    sf = np.sum(weights[..., None] * np.exp(-kappa * (1 - cosine**2)), axis=-2)
    return sf @ sf_to_legacy_sh(sh_order_max)


def save_nifti(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4)), path)
    return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    phantom = make_phantom(SHAPE, seed=0)
    phantom.save(folder)
    files = [folder / f"{tissue}_true.txt" for tissue in phantom.response.tissues]
    phantom.response.to_mrtrix(files)
    phantom.folder = folder
    phantom.dwi = [folder / "dwi.nii.gz", folder / "bvals", folder / "bvecs"]
    phantom.response_args = [arg for tissue, path in zip(phantom.response.tissues, files)
                             for arg in (f"--response_{tissue}", path)]
    return phantom


@pytest.fixture(scope="module")
def fitted(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    result = run_cli("fit", *phantom.dwi, "--mask", phantom.folder / "mask.nii.gz",
                     *phantom.response_args, *TINY_MODEL, "--train_windows", 3, "--tournier",
                     "--out_dir", out)
    assert_ok(result)
    return out


def test_legacy_to_descoteaux_keeps_the_function():
    coeffs = np.random.default_rng(0).normal(size=(4, 45))
    converted = legacy_to_descoteaux(coeffs, 8)
    np.testing.assert_allclose(
        sh_to_sf(converted, SPHERE, sh_order_max=8, basis_type="descoteaux07", legacy=False),
        sh_to_sf(coeffs, SPHERE, sh_order_max=8, basis_type="descoteaux07", legacy=True),
        atol=1e-10)
    assert not np.allclose(converted, coeffs)


# --------------------------------------------------------------------------
# esdmri_response
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_response_matches_truth_and_respects_force(phantom, tmp_path, in_process):
    # No threshold to set: the estimator finds the phantom's GM (MD 0.0008),
    # which DIPY's GM rule (MD < 0.0007) misses.
    args = [*phantom.dwi, "--mask", phantom.folder / "mask.nii.gz", "--out_dir", tmp_path]
    assert_ok(run_cli("response", *args))
    files = [tmp_path / f"{tissue}.txt" for tissue in ("wm", "gm", "csf")]
    response = TissueResponse.from_mrtrix(files, ("wm", "gm", "csf"))
    np.testing.assert_allclose(response.bvals, [0, 1000, 2000, 3000])
    # WM voxels of the phantom are pure tensors: the estimate is close to the
    # analytic response (b0 row and l = 0, 2 terms of each shell). At b 3000
    # the signal along the fibre (0.6% of b0) sits under the noise (3% at
    # SNR 30), whose Rician floor lifts the estimate by about 10%.
    np.testing.assert_allclose(response["wm"][:3, :2], phantom.response["wm"][:3, :2],
                               rtol=0.06, atol=1.0)
    np.testing.assert_allclose(response["wm"][3, :2], phantom.response["wm"][3, :2],
                               rtol=0.15)

    before = files[0].read_text()
    files[0].write_text(before + "# edited\n")
    refused = run_cli("response", *args)
    assert_one_line_error(refused, "esdmri_response", "exists already: pass --force")
    assert files[0].read_text() == before + "# edited\n"
    in_process(ResponseFlow(), *args, "--force")
    assert files[0].read_text() == before


def test_single_shell_response_writes_wm_and_csf(phantom, tmp_path, in_process):
    # b0 plus one shell separates two tissues, WM and CSF as in MSMT-CSD (29 directions
    # at b = 1000: 30 or more get all three, esdmri.response.low_shell).
    keep = phantom.gtab.b0s_mask | ((phantom.gtab.bvals < 1500)
                                    & (np.cumsum(phantom.gtab.bvals > 500) <= 29))
    save_nifti(tmp_path / "dwi.nii.gz", phantom.data[..., keep])
    np.savetxt(tmp_path / "bvals", phantom.gtab.bvals[keep][None])
    np.savetxt(tmp_path / "bvecs", phantom.gtab.bvecs[keep].T)
    out = tmp_path / "out"
    in_process(ResponseFlow(), tmp_path / "dwi.nii.gz", tmp_path / "bvals",
               tmp_path / "bvecs", "--mask", phantom.folder / "mask.nii.gz", "--out_dir", out)
    assert sorted(path.name for path in out.iterdir()) == ["csf.txt", "wm.txt"]
    response = TissueResponse.from_mrtrix(out / "wm.txt", "wm")
    np.testing.assert_allclose(response["wm"][:, :2], phantom.response["wm"][:2, :2],
                               rtol=0.05, atol=1.0)
    keep = phantom.gtab.bvals < 1500
    save_nifti(tmp_path / "dwi.nii.gz", phantom.data[..., keep])
    np.savetxt(tmp_path / "bvals", phantom.gtab.bvals[keep][None])
    np.savetxt(tmp_path / "bvecs", phantom.gtab.bvecs[keep].T)
    in_process(ResponseFlow(), tmp_path / "dwi.nii.gz", tmp_path / "bvals",
               tmp_path / "bvecs", "--mask", phantom.folder / "mask.nii.gz", "--out_dir",
               tmp_path / "three")
    assert sorted(path.name for path in (tmp_path / "three").iterdir()) == [
        "csf.txt", "gm.txt", "wm.txt"]


def test_bad_input_gives_one_line_errors(phantom, tmp_path, in_process):
    message = in_process(ResponseFlow(), tmp_path / "nothing.nii.gz", *phantom.dwi[1:],
                         "--out_dir", tmp_path, fails=True)
    assert f"input_files: no file matches {tmp_path / 'nothing.nii.gz'}" in message

    bvals = phantom.gtab.bvals
    np.savetxt(tmp_path / "short.bval", bvals[:-1][None])
    message = in_process(ResponseFlow(), phantom.dwi[0], tmp_path / "short.bval",
                         phantom.dwi[2], "--out_dir", tmp_path, fails=True)
    assert "do not agree" in message
    np.savetxt(tmp_path / "short.bvec", phantom.gtab.bvecs[:-1].T)
    message = in_process(ResponseFlow(), phantom.dwi[0], tmp_path / "short.bval",
                         tmp_path / "short.bvec", "--out_dir", tmp_path, fails=True)
    assert (f"has {len(bvals)} volumes but {tmp_path / 'short.bval'} has {len(bvals) - 1} "
            "b-values") in message

    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    message = in_process(ResponseFlow(), *phantom.dwi, "--out_dir", blocker / "sub",
                         fails=True)
    assert f"{blocker} is a file, not a folder" in message
    assert not list(tmp_path.glob("*/*.txt")) and not list(tmp_path.glob("wm.txt"))


def test_subjects_writing_the_same_file_are_refused(phantom, tmp_path, in_process):
    for name in ("a", "b"):
        (tmp_path / f"{name}.nii.gz").symlink_to(phantom.dwi[0])
    message = in_process(ResponseFlow(), tmp_path / "*.nii.gz", *phantom.dwi[1:],
                         "--out_dir", tmp_path / "out", fails=True)
    assert "of the 2 subjects would write" in message and "--mix_names" in message


# --------------------------------------------------------------------------
# esdmri_fit / esdmri_apply
# --------------------------------------------------------------------------

def test_cli_defaults_are_the_api_defaults():
    # One source of truth: esdmri_fit once trained a network 16x as costly as
    # RTESDModel's default (nside 8, depth 3, block 12, batch 4 against 4, 2, 8, 1).
    import inspect

    from esdmri.reconst.config import (NetworkConfig, RefinementConfig, TrainingConfig,
                                       option_defaults)
    from esdmri.reconst.group import GROUP_OPTIONS, train_group
    from esdmri.reconst.models import RTESDModel
    from esdmri.workflows.train import TrainFlow
    # Each option's default is its configuration field's.
    options = option_defaults()
    assert options["nside"] == NetworkConfig().nside == 4
    # A single-scan fit trains nothing by default; group training 30 epochs.
    assert options["epochs"] == TrainingConfig().epochs == 0
    assert GROUP_OPTIONS["epochs"] == 30
    assert options["refine_steps"] == RefinementConfig().refine_steps == 300
    api = inspect.signature(RTESDModel.__init__).parameters
    group = inspect.signature(train_group).parameters
    for flow, training in ((FitFlow, options), (TrainFlow, {**options, **GROUP_OPTIONS})):
        cli = inspect.signature(flow.run).parameters
        for name in ("sh_order_max", "nside", "depth", "filter_start", "block_size"):
            assert cli[name].default == options[name], (flow.__name__, name)
        # The flag keeps its name; the option is train_tv (refine_tv is the refinement's).
        assert cli["total_variation"].default == options["train_tv"], flow.__name__
        for name in ("epochs", "batch_size", "lr", "seed"):
            assert cli[name].default == training[name], (flow.__name__, name)
    # Group training has no step budget (train_group); a single-scan fit's is a flag.
    assert inspect.signature(FitFlow.run).parameters["train_windows"].default == \
        options["train_windows"]
    assert inspect.signature(TrainFlow.run).parameters["batch_size"].default == 4
    assert inspect.signature(FitFlow.run).parameters["device"].default == api["device"].default
    assert inspect.signature(TrainFlow.run).parameters["device"].default == \
        group["device"].default
    assert inspect.signature(FitFlow.run).parameters["refine_steps"].default == \
        options["refine_steps"]
    # None: the scan's default (models.scan_defaults), as in the Python API.
    assert inspect.signature(FitFlow.run).parameters["refine_tv"].default is \
        options["refine_tv"] is None
    # --pretrained's text maps onto the option: the default is the shipped weights
    # (None: unless training), "none" the network-free fit, anything else a path.
    from esdmri.workflows.fit import pretrained_option
    default = inspect.signature(FitFlow.run).parameters["pretrained"].default
    assert pretrained_option(default) is options["pretrained"] is None
    assert pretrained_option("none") is False and pretrained_option("None") is False
    assert pretrained_option("weights.pt") == "weights.pt"
    # --noise_floor's text likewise: "none" is the option's None.
    from esdmri.workflows.fit import noise_floor_option
    default = inspect.signature(FitFlow.run).parameters["noise_floor"].default
    assert noise_floor_option(default) is options["noise_floor"] is None
    assert noise_floor_option("power") == "power"
    # The commands name the kinds and train_group's run options without
    # importing torch; they must be the library's.
    from esdmri.reconst.models import MODEL_CLASSES
    from esdmri.workflows.fit import MODEL_KINDS
    assert sorted(MODEL_KINDS) == sorted(MODEL_CLASSES)
    train_cli = inspect.signature(TrainFlow.run).parameters
    for name in ("precision", "compile", "num_workers"):
        assert train_cli[name].default == group[name].default, name


@pytest.mark.slow
def test_fit_writes_consistent_outputs(phantom, fitted):
    shm = nib.load(fitted / "fodf_sh.nii.gz").get_fdata()
    assert shm.shape == SHAPE + (15,)
    assert np.any(shm[phantom.mask] != 0) and np.all(shm[~phantom.mask] == 0)
    # The MRtrix3 copy is the same function in the tournier07 basis.
    tournier = nib.load(fitted / "fodf_sh_tournier07.nii.gz").get_fdata()
    np.testing.assert_allclose(descoteaux_to_legacy(tournier_to_descoteaux(tournier, 4), 4),
                               shm, atol=1e-5)
    image = nib.load(fitted / "fractions.nii.gz")
    fractions = image.get_fdata()
    assert fractions.shape == SHAPE + (3,)
    assert image.header["descrip"].item().decode().endswith("wm,gm,csf")
    np.testing.assert_allclose(fractions[phantom.mask].sum(-1), 1, atol=1e-5)
    # The .pam5 peaks are those of the SH file.
    pam = load_pam(str(fitted / "peaks.pam5"), verbose=False)
    directions, _ = peaks_from_sh(legacy_to_descoteaux(shm, 4), sphere=pam.sphere,
                                  mask=phantom.mask)
    # Every peak found from the file is one of the .pam5 peaks (equal peaks of a
    # crossing may come in either order after the file's float32 rounding).
    found = np.isfinite(directions[..., 0])
    assert found.any()
    cosines = np.abs(np.einsum("...pi,...qi->...pq", np.nan_to_num(directions), pam.peak_dirs))
    best = cosines.max(axis=-1)[found]
    assert np.mean(best[..., 0] > 1 - 1e-3) > 0.98
    model = load_model(fitted / "model.pt", verbose=False)
    assert model.training_history and model.config.training.train_windows == 3
    assert mpimg.imread(fitted / "training_curve.png").std() > 0


@pytest.mark.slow
def test_fit_refuses_to_overwrite(phantom, fitted, in_process):
    before = (fitted / "fodf_sh.nii.gz").read_bytes()
    message = in_process(FitFlow(), *phantom.dwi, *phantom.response_args, *TINY_MODEL,
                         "--out_dir", fitted, fails=True)
    assert "exists already: pass --force" in message
    assert (fitted / "fodf_sh.nii.gz").read_bytes() == before


@pytest.mark.slow
def test_default_fit_trains_nothing_and_writes_no_curve(phantom, in_process, tmp_path):
    # Without --epochs the model's default, no training: the same fODFs as
    # the library's RTESDModel with its defaults, and no training curve.
    untrained = [arg for arg in TINY_MODEL if arg not in ("--epochs", "1")]
    in_process(FitFlow(), *phantom.dwi, "--mask", phantom.folder / "mask.nii.gz",
               *phantom.response_args, *untrained, "--out_dir", tmp_path)
    assert not (tmp_path / "training_curve.png").exists()
    assert load_model(tmp_path / "model.pt", verbose=False).training_history == []
    model = RTESDModel(phantom.gtab, phantom.response, sh_order_max=4, nside=2, depth=2,
                       filter_start=2, block_size=8, verbose=False)
    expected = model.fit(phantom.data, mask=phantom.mask).shm_coeff
    np.testing.assert_allclose(nib.load(tmp_path / "fodf_sh.nii.gz").get_fdata(), expected,
                               atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("noise_floor", ["power", "model"])
def test_fit_debiases_the_noise_floor_like_the_library(phantom, in_process, tmp_path,
                                                       noise_floor):
    # --noise_floor reaches the model: the command's fODFs are the library's
    # with the same option, and differ from the least-squares fit of the magnitudes.
    untrained = [arg for arg in TINY_MODEL if arg not in ("--epochs", "1")]
    in_process(FitFlow(), *phantom.dwi, "--mask", phantom.folder / "mask.nii.gz",
               *phantom.response_args, *untrained, "--noise_floor", noise_floor,
               "--out_dir", tmp_path)
    options = dict(sh_order_max=4, nside=2, depth=2, filter_start=2, block_size=8,
                   verbose=False)
    debiased = RTESDModel(phantom.gtab, phantom.response, noise_floor=noise_floor, **options)
    expected = debiased.fit(phantom.data, mask=phantom.mask).shm_coeff
    written = nib.load(tmp_path / "fodf_sh.nii.gz").get_fdata()
    np.testing.assert_allclose(written, expected, atol=1e-4)
    plain = RTESDModel(phantom.gtab, phantom.response, **options)
    assert np.abs(written - plain.fit(phantom.data, mask=phantom.mask).shm_coeff).max() > 1e-3
    message = in_process(FitFlow(), *phantom.dwi, "--mask", phantom.folder / "mask.nii.gz",
                         *phantom.response_args, *untrained, "--noise_floor", "median",
                         "--out_dir", tmp_path / "bad", fails=True)
    assert "noise_floor" in message and "median" in message


@pytest.mark.slow
def test_apply_reproduces_the_fit(phantom, fitted, tmp_path):
    result = run_cli("apply", fitted / "model.pt", *phantom.dwi, "--mask",
                     phantom.folder / "mask.nii.gz", "--vertex_peaks", "--out_dir", tmp_path)
    assert_ok(result)
    assert "esdmri_apply" in result.stderr  # the progress bar over subjects
    assert not (tmp_path / "model.pt").exists()
    np.testing.assert_allclose(nib.load(tmp_path / "fodf_sh.nii.gz").get_fdata(),
                               nib.load(fitted / "fodf_sh.nii.gz").get_fdata(), atol=1e-4)
    np.testing.assert_allclose(nib.load(tmp_path / "fractions.nii.gz").get_fdata(),
                               nib.load(fitted / "fractions.nii.gz").get_fdata(), atol=1e-4)

    def at_vertices(pam):
        """Per peak: whether it lies on a vertex of the search sphere."""
        directions = pam.peak_dirs[np.any(pam.peak_dirs != 0, axis=-1)]
        return np.abs(directions @ pam.sphere.vertices.T).max(axis=-1) > 1 - 1e-9

    # --vertex_peaks keeps DIPY's vertices; the fit's peaks were refined between them.
    assert at_vertices(load_pam(str(tmp_path / "peaks.pam5"), verbose=False)).all()
    assert at_vertices(load_pam(str(fitted / "peaks.pam5"), verbose=False)).mean() < 0.1


# --------------------------------------------------------------------------
# esdmri_track
# --------------------------------------------------------------------------

def test_deterministic_tracking_follows_an_oblique_fibre(tmp_path):
    # An oblique fibre catches a basis mix-up: legacy and non-legacy
    # descoteaux07 differ by a reflection that would turn it.
    direction = np.array([1.0, 1.0, 0.5]) / 1.5
    shape = (10, 10, 10)
    sh = lobe_sh(np.broadcast_to(direction, shape + (1, 3)), np.ones(shape + (1,)),
                 sh_order_max=8)
    save_nifti(tmp_path / "sh.nii.gz", sh)
    seeds = np.zeros(shape)
    seeds[4:6, 4:6, 4:6] = 1
    save_nifti(tmp_path / "seeds.nii.gz", seeds)
    result = run_cli("track", tmp_path / "sh.nii.gz", "--seeds", tmp_path / "seeds.nii.gz",
                     "--min_length", 2, "--out_dir", tmp_path)
    assert_ok(result)
    tractogram = load_tractogram(str(tmp_path / "tractogram.trk"), "same")
    assert len(tractogram.streamlines) == 8
    steps = np.concatenate([np.diff(line, axis=0) for line in tractogram.streamlines])
    cosine = np.abs(steps @ direction) / np.linalg.norm(steps, axis=1)
    assert np.degrees(np.arccos(np.clip(cosine.min(), 0, 1))) < 5
    points = np.concatenate(list(tractogram.streamlines))
    assert points.min() >= -0.5 and points.max() <= 9.5  # identity affine: RAS mm = voxels


def test_default_stopping_map_stops_where_the_fodf_is_small(tmp_path, in_process):
    # Same fODF shape everywhere (same GFA), 20x smaller for x >= 5 (CSF- or
    # GM-like voxels of an unnormalised fit): the default map, the relative
    # peak amplitude, stops there; GFA (the former default) tracked through.
    shape = (10, 4, 4)
    weights = np.where(np.arange(shape[0]) < 5, 1.0, 0.05)[:, None, None, None]
    weights = np.broadcast_to(weights, shape + (1,))
    sh = lobe_sh(np.broadcast_to([1.0, 0.0, 0.0], shape + (1, 3)), weights, sh_order_max=8)
    save_nifti(tmp_path / "sh.nii.gz", sh)
    in_process(TrackFlow(), tmp_path / "sh.nii.gz", "--min_length", 1, "--out_dir", tmp_path)
    tractogram = load_tractogram(str(tmp_path / "tractogram.trk"), "same")
    points = np.concatenate(list(tractogram.streamlines))
    assert len(tractogram.streamlines) > 0
    assert points[:, 0].max() < 5.0  # never beyond the last strong voxel (x = 4)
    amplitude = sh_peak_amplitude(sh)
    np.testing.assert_allclose(amplitude[:5], 1.0, rtol=1e-6)
    np.testing.assert_allclose(amplitude[5:], 0.05, rtol=1e-6)


@pytest.mark.slow
def test_probabilistic_tracking_from_pam5_to_trx(fitted, tmp_path, in_process):
    in_process(TrackFlow(), fitted / "peaks.pam5", "--stop", fitted / "fractions.nii.gz",
               "--threshold", 0.3, "--tracker", "prob", "--min_length", 1,
               "--out_tractogram", "prob.trx", "--out_dir", tmp_path)
    tractogram = load_tractogram(str(tmp_path / "prob.trx"), "same")
    assert tractogram.dimensions.tolist() == list(SHAPE)
    message = in_process(TrackFlow(), fitted / "peaks.pam5", "--out_tractogram", "x.nii",
                         "--out_dir", tmp_path, fails=True)
    assert "out_tractogram must end with" in message


# --------------------------------------------------------------------------
# esdmri_eval
# --------------------------------------------------------------------------

def read_rows(path):
    with open(path) as handle:
        return {row["subset"]: row for row in csv.DictReader(handle)}


def test_eval_scores_known_fodfs(phantom, tmp_path):
    save_nifti(tmp_path / "a_truth_like.nii.gz",
               lobe_sh(phantom.fibre_dirs, phantom.fibre_fractions))
    # Fibres turned by 90 degrees about z: in-plane single fibres are 90 degrees off.
    turned = phantom.fibre_dirs @ np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1.0]])
    save_nifti(tmp_path / "b_turned.nii.gz", lobe_sh(turned, phantom.fibre_fractions))
    result = run_cli("evaluate", tmp_path / "*.nii.gz", phantom.folder / "ground_truth.npz",
                     "--relative_peak_threshold", 0.2, "--mix_names", "--out_dir", tmp_path)
    assert_ok(result)
    assert "angular_error" in result.stdout
    good = read_rows(next(tmp_path.glob("a_truth_like*metrics.csv")))
    assert int(good["all"]["n_voxels"]) == int(np.count_nonzero(phantom.n_fibres))
    assert float(good["1 fibre"]["angular_error"]) < 3
    assert float(good["1 fibre"]["success_rate"]) == 1
    bad = read_rows(next(tmp_path.glob("b_turned*metrics.csv")))
    assert float(bad["1 fibre"]["angular_error"]) > 45


def test_eval_scores_a_tractogram_against_the_heldout_bundles(tmp_path, in_process):
    # The held-out phantom's own streamlines: all valid connections, every
    # bundle found; the bundles can be given as masks or as tractograms.
    from dipy.io.stateful_tractogram import Space, StatefulTractogram
    from dipy.io.streamline import save_tractogram

    from esdmri.heldout_phantom import make_heldout_phantom

    heldout = make_heldout_phantom((16, 16, 16), snr=None, n_bundles=3)
    folder = tmp_path / "heldout"
    heldout.save(folder)
    save_nifti(tmp_path / "sh.nii.gz", lobe_sh(heldout.fibre_dirs, heldout.fibre_fractions,
                                               sh_order_max=8))
    for b, bundle in enumerate(heldout.bundles):
        save_tractogram(StatefulTractogram(bundle.streamlines, str(folder / "mask.nii.gz"),
                                           Space.VOX), str(tmp_path / f"b{b}.trk"),
                        bbox_valid_check=False)
    for masks, out in ((folder / "bundles" / "*.nii.gz", "masks"), (tmp_path / "b*.trk", "trk")):
        in_process(EvaluateFlow(), tmp_path / "sh.nii.gz", folder / "ground_truth.npz",
                   "--tractogram", folder / "streamlines.trk",
                   "--end_regions", folder / "end_regions" / "*.nii.gz",
                   "--bundle_masks", masks, "--out_dir", tmp_path / out)
        with open(tmp_path / out / "tractography.csv") as handle:
            row = next(csv.DictReader(handle))
        assert int(row["vc"]) == int(row["n_streamlines"]) == 3 * 40
        assert int(row["valid_bundles"]) == 3 and int(row["invalid_bundles"]) == 0
        assert float(row["overlap"]) > 0.3 and float(row["steps_along_fibres"]) > 0.9
    message = in_process(EvaluateFlow(), tmp_path / "sh.nii.gz", folder / "ground_truth.npz",
                         "--tractogram", folder / "streamlines.trk", "--out_dir",
                         tmp_path / "x", fails=True)
    assert "--tractogram needs --end_regions" in message


def test_eval_reads_a_disco_folder(tmp_path, in_process):
    # A fake low-resolution DiSCo phantom 2 as esdmri_fetch lays it out, with
    # one noisy DWI only and MRtrix3-basis (tournier07) ground truth.
    folder = tmp_path / "home" / "disco" / "disco_2"
    folder.mkdir(parents=True)
    shape = (20, 20, 20)
    bvals = np.r_[0.0, np.full(6, 1000.0)]
    bvecs = np.vstack([np.zeros(3), SPHERE.vertices[:6]])
    np.savetxt(folder / "DiSCo_gradients.bvals", bvals[None])
    np.savetxt(folder / "DiSCo_gradients_dipy.bvecs", bvecs.T)
    save_nifti(folder / "lowRes_DiSCo2_DWI_RicianNoise-snr30.nii.gz", np.ones(shape + (7,)))
    mask = np.zeros(shape)
    mask[5:15, 5:15, 8:12] = 1
    save_nifti(folder / "lowRes_DiSCo2_mask.nii.gz", mask)
    direction = np.array([1.0, 1.0, 0.5]) / 1.5
    lobe = lobe_sh(np.broadcast_to(direction, shape + (1, 3)), mask[..., None])
    save_nifti(folder / "lowRes_DiSCo2_Strand_ODFs.nii.gz",
               descoteaux_to_tournier(legacy_to_descoteaux(lobe, 12), 12))
    save_nifti(tmp_path / "sh.nii.gz", lobe_sh(np.broadcast_to(direction, shape + (1, 3)),
                                               mask[..., None], sh_order_max=8))
    in_process(EvaluateFlow(), tmp_path / "sh.nii.gz", folder, "--out_dir", tmp_path)
    rows = read_rows(tmp_path / "metrics.csv")
    assert int(rows["all"]["n_voxels"]) == mask.sum()
    assert float(rows["all"]["angular_error"]) < 2
    assert float(rows["all"]["success_rate"]) == 1


@pytest.mark.slow
def test_eval_pam5_and_fractions(phantom, fitted, tmp_path, in_process):
    truth = phantom.folder / "ground_truth.npz"
    true_fractions = save_nifti(tmp_path / "true_fractions.nii.gz", phantom.tissue_fractions)
    in_process(EvaluateFlow(), fitted / "peaks.pam5", truth, "--fractions", true_fractions,
               "--out_dir", tmp_path)
    assert read_rows(tmp_path / "metrics.csv")["all"]["n_voxels"]
    with open(tmp_path / "fraction_metrics.csv") as handle:
        scores = next(csv.DictReader(handle))
    assert float(scores["mae"]) < 1e-6 and float(scores["kl"]) < 1e-6
    message = in_process(EvaluateFlow(), true_fractions, truth, "--out_dir", tmp_path / "x",
                         fails=True)
    assert "coefficients in its last axis" in message


# --------------------------------------------------------------------------
# esdmri_plot
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_plot_writes_distinct_figures(phantom, fitted, tmp_path, in_process):
    save_nifti(tmp_path / "a_sh.nii.gz", lobe_sh(phantom.fibre_dirs, phantom.fibre_fractions))
    turned = phantom.fibre_dirs[..., ::-1]  # x and z swapped
    save_nifti(tmp_path / "b_sh.nii.gz", lobe_sh(turned, phantom.fibre_fractions))
    result = run_cli("plot", tmp_path / "*_sh.nii.gz", "--mix_names",
                     "--fractions", fitted / "fractions.nii.gz", "--background",
                     fitted / "fractions.nii.gz", "--out_dir", tmp_path / "figures")
    assert_ok(result)
    figures = sorted((tmp_path / "figures").glob("*odf_slice.png"))
    assert len(figures) == 2
    first, second = (mpimg.imread(path) for path in figures)
    assert first.std() > 0 and first.shape == second.shape
    assert np.abs(first - second).mean() > 1e-3
    assert len(list((tmp_path / "figures").glob("*fraction_maps.png"))) == 2
    in_process(PlotFlow(), fitted / "peaks.pam5", "--peaks", "--axis", 0, "--index", 3,
               "--out_dir", tmp_path)
    assert mpimg.imread(tmp_path / "odf_slice.png").std() > 0


# --------------------------------------------------------------------------
# esdmri_demo
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, in_process):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--size", 8, "--epochs", 1, "--out_dir", out)
    assert_ok(result)
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["RT-ESD", "RT-ESD", "CSD", "CSD"]
    # CSD with the true response finds the single fibres of the phantom.
    assert float(rows[2]["angular_error"]) < 15
    assert str(out / "results.md") in result.stdout
    for method in ("rtesd", "csd"):
        load_pam(str(out / method / "peaks.pam5"), verbose=False)
        load_tractogram(str(out / method / "tractogram.trk"), "same")
    assert mpimg.imread(out / "figures" / "angular_error_vs_crossing.png").std() > 0
    # The tractography quick-look: both methods' streamlines over a slice.
    assert mpimg.imread(out / "figures" / "tractography.png").std() > 0
    assert mpimg.imread(out / "rtesd" / "training_curve.png").std() > 0
    message = in_process(DemoFlow(), "--quick", "--size", 8, "--out_dir", out, fails=True)
    assert "exists already: pass --force" in message
    # Without --epochs the model's default trains nothing: no training curve.
    default = tmp_path / "default"
    in_process(DemoFlow(), "--quick", "--size", 8, "--out_dir", default)
    assert (default / "results.csv").exists()
    assert not (default / "rtesd" / "training_curve.png").exists()


# --------------------------------------------------------------------------
# Interrupted commands leave nothing behind
# --------------------------------------------------------------------------

# Runs a command whose nibabel.save leaves its `pause_at`-th file half-written,
# then signals the test (a marker file) and waits to be interrupted.
PAUSING_COMMAND = """
import os, runpy, sys, time
import nibabel

marker, pause_at, module, *args = sys.argv[1:]
real_save = nibabel.save
saved = []

def save_then_pause(image, path):
    real_save(image, path)
    saved.append(path)
    if len(saved) == int(pause_at):
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        open(marker, "w").close()
        time.sleep(300)

nibabel.save = save_then_pause
sys.argv = [module, *args]
runpy.run_module(f"esdmri.workflows.{module}", run_name="__main__")
"""


def interrupt_while_writing(tmp_path, pause_at, signal_number, module, *args):
    """Start ``module`` with PAUSING_COMMAND, send ``signal_number`` once it pauses."""
    marker = tmp_path / f"paused-{signal_number}"
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING_COMMAND, str(marker), str(pause_at), module,
         *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate(timeout=60)[1][-3000:]
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal_number
    return stderr


@pytest.mark.slow
def test_interrupted_fit_leaves_nothing_and_the_rerun_needs_no_force(phantom, tmp_path,
                                                                    in_process):
    out = tmp_path / "fit"
    args = [*phantom.dwi, *phantom.response_args, *TINY_MODEL, "--refine_steps", 1,
            "--tournier", "--out_dir", out]
    # Ctrl-C while the second NIfTI (the tournier07 copy) is half-written: the
    # first one is complete, but a command's outputs come all or none.
    stderr = interrupt_while_writing(tmp_path, 2, signal.SIGINT, "fit", *args)
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("esdmri_fit: interrupted (SIGINT); no partial "
                                               "output was left behind")
    assert sorted(os.listdir(out)) == []

    in_process(FitFlow(), *args)
    assert sorted(os.listdir(out)) == sorted(
        ["fodf_sh.nii.gz", "fodf_sh_tournier07.nii.gz", "fractions.nii.gz", "peaks.pam5",
         "model.pt", "training_curve.png"])
    assert nib.load(out / "fodf_sh_tournier07.nii.gz").get_fdata().shape == SHAPE + (15,)


# esdmri_response that stops after writing its response files, before the
# command's transaction renames them into place.
PAUSING_RESPONSE = """
import runpy, sys, time
import esdmri.response

marker, *args = sys.argv[1:]
real = esdmri.response.TissueResponse.to_mrtrix

def write_then_pause(self, files, force=False):
    real(self, files, force=force)
    open(marker, "w").close()
    time.sleep(300)

esdmri.response.TissueResponse.to_mrtrix = write_then_pause
sys.argv = ["esdmri_response", *args]
runpy.run_module("esdmri.workflows.response", run_name="__main__")
"""


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL])
def test_terminated_or_killed_runs_block_nothing(phantom, tmp_path, in_process, signal_number):
    out = tmp_path / "out"
    out.mkdir()
    args = [*phantom.dwi, "--mask", phantom.folder / "mask.nii.gz", "--out_dir", out]
    marker = tmp_path / "paused"
    process = subprocess.Popen([sys.executable, "-c", PAUSING_RESPONSE, str(marker),
                                *map(str, args)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate(timeout=60)[1][-3000:]
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    left = os.listdir(out)
    if signal_number == signal.SIGTERM:
        assert left == []  # unwound like Ctrl-C: temporary files removed
        assert process.returncode == 128 + signal.SIGTERM
        assert stderr.strip().splitlines()[-1] == (
            "esdmri_response: interrupted (SIGTERM); no partial output was left behind")
    else:
        # SIGKILL cannot be caught: the temporary files stay, hidden.
        assert left and all(name.startswith(PARTIAL_PREFIX) for name in left)

    in_process(ResponseFlow(), *args)
    written = sorted(name for name in os.listdir(out) if not name.startswith(PARTIAL_PREFIX))
    assert written == ["csf.txt", "gm.txt", "wm.txt"]
    TissueResponse.from_mrtrix([out / name for name in ("wm.txt", "gm.txt", "csf.txt")],
                               ("wm", "gm", "csf"))
