"""The accuracy benchmark on DiSCo data (benchmarks/accuracy.py --disco), offline.

A small DiSCo folder is written in a temporary data home with a noise-free DWI
simulated (DIPY ``multi_tensor``) from the same fibres as its ground-truth
fODFs, so CSD run through the benchmark must find those fibres.
"""

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from disco_fake import FIBRE_EVALS, S0, write_simulated_disco

import esdmri.data_fetchers.disco as disco_module
from esdmri.response import TissueResponse
from esdmri.response import estimate_response

REPO = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("accuracy",
                                                  REPO / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accuracy = load_benchmark()


@pytest.fixture(scope="module")
def data_home(tmp_path_factory):
    """A data home with a noise-free fake DiSCo phantom 1; DIPY's folder hidden."""
    home = tmp_path_factory.mktemp("esdmri_home")
    fibres = write_simulated_disco(home, phantom=1, snr=None)
    with pytest.MonkeyPatch.context() as patch:
        # read_disco also searches DIPY's ~/.dipy/disco: keep a real download out.
        patch.setattr(disco_module, "dipy_disco_folder",
                      lambda phantom: home / "no_dipy" / f"disco_{phantom}")
        yield home, fibres


@pytest.fixture(scope="module")
def csd_run(data_home, tmp_path_factory):
    home, fibres = data_home
    out = tmp_path_factory.mktemp("accuracy")
    accuracy.main(["--disco", "1", "--snr", "none", "--data-home", str(home),
                   "--methods", "csd", "--no-write-docs", "--out", str(out)])
    return json.loads((out / "results.json").read_text()), fibres, out


def test_csd_recovers_the_simulated_fibres(csd_run):
    results, fibres, out = csd_run
    assert list(results) == ["disco1-clean"]
    scores = results["disco1-clean"]["csd"]
    # Every voxel of the mask holds strands, each with a ground-truth peak.
    assert scores["n_voxels"] == len(fibres)
    for key in ("best", "default"):
        overall, crossing = scores[key]["all"], scores[key]["crossing"]
        assert overall["angular_error"] < 5.0
        assert crossing["angular_error"] < 5.0
        assert overall["success_rate"] > 0.9
    assert crossing["n_voxels"] == sum(len(axes) == 2 for axes, _ in fibres.values())
    assert scores["fractions"] is None  # DiSCo has no tissue fractions
    assert (out / accuracy.DISCO_PLOT_NAME).is_file()


def test_strand_only_phantom_gets_the_exact_wm_response(data_home):
    # No GM/CSF voxel in a strand-only phantom: WM only, from the single-fibre voxels.
    home, _ = data_home
    phantom = accuracy.load_disco(1, "high", None, data_home=home)
    assert phantom.response.tissues == ("wm",)
    assert phantom.response_note == "wm from estimate_response"
    exact = TissueResponse.from_tensors(phantom.response.bvals, wm_evals=FIBRE_EVALS,
                                        s0=S0, sh_order_max=8, tissues=("wm",))
    np.testing.assert_allclose(phantom.response["wm"], exact["wm"], rtol=1e-4,
                               atol=1e-4 * S0)
    assert phantom.tissue_fractions is None
    np.testing.assert_array_equal(phantom.n_fibres[phantom.mask] > 0, True)
    assert np.all(phantom.n_fibres[~phantom.mask] == 0)


def test_estimate_response_warns_and_keeps_the_tissues_found(data_home):
    home, _ = data_home
    phantom = accuracy.load_disco(1, "high", None, data_home=home)
    with pytest.warns(UserWarning, match=r"no response voxels.*estimating \('wm',\) only"):
        response = estimate_response(phantom.gtab, phantom.data, phantom.mask)
    np.testing.assert_array_equal(response["wm"], phantom.response["wm"])
    with pytest.raises(ValueError, match="tissues must be a subset"):
        TissueResponse.from_dipy_msmt(phantom.gtab, phantom.data, tissues=("gm",))


def test_absent_disco_names_the_fetch_command(data_home, tmp_path):
    # Phantom 1 is there, phantom 2 is not: the run stops before any fit.
    home, _ = data_home
    command = f"esdmri_fetch disco --phantom 2 --resolution high --snr none --out_dir {home}"
    with pytest.raises(SystemExit, match=re.escape(command)) as error:
        accuracy.main(["--disco", "1", "2", "--snr", "none", "--data-home", str(home),
                       "--methods", "csd", "--no-write-docs", "--out", str(tmp_path)])
    assert "fetch_disco(phantom=2, resolution='high', snr=None)" in str(error.value)
    assert not (tmp_path / "results.json").exists()


def test_disco_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--disco", "1", "--snr", "15"])
    assert "--snr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--disco", "4"])
    assert "--disco" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--disco", "1", "--phantoms", "snr10"])
    assert "not both" in capsys.readouterr().err
    args = accuracy.parse_args(["--disco", "3", "--disco", "1", "3"])
    assert args.disco == [3, 1] and args.snr == 30 and args.resolution == "high"
    assert accuracy.parse_args(["--disco", "2", "--snr", "none"]).snr is None


def test_disco_docs_section_leaves_the_phantom_section_alone(csd_run, tmp_path):
    results, _, _ = csd_run
    docs = tmp_path / "benchmarks.md"
    phantom_section = f"{accuracy.START_MARKER}\nphantom numbers\n{accuracy.END_MARKER}"
    docs.write_text(f"# Benchmarks\n\n{phantom_section}\n")
    rows = accuracy.table_rows(results)
    dataset = SimpleNamespace(name="disco1-clean", description="fake")
    args = accuracy.parse_args(["--disco", "1", "--snr", "none", "--methods", "csd"])
    for _ in range(2):  # the second run replaces the first
        section = accuracy.disco_docs_section(
            rows, [accuracy.METHODS["csd"]], [dataset], "full",
            accuracy.DEFAULT_THRESHOLDS, accuracy.disco_command(args))
        accuracy.write_docs_section(section, path=docs, markers=accuracy.DISCO_MARKERS)
    text = docs.read_text()
    assert phantom_section in text
    assert text.count(accuracy.DISCO_MARKERS[0]) == 1
    assert "python benchmarks/accuracy.py --disco 1 --snr none --methods csd" in text
    assert "the estimated WM response" in text
    assert "| disco1-clean | csd |" in text
