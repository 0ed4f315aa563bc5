"""Fine-tuning the shipped correction on the scan (issues 25 and 27, ``epochs=N``).

The phantoms here use geometry and noise seeds of their own (920 and up), none of
the dev or test seeds of ``benchmarks/devset.py`` and ``benchmarks/heldout.py``.
"""

import shutil
import warnings

import numpy as np
import pytest
import torch
from benchmarks.network_test import objective
from test_pretrained import symmetry_error

from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.reconst import pretrained
from esdmri.reconst.finetune import finetuning_weights, weights_origin
from esdmri.reconst.models import RTESDModel, load_model
from esdmri.reconst.network import build_fodf_sampler, build_forward_model
from esdmri.reconst.subjects import ScanBlocks
from esdmri.reconst.training import coefficient_loss
from esdmri.shm import n_coeffs
from esdmri.testing import REFLECT_X, ROTATE_Z_90

SIDE = 8
# A short fine-tuning: 3 epochs of the fine-tuning recipe (batches of 4 windows, lr 1e-3).
FAST = dict(epochs=3, refine_steps=0, verbose=False)


@pytest.fixture(scope="module")
def phantom():
    return make_heldout_phantom((SIDE,) * 3, snr=20, seed=921, geometry_seed=920)


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.fixture(scope="module")
def tuned(phantom):
    model = RTESDModel(phantom.gtab, **FAST)
    fit = quiet(model.fit, phantom.data, mask=phantom.mask)
    return model, fit


def test_finetuning_loss_is_the_refinements_objective_per_voxel(phantom):
    # The training loss of one window holding the whole volume, against the
    # refinement's own objective (its written-out voxel loss and total variation).
    model = RTESDModel(phantom.gtab, phantom.response, verbose=False)
    scan = model.prepare(phantom.data, mask=phantom.mask)
    prior = model.prior_coefficients(scan)
    weights = finetuning_weights(model.config, scan.normalized, scan.mask)
    assert weights.tv_form == "coupled" and weights.total_variation > 0
    order = model.config.network.sh_order_max

    def volume(values):
        return torch.as_tensor(values, dtype=torch.float32).permute(3, 0, 1, 2)[None]

    total, _ = coefficient_loss(
        volume(prior), n_coeffs(order), build_forward_model(scan.response, model.gtab, order),
        build_fodf_sampler(order), volume(scan.normalized), torch.as_tensor(scan.mask)[None],
        weights)
    assert float(total) == pytest.approx(objective(model, prior, scan), rel=1e-4)
    # Without the refinement's total variation, the loss is the per-voxel loss alone.
    flat = model.with_options(refine_tv=0.0).config
    assert finetuning_weights(flat, scan.normalized, scan.mask).total_variation == 0


@pytest.mark.slow
def test_finetuning_lowers_the_refinements_objective_below_the_pretrained_correction(
        phantom, tuned):
    model, _ = tuned
    summary = model.training_summary
    assert not summary["fell_back"]
    assert summary["best_loss"] < summary["start_loss"]
    assert summary["started_from"] == pretrained.DEFAULT_SHA256["e3so3-stem"]
    assert model.network is None  # no per-scan network: the correction was trained
    # Independently of the trainer's windows: the whole volume's objective.
    scan = model.prepare(phantom.data, mask=phantom.mask)
    prior = model.prior_coefficients(scan)
    untrained = RTESDModel(phantom.gtab, model.response, verbose=False)
    start = objective(model, untrained.corrected_prior(prior, scan), scan)
    end = objective(model, model.corrected_prior(prior, scan), scan)
    assert end < start


@pytest.mark.slow
def test_a_saved_finetuned_model_reloads_to_identical_output(phantom, tuned, tmp_path,
                                                             monkeypatch):
    model, fit = tuned
    path = tmp_path / "model.pt"
    model.save(path)
    # The file holds the fine-tuned weights: the ones it started from are not needed.
    monkeypatch.setitem(pretrained.DEFAULT_WEIGHTS, "e3so3-stem", tmp_path / "absent.pt")
    loaded = load_model(path, verbose=False)
    assert loaded.correction_origin["sha256"] == pretrained.DEFAULT_SHA256["e3so3-stem"]
    assert loaded.training_summary["started_from"] == pretrained.DEFAULT_SHA256["e3so3-stem"]
    assert loaded.training_history == model.training_history
    again = loaded.fit(phantom.data, mask=phantom.mask)  # trained: no fine-tuning again
    np.testing.assert_array_equal(again.shm_coeff, fit.shm_coeff)
    monkeypatch.undo()
    untrained = quiet(RTESDModel(phantom.gtab, model.response, refine_steps=0,
                                 verbose=False).fit, phantom.data, mask=phantom.mask)
    assert np.abs(untrained.shm_coeff - fit.shm_coeff).max() > 1e-4


