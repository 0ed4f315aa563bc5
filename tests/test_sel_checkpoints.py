"""Checkpoints of the pretraining and their choice by the refined fit (issue 27).

Cohort scans of 8^3 voxels (the cohort's own seeds, none a dev or test seed).
"""

import json

import numpy as np
import pytest
import torch
import test_workflows
from benchmarks import select_weights

from esdmri.cohort import cohort_settings, prepare_scan
from esdmri.reconst.pretrained import PriorCorrection, check_architecture, save_correction
from esdmri.reconst.pretraining import as_tensors, pretrain_correction
from esdmri.workflows.pretrain import PretrainFlow

in_process = test_workflows.in_process
SIDE = 8
TINY = ("--scans", "2", "--held", "1", "--side", str(SIDE), "--window", "6", "--steps", "5",
        "--every", "2", "--quiet")


@pytest.fixture(scope="module")
def straight():
    return [as_tensors(prepare_scan(cohort_settings(2, 0)[1], SIDE))]


def test_every_evaluation_is_reported_and_training_is_unchanged(straight):
    seen = []

    def record(correction, progress):
        state = {k: v.clone() for k, v in correction.state_dict().items()}
        seen.append((progress["steps"], progress["held_loss"], state))

    options = {"steps": 5, "every": 2, "window": 6, "progress": False}
    plain, plain_summary = pretrain_correction(straight, straight, **options)
    kept, summary = pretrain_correction(straight, straight, on_evaluation=record, **options)
    # Steps 0 (untrained), every 2, and the last; the losses are the run's history.
    assert [s for s, *_ in seen] == [0, 2, 4, 5]
    assert [h for _, h, _ in seen] == [h for _, h, _ in summary["history"]]
    # The callback changes nothing: the same kept weights as without it.
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(kept.state_dict()[name], tensor, rtol=0, atol=0)
    assert summary["best_step"] == plain_summary["best_step"]
    # The checkpoint of the best step is the kept correction.
    best = dict((s, state) for s, _, state in seen)[summary["best_step"]]
    for name, tensor in kept.state_dict().items():
        torch.testing.assert_close(best[name], tensor, rtol=0, atol=0)
    # Checkpoints differ from each other: training moved the weights.
    assert any(not torch.equal(seen[0][2][k], seen[-1][2][k]) for k in seen[0][2])


def test_pretrain_writes_a_checkpoint_per_evaluation(in_process, tmp_path):
    folder = tmp_path / "ck"
    summary = in_process(PretrainFlow(), *TINY, "--checkpoints", str(folder),
                         "--out_dir", tmp_path)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step-00000.pt", "step-00002.pt", "step-00004.pt", "step-00005.pt"]
    saved = {name: torch.load(folder / name, weights_only=True) for name in names}
    assert [s["metadata"]["steps"] for s in saved.values()] == [0, 2, 4, 5]
    assert [s["metadata"]["held_loss"] for s in saved.values()] == pytest.approx(
        [h for _, h, _ in summary["history"]])
    kept = torch.load(tmp_path / "pretrained.pt", weights_only=True)["state_dict"]
    best = saved[f"step-{summary['best_step']:05d}.pt"]["state_dict"]
    for name, tensor in kept.items():
        np.testing.assert_array_equal(best[name].numpy(), tensor.numpy(), err_msg=name)
    # A second run refuses to overwrite the checkpoints, before any training.
    before = (folder / "step-00002.pt").read_bytes()
    message = in_process(PretrainFlow(), *TINY, "--checkpoints", str(folder),
                         "--out_dir", tmp_path / "again", fails=True)
    assert "step-00000.pt" in message and "--force" in message
    assert (folder / "step-00002.pt").read_bytes() == before


def test_a_checkpoint_folder_that_is_a_file_is_refused(in_process, tmp_path):
    taken = tmp_path / "ck"
    taken.write_text("not a folder")
    message = in_process(PretrainFlow(), *TINY, "--checkpoints", str(taken),
                         "--out_dir", tmp_path, fails=True)
    assert "checkpoints" in message and "not a folder" in message
    assert not (tmp_path / "pretrained.pt").exists()


def test_untrained_weights_score_as_the_network_free_fit(tmp_path):
    # The untrained correction's head is zero: the prior passes through, so its
    # refined fit and scores are the network-free fit's.
    path = tmp_path / "zero.pt"
    save_correction(PriorCorrection(check_architecture("e3so3-stem")).zero_head(), path,
                    {"steps": 0, "held_loss": 1.0})
    scans = select_weights.held_scans(1, 1, side=SIDE)
    free = select_weights.score_weights(False, scans)
    zero = select_weights.score_weights(path, scans)
    assert zero == free
    scores = free[0]["crossing"]
    assert set(scores) == {f"{t:.2f}" for t in select_weights.THRESHOLDS}
    assert all(0 <= ae < 90 and 0 <= fn <= 1 for ae, fn in scores.values())
    assert select_weights.checkpoint_step(path) == (0, 1.0)


def scan(ae, fn=0.0, supervised=0.5):
    return {"crossing": {f"{t:.2f}": [ae, fn] for t in select_weights.THRESHOLDS},
            "supervised": supervised}


def test_summary_and_pick_by_the_refined_error(tmp_path, capsys):
    free = [scan(10.0), scan(4.0)]
    summary = select_weights.summarise([scan(8.0, 0.1), scan(4.0, 0.3)], free)
    assert summary == pytest.approx({"ae": 6.0, "fn": 0.2, "ratio": 0.9, "at_most_0.9": 1,
                                     "supervised": 0.5})
    records = {"network-free": (None, None, free),
               "step-00100": (100, 0.3, [scan(9.0), scan(3.0)]),  # lowest loss, AE 6.0
               "step-00200": (200, 0.4, [scan(7.0), scan(4.0)])}  # AE 5.5: picked
    for label, (step, held, scans) in records.items():
        (tmp_path / f"{label}.json").write_text(json.dumps(
            {"step": step, "held_loss": held, "scans": scans}))
    assert select_weights.table(tmp_path) == "step-00200"
    assert "| step-00100 | 100 | 0.3000 |" in capsys.readouterr().out


def test_dev_refined_error_reads_each_phantoms_chosen_threshold(tmp_path):
    from benchmarks.devset import THRESHOLDS
    from benchmarks.pretrain import PRETRAINED_ROWS

    def sweep(errors):
        return [{"crossing": {"angular_error": e}} for e in errors]

    row = PRETRAINED_ROWS["rtesd"][1]
    errors = np.arange(len(THRESHOLDS), dtype=float)
    outcomes = [{"row": row, "method": "default", "sweep": sweep(errors + shift)}
                for shift in (0.0, 10.0)]
    outcomes.append({"row": "other", "method": "other", "sweep": sweep(errors + 100)})
    path = tmp_path / "results-dev.json"
    path.write_text(json.dumps({"thresholds": {"default": 0.2, "other": 0.2},
                                "outcomes": outcomes}))
    index = list(THRESHOLDS).index(0.2)
    assert select_weights.dev_refined_error(path) == (pytest.approx(index + 5.0), 2)


def test_held_settings_filter_the_cohort_in_order():
    every = cohort_settings(200, 0)[80:]
    chosen = select_weights.held_settings(80, 5, families=("straight",), snrs=(10.0, 20.0))
    expected = [s for s in every if s["family"] == "straight" and s["snr"] in (10.0, 20.0)][:5]
    assert chosen == expected and len(chosen) == 5
    assert select_weights.held_settings(3, 4) == cohort_settings(7, 0)[3:]
