"""``esdmri_pretrain`` (issue 27): the pretraining command end to end at a tiny size."""

import sys

import numpy as np
import pytest
import torch
import test_workflows
from test_workflows import assert_one_line_error, run_cli

from esdmri.cohort import cohort_settings
from esdmri.reconst import pretrained
from esdmri.reconst.models import MODEL_CLASSES, RTESDModel
from esdmri.sims import default_gtab
from esdmri.workflows.pretrain import CONV_KINDS, LOSSES, PretrainFlow

in_process = test_workflows.in_process  # the fixture that runs a flow in this process

# A cohort of 2 + 1 scans of 8^3 voxels and a few steps: seconds, not minutes.
TINY = ("--scans", "2", "--held", "1", "--side", "8", "--window", "6", "--steps", "4",
        "--every", "2", "--quiet")


def test_model_kinds_match_the_model_classes():
    assert CONV_KINDS == {name: cls.conv_kind for name, cls in MODEL_CLASSES.items()}
    assert set(CONV_KINDS.values()) == set(pretrained.ARCHITECTURES)


def test_losses_match_the_pretraining_module():
    from esdmri.reconst.pretraining import LOSSES as MODULE_LOSSES

    assert LOSSES == MODULE_LOSSES


def test_corrected_order_matches_the_pretrained_module():
    from esdmri.workflows.pretrain import CORRECTED_ORDER

    assert CORRECTED_ORDER == pretrained.CORRECTED_ORDER


@pytest.mark.slow
def test_pretrain_writes_weights_that_the_model_loads(tmp_path):
    # A rate that lowers the held-aside loss within four steps: at the default 1e-3
    # it moves by 1e-5 or not at all, and the kept weights are then the starting ones.
    fast = ("--lr", "0.01")
    result = run_cli("pretrain", *TINY, *fast, "--out_dir", tmp_path, "--num_threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "pretrained.pt"
    assert "sha256 " + pretrained.sha256_of(path) in result.stdout + result.stderr
    saved = torch.load(path, weights_only=True)
    assert saved["architecture"] == pretrained.ARCHITECTURES["e3so3-stem"]
    assert saved["metadata"]["steps"] == 4
    assert saved["metadata"]["settings"]["loss"] == "supervised"
    assert saved["metadata"]["settings"]["wm_masks"] is False
    assert saved["metadata"]["cohort"] == cohort_settings(3, 0)
    model = RTESDModel(default_gtab(), pretrained=path, verbose=False)
    correction = model.pretrained_correction()
    # Trained: the head moved away from the zero it starts at.
    head = [p for p in correction.unet[1].head.parameters()]
    assert any(p.abs().max() > 0 for p in head)
    # The same seed gives the same weights (one thread, CPU).
    again = tmp_path / "again"
    assert run_cli("pretrain", *TINY, *fast, "--out_dir", again,
                   "--num_threads", "1").returncode == 0
    second = torch.load(again / "pretrained.pt", weights_only=True)["state_dict"]
    for name, tensor in saved["state_dict"].items():
        np.testing.assert_array_equal(tensor.numpy(), second[name].numpy(), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["esd", "cesd"])
def test_each_model_kind_pretrains_its_own_architecture(in_process, tmp_path, model):
    summary = in_process(PretrainFlow(), *TINY, "--model", model, "--out_dir", tmp_path)
    path = tmp_path / "pretrained.pt"
    assert summary["sha256"] == pretrained.sha256_of(path)
    kind = CONV_KINDS[model]
    assert pretrained.load_correction(path, kind=kind).architecture == (
        pretrained.ARCHITECTURES[kind])
    MODEL_CLASSES[model](default_gtab(), pretrained=path, verbose=False)
    # A file of one architecture is refused by the others' model classes.
    with pytest.raises(ValueError, match=f"holds weights of the {kind} correction"):
        RTESDModel(default_gtab(), pretrained=path, verbose=False)


def test_cohort_is_seeded_and_avoids_the_dev_and_test_seeds():
    settings = cohort_settings(27, 0)
    assert cohort_settings(3, 0) == settings[:3]  # a smaller cohort is a prefix
    assert cohort_settings(27, 0) == settings
    assert cohort_settings(27, 1) != settings
    # benchmarks/devset.py: geometry 1 / 101 (dev), 7 / 107 (test); heldout.py: 0, 101.
    assert not {s["geometry_seed"] for s in settings} & {0, 1, 7, 101, 107}
    assert {s["family"] for s in settings} == {"dispersed", "straight", "curved"}
    with pytest.raises(ValueError, match="n_scans"):
        cohort_settings(0, 0)


def test_pretrain_refuses_to_overwrite(in_process, tmp_path):
    path = tmp_path / "pretrained.pt"
    path.write_bytes(b"earlier weights")
    message = in_process(PretrainFlow(), *TINY, "--out_dir", tmp_path, fails=True)
    assert "exists" in message and "--force" in message
    assert path.read_bytes() == b"earlier weights"


@pytest.mark.parametrize("args, match", [
    (("--model", "xesd"), "model must be one of rtesd, esd, cesd"),
    (("--steps", "0"), "steps must be an integer >= 1"),
    (("--held", "0"), "held must be an integer >= 1"),
    (("--side", "4"), "side must be an integer >= 6"),
    (("--window", "12"), "window (12) must not exceed side (8)"),
    (("--lr", "-1"), "lr must be > 0"),
    (("--device", "gpu"), "device must be cpu, cuda or cuda:N"),
    (("--loss", "truth"), "loss must be one of supervised, unsupervised, mixed"),
])
def test_bad_arguments_fail_in_one_line(in_process, tmp_path, args, match):
    message = in_process(PretrainFlow(), *TINY, *args, "--out_dir", tmp_path, fails=True)
    assert match in message
    assert not (tmp_path / "pretrained.pt").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="subprocess paths")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("pretrain", *TINY, "--device", "cuda", "--out_dir", tmp_path)
    assert_one_line_error(result, "esdmri_pretrain", "no CUDA device")