def test_model_files_without_the_new_entries_load_as_they_fitted(phantom, tmp_path):
    model = RTESDModel(phantom.gtab, refine_steps=0, verbose=False)
    fit = model.fit(phantom.data, mask=phantom.mask)
    expected = fit.shm_coeff
    path = tmp_path / "model.pt"
    model.with_response(fit.response).save(path)
    saved = torch.load(path, weights_only=True)
    del saved["training_summary"], saved["correction"]  # a file of the former layout
    torch.save(saved, path)
    loaded = load_model(path, verbose=False)
    assert loaded.correction_origin is None and loaded.training_summary is None
    np.testing.assert_array_equal(loaded.fit(phantom.data, mask=phantom.mask).shm_coeff,
                                  expected)


@pytest.mark.slow
def test_a_finetuning_that_raises_the_loss_falls_back_and_says_so(phantom, tmp_path):
    model = RTESDModel(phantom.gtab, phantom.response, epochs=1, batch_size=4, lr=50.0,
                       warmup_steps=0, refine_steps=0, verbose=False)
    with pytest.warns(UserWarning, match="did not lower the evaluation loss"):
        fit = model.fit(phantom.data, mask=phantom.mask)
    summary = model.training_summary
    assert summary["fell_back"] and summary["best_epoch"] is None
    assert model.training_history[-1]["eval_total"] > summary["start_loss"]
    untrained = RTESDModel(phantom.gtab, phantom.response, refine_steps=0, verbose=False)
    np.testing.assert_array_equal(fit.shm_coeff,
                                  untrained.fit(phantom.data, mask=phantom.mask).shm_coeff)
    model.save(tmp_path / "model.pt")
    assert load_model(tmp_path / "model.pt", verbose=False).training_summary["fell_back"]


@pytest.mark.slow
@pytest.mark.parametrize("symmetry", [ROTATE_Z_90, REFLECT_X], ids=["rot_z_90", "reflect_x"])
def test_finetuned_correction_commutes_with_grid_and_sphere_symmetries(tuned, symmetry):
    model, _ = tuned
    correction = model.pretrained_correction()
    shipped = pretrained.load_correction(True)
    assert any(not torch.equal(a, b) for a, b in zip(correction.state_dict().values(),
                                                     shipped.state_dict().values()))
    assert symmetry_error(correction, symmetry) < 1e-6


@pytest.mark.slow
def test_other_weights_are_finetuned_and_recorded(phantom, tmp_path):
    path = tmp_path / "weights.pt"
    shutil.copy(pretrained.DEFAULT_WEIGHTS["e3so3-stem"], path)
    model = RTESDModel(phantom.gtab, phantom.response, pretrained=path, epochs=1, batch_size=8,
                       lr=3e-4, refine_steps=0, verbose=False)
    quiet(model.fit, phantom.data, mask=phantom.mask)
    assert model.correction_origin == {"weights": str(path),
                                       "sha256": pretrained.sha256_of(path)}
    assert model.training_history


def test_finetuning_needs_one_prepared_scan(phantom, tmp_path):
    model = RTESDModel(phantom.gtab, phantom.response, epochs=1, verbose=False)
    scan = model.prepare(phantom.data, mask=phantom.mask)
    blocks = ScanBlocks.from_scan(scan, 8)
    with pytest.raises(ValueError, match="pretrained=False"):
        model.train(blocks)
    with pytest.raises(ValueError, match="checkpoint"):
        model.train(scan, checkpoint=tmp_path / "checkpoint.pt")
    # pretrained=False, epochs=N trains the per-scan network from scratch.
    scratch = model.with_options(pretrained=False)
    quiet(scratch.train, scan, max_steps=1)
    assert scratch.network is not None and scratch.correction_origin is None


@pytest.mark.parametrize("kind", sorted(pretrained.DEFAULT_WEIGHTS))
def test_the_recorded_origin_is_the_model_classs_own_weights(kind):
    origin = weights_origin(True, kind)
    assert origin == {"weights": str(pretrained.DEFAULT_WEIGHTS[kind]),
                      "sha256": pretrained.DEFAULT_SHA256[kind]}
