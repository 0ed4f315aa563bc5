"""What the commands tell the user: logger name, one-line fetch failures,
the papers in --help, and esdmri_eval on fraction maps with a left-out tissue."""

import logging
import socket
import sys

import numpy as np
import pytest
from dipy.workflows.base import IntrospectiveArgumentParser

from esdmri.data_fetchers.download import RemoteFile, download_file
from esdmri.metrics import evaluate_fractions
from esdmri.sims import make_phantom
from esdmri.workflows import fetch
from esdmri.workflows.apply import ApplyFlow
from esdmri.workflows.demo import DemoFlow
from esdmri.workflows.evaluate import EvaluateFlow, read_ground_truth, score_fractions
from esdmri.workflows.fit import FitFlow
from esdmri.workflows.io import FRACTIONS_DESCRIPTION, save_map
from esdmri.workflows.plot import PlotFlow
from esdmri.workflows.pretrain import PretrainFlow
from esdmri.workflows.response import ResponseFlow
from esdmri.workflows.track import TrackFlow
from esdmri.workflows.train import TrainFlow

FLOWS = (ApplyFlow, DemoFlow, EvaluateFlow, fetch.FetchFlow, FitFlow, PlotFlow,
         PretrainFlow, ResponseFlow, TrackFlow, TrainFlow)


def _closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("flow", FLOWS, ids=lambda flow: flow.get_short_name())
def test_help_cites_the_method_papers_and_dipy(flow):
    parser = IntrospectiveArgumentParser()
    parser.add_workflow(flow())
    epilog = " ".join(parser.epilog.split())
    assert "Garyfallidis" in epilog  # DIPY, as every DIPY workflow cites it
    if flow is fetch.FetchFlow:
        assert "DiSCo" in epilog and "Maier-Hein" in epilog
    else:
        assert "Equivariant Spherical Deconvolution" in epilog and "IPMI" in epilog
        assert "E(3) x SO(3)-Equivariant Networks" in epilog and "MIDL" in epilog


