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
from dipy.core.gradients import gradient_table
from test_pretrained import symmetry_error

from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.reconst import pretrained
from esdmri.reconst.config import MAX_HOLDOUT
from esdmri.reconst.finetune import (HeldOutError, finetune_correction, finetuning_weights,
                                     holdout_volumes, retained_scan, weights_origin)
from esdmri.reconst.models import RTESDModel, load_model
from esdmri.reconst.network import build_fodf_sampler, build_forward_model
from esdmri.reconst.subjects import ScanBlocks
from esdmri.reconst.training import coefficient_loss
from esdmri.shm import n_coeffs
from esdmri.testing import REFLECT_X, ROTATE_Z_90

SIDE = 8
# A short fine-tuning: 3 epochs of the fine-tuning recipe (batches of 4 windows, lr 1e-3),
# every volume fitted and the evaluation loss keeping the weights (no hold-out).
FAST = dict(epochs=3, refine_steps=0, holdout=0.0, verbose=False)


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
                       warmup_steps=0, refine_steps=0, holdout=0.0, verbose=False)
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


# -- q-space hold-out: the selection that a scan provides -------------------
def shelled_gtab(directions, b0s=2, seed=0):
    """A gradient table of ``b0s`` b0s and one shell per (b-value, directions) pair."""
    rng = np.random.default_rng(seed)
    bvals, bvecs = [0.0] * b0s, [np.zeros(3)] * b0s
    for bval, count in directions:
        vectors = rng.normal(size=(count, 3))
        bvals += [bval] * count
        bvecs += list(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    return gradient_table(np.array(bvals), bvecs=np.array(bvecs))


def test_holdout_is_drawn_per_shell_from_the_seed_and_keeps_the_b0s():
    gtab = shelled_gtab([(1000, 64), (2000, 30), (3000, 9)], b0s=4)
    held = holdout_volumes(gtab, 0.125, seed=3)
    np.testing.assert_array_equal(held, holdout_volumes(gtab, 0.125, seed=3))
    assert not np.array_equal(held, holdout_volumes(gtab, 0.125, seed=4))
    assert not held[gtab.b0s_mask].any()
    for bval, count in ((1000, 64), (2000, 30), (3000, 9)):
        shell = gtab.bvals == bval
        assert held[shell].sum() == int(np.floor(0.125 * count))  # 8, 3, 1
    # The largest share never takes a whole shell, not even one of a single direction.
    single = shelled_gtab([(1000, 1), (2000, 7)])
    held = holdout_volumes(single, MAX_HOLDOUT)
    assert not held[single.bvals == 1000].any() and held[single.bvals == 2000].sum() == 3


def test_holdout_refuses_a_scan_with_too_few_directions_and_bad_shares():
    with pytest.raises(ValueError, match=r"holdout=0\.125 holds out no volume.*\[6, 7\]"):
        holdout_volumes(shelled_gtab([(1000, 6), (2000, 7)]), 0.125)
    gtab = shelled_gtab([(1000, 64)])
    for bad in (0.0, -0.1, 0.6):
        with pytest.raises(ValueError, match="holdout must lie in"):
            holdout_volumes(gtab, bad)
    with pytest.raises(ValueError, match="holdout must lie in"):
        RTESDModel(gtab, holdout=0.75)
    with pytest.raises(ValueError, match="holdout_refine_steps"):
        RTESDModel(gtab, holdout_refine_steps=-1)


def test_the_retained_scan_is_the_scan_acquired_without_the_held_out_volumes(phantom):
    model = RTESDModel(phantom.gtab, phantom.response, verbose=False)
    scan = model.prepare(phantom.data, mask=phantom.mask)
    held = holdout_volumes(phantom.gtab, 0.125)
    retained = retained_scan(scan, held, model.sphere.vertices)
    # Against a model of the acquisition that never had those volumes.
    keep = ~held
    alone = RTESDModel(gradient_table(phantom.gtab.bvals[keep], bvecs=phantom.gtab.bvecs[keep]),
                       verbose=False).with_response(scan.response)
    scan_alone = alone.prepare(phantom.data[..., keep], mask=phantom.mask)
    np.testing.assert_array_equal(retained.normalized, scan_alone.normalized)
    np.testing.assert_allclose(model.prior_coefficients(retained),
                               alone.prior_coefficients(scan_alone), atol=1e-6)
    # The held-out error of the linear prior itself (no correction): a brute-force sum.
    judge = HeldOutError(scan, held, alone.prior_coefficients(scan_alone), model.config)
    predicted = np.einsum("vc,cn->vn", alone.prior_coefficients(scan_alone)[scan.mask],
                          build_forward_model(scan.response, phantom.gtab,
                                              model.config.network.sh_order_max).matrix.numpy())
    expected = np.mean((predicted[:, held] - scan.normalized[scan.mask][:, held]) ** 2)
    assert judge.error(alone.prior_coefficients(scan_alone)) == pytest.approx(expected, rel=1e-5)
    # A held-out selection that does not fit the scan is refused by name.
    for bad in (held[:-1], held.astype(int)):
        with pytest.raises(ValueError, match="held must be a boolean array"):
            retained_scan(scan, bad, model.sphere.vertices)


def test_the_held_out_error_decides_the_kept_weights_and_falls_back_when_it_rises(phantom):
    # A fine-tuning whose loss falls (lr 1e-3) but whose selection score rises after
    # the start: the starting weights are kept, and the warning names the held-out error.
    model = RTESDModel(phantom.gtab, phantom.response, epochs=2, refine_steps=0,
                       verbose=False)
    scan = model.prepare(phantom.data, mask=phantom.mask)
    start = model.pretrained_correction()
    scores = iter([1.0, 1.5, 2.0])
    with pytest.warns(UserWarning, match="did not lower the held-out error"):
        tuned, history, summary = finetune_correction(
            start, scan, model.prior_coefficients(scan), model.config,
            selection=lambda network: next(scores))
    assert summary["fell_back"] and summary["best_epoch"] is None
    assert min(h["eval_total"] for h in history) < summary["start_loss"]
    assert [h["selection"] for h in history] == [1.5, 2.0]
    assert summary["best_loss"] == summary["start_loss"] and summary["start_selection"] == 1.0
    for name, value in start.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], value, rtol=0, atol=0)
    # Where the score falls at the second epoch, that epoch is kept whatever the loss did.
    scores = iter([1.0, 1.5, 0.5])
    _, history, summary = quiet(finetune_correction, start, scan,
                                model.prior_coefficients(scan), model.config,
                                selection=lambda network: next(scores))
    assert summary["best_epoch"] == 1 and summary["best_selection"] == 0.5
    assert summary["best_loss"] == history[1]["eval_total"]


def test_a_holdout_finetuning_scores_the_held_out_volumes_it_never_fitted(phantom):
    model = RTESDModel(phantom.gtab, phantom.response, epochs=1, refine_steps=0,
                       holdout=0.25, holdout_refine_steps=3, verbose=False)
    quiet(model.fit, phantom.data, mask=phantom.mask)
    summary = model.training_summary
    scan = model.prepare(phantom.data, mask=phantom.mask)
    held = holdout_volumes(phantom.gtab, 0.25)
    judge = HeldOutError(scan, held, model.prior_coefficients(
        retained_scan(scan, held, model.sphere.vertices)), model.config)
    kept = judge(model.pretrained_correction())
    assert kept == pytest.approx(summary["best_selection"], rel=1e-5)
    assert summary["best_selection"] <= summary["start_selection"]