def test_offline_fetch_fails_in_one_line(tmp_path, monkeypatch, capsys):
    remote = RemoteFile(f"http://127.0.0.1:{_closed_port()}/dwi.nii.gz", "dwi.nii.gz")

    def offline_fetch(*args, **kwargs):
        download_file(remote, tmp_path / "disco_1", quiet=True)

    monkeypatch.setattr(fetch, "fetch_disco", offline_fetch)
    monkeypatch.setattr(sys, "argv", ["esdmri_fetch", "disco", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        fetch.main()
    message = str(exit_info.value.code)
    assert "\n" not in message
    assert message.startswith("esdmri_fetch: error: Could not download dwi.nii.gz from "
                              + remote.url)
    assert "could not be reached" in message
    assert str(tmp_path / "disco_1" / "dwi.nii.gz") in message
    assert "Traceback" not in capsys.readouterr().err


def test_commands_log_under_the_esdmri_name(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "fetch_disco", lambda number, **kwargs: ({}, tmp_path))
    monkeypatch.setattr(sys, "argv", ["esdmri_fetch", "disco", "--phantom", "2",
                                      "--out_dir", str(tmp_path)])
    # A handler of our own: DIPY's run_flow replaces the root logger's handlers
    # (pytest's capture among them).
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("esdmri").addHandler(handler)
    try:
        fetch.main()
    finally:
        logging.getLogger("esdmri").removeHandler(handler)
    names = [record.name for record in records if "DiSCo phantom 2" in record.getMessage()]
    assert names == ["esdmri"]
    # --log_level applies to the esdmri logger (and to DIPY's).
    monkeypatch.setattr(sys, "argv", ["esdmri_fetch", "disco", "--out_dir", str(tmp_path),
                                      "--log_level", "WARNING"])
    fetch.main()
    assert logging.getLogger("esdmri").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("dipy").getEffectiveLevel() == logging.WARNING
    monkeypatch.setattr(sys, "argv", ["esdmri_fetch", "disco", "--out_dir", str(tmp_path)])
    fetch.main()
    assert logging.getLogger("esdmri").getEffectiveLevel() == logging.INFO


def test_eval_scores_a_left_out_tissue_as_zero(tmp_path):
    phantom = make_phantom((8, 8, 8), seed=3)
    phantom.save(tmp_path / "phantom")
    truth = read_ground_truth(tmp_path / "phantom" / "ground_truth.npz", (8, 8, 8))
    rng = np.random.default_rng(0)
    wm_gm = rng.dirichlet((2, 1), size=(8, 8, 8))
    save_map(tmp_path / "two.nii.gz", wm_gm, np.eye(4), FRACTIONS_DESCRIPTION + "wm,gm")
    scores = score_fractions(str(tmp_path / "two.nii.gz"), truth)
    # Reference: the same map with an explicit zero CSF volume.
    padded = np.concatenate([wm_gm, np.zeros((8, 8, 8, 1))], axis=-1).astype(np.float32)
    brain = phantom.tissue_fractions.sum(axis=-1) > 0
    expected = evaluate_fractions(padded, phantom.tissue_fractions, brain)
    assert scores["mae_csf"] == pytest.approx(expected["mae_csf"])
    assert scores["mae"] == pytest.approx(expected["mae"])
    assert scores["mae_csf"] == pytest.approx(phantom.tissue_fractions[brain][:, 2].mean())
    # Maps without tissue names must hold the three tissues.
    save_map(tmp_path / "unnamed.nii.gz", wm_gm, np.eye(4))
    with pytest.raises(ValueError, match="no tissue names"):
        score_fractions(str(tmp_path / "unnamed.nii.gz"), truth)


@pytest.mark.parametrize("flow", FLOWS, ids=lambda flow: flow.get_short_name())
def test_help_shows_a_usage_example_of_the_command(flow):
    parser = IntrospectiveArgumentParser()
    parser.add_workflow(flow())
    description = " ".join(parser.description.split())
    assert f"Example: {flow.get_short_name()} " in description


def test_help_does_not_import_torch_or_healpy():
    # --help builds the parser from the workflow classes: importing every
    # command module must not pull in torch, nor healpy and astropy (seconds
    # at a cold start).
    import subprocess

    names = ", ".join(flow.__module__ for flow in FLOWS)
    code = (f"import sys; import {names}; "
            "sys.exit(sorted({'torch', 'healpy'} & set(sys.modules)) or None)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_fit_help_says_how_the_fit_is_coupled():
    parser = IntrospectiveArgumentParser()
    parser.add_workflow(FitFlow())
    text = " ".join(parser.format_help().split())
    assert "--refine_tv" in text and "spatially coupled" in text
    assert "voxel-wise descent" not in text
    # The training loss's term says when it applies.
    assert "only with --epochs > 0" in text


@pytest.mark.parametrize("flow", (ApplyFlow, FitFlow, ResponseFlow, TrainFlow),
                         ids=lambda flow: flow.get_short_name())
def test_commands_that_read_bvecs_take_bvecs_tol(flow):
    import inspect
    assert inspect.signature(flow.run).parameters["bvecs_tol"].default == 0.01


def test_unnormalised_bvecs_name_bvecs_tol_and_it_accepts_them(tmp_path):
    from esdmri.reconst.subjects import Subject
    from esdmri.workflows.io import load_dwi

    phantom = make_phantom((8, 8, 8), seed=0)
    paths = phantom.save(tmp_path / "phantom")
    dwi, bvals = str(paths["dwi.nii.gz"]), str(paths["bvals"])
    bvecs = phantom.gtab.bvecs * 1.03  # 3 % off unit length, as rounded files can be
    np.savetxt(tmp_path / "long.bvec", bvecs.T)
    long = str(tmp_path / "long.bvec")
    with pytest.raises(ValueError, match=r"should be unit.*--bvecs_tol, now 0\.01"):
        load_dwi(dwi, bvals, long)
    _, _, gtab = load_dwi(dwi, bvals, long, bvecs_tol=0.05)
    # DIPY keeps the vectors as given; the b-values are the file's.
    np.testing.assert_allclose(gtab.bvals, phantom.gtab.bvals)
    with pytest.raises(ValueError, match="should be unit"):
        Subject(dwi, bvals, long).load_gtab()
    assert Subject(dwi, bvals, long, bvecs_tol=0.05).load_gtab().bvals.shape == \
        phantom.gtab.bvals.shape
