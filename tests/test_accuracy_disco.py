"""DiSCo data through esdmri's pipeline and the accuracy benchmark's --disco mode, offline.

A small DiSCo folder is written in a temporary data home with a noise-free DWI
simulated (DIPY ``multi_tensor``) from the same fibres as its ground-truth
fODFs, so CSD with the estimated response must find those fibres. The
benchmark script is run as a program, as its users run it: tests import
esdmri only, never a benchmark file.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from disco_fake import FIBRE_EVALS, S0, write_simulated_disco

import esdmri.data_fetchers.disco as disco_module
from esdmri.baselines import fit_csd
from esdmri.data_fetchers import read_disco
from esdmri.metrics import count_directions, threshold_sweep
from esdmri.response import RESPONSE_SH_ORDER, TissueResponse, estimate_response

# The benchmarks are one package, run from the repository root as modules.
REPOSITORY = Path(__file__).resolve().parent.parent
# The benchmark's relative threshold of the ground-truth peaks (read_disco's default).
GT_PEAK_THRESHOLD = 0.1


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
def disco(data_home):
    home, _ = data_home
    return read_disco(1, "high", None, data_home=home,
                      relative_peak_threshold=GT_PEAK_THRESHOLD)


def strand_response(disco):
    with warnings.catch_warnings():
        # No GM or CSF voxel in a strand-only phantom: estimate_response warns.
        warnings.simplefilter("ignore", UserWarning)
        return estimate_response(disco.gtab, disco.data, disco.mask)


def test_csd_with_the_estimated_response_recovers_the_simulated_fibres(data_home, disco):
    _, fibres = data_home
    shm_coeff = fit_csd(disco.gtab, disco.data, strand_response(disco), mask=disco.mask)
    sweep = threshold_sweep(shm_coeff, disco.gt_peak_dirs, disco.mask,
                            thresholds=[0.5, 0.3])
    for result in sweep["results"]:
        overall, crossing = result["all"], result["crossing"]
        # Every voxel of the mask holds strands, each with a ground-truth peak.
        assert overall["n_voxels"] == len(fibres)
        assert crossing["n_voxels"] == sum(len(axes) == 2 for axes, _ in fibres.values())
        assert overall["angular_error"] < 5.0
        assert crossing["angular_error"] < 5.0
        assert overall["success_rate"] > 0.9


def test_strand_only_phantom_gets_the_exact_wm_response(disco):
    # No GM/CSF voxel in a strand-only phantom: WM only, from the single-fibre voxels.
    response = strand_response(disco)
    assert response.tissues == ("wm",)
    # At the estimator's order (RESPONSE_SH_ORDER, issue 26), the same for both.
    exact = TissueResponse.from_tensors(response.bvals, wm_evals=FIBRE_EVALS,
                                        s0=S0, sh_order_max=RESPONSE_SH_ORDER,
                                        tissues=("wm",))
    np.testing.assert_allclose(response["wm"], exact["wm"], rtol=1e-4, atol=1e-4 * S0)
    n_fibres = count_directions(disco.gt_peak_dirs)
    np.testing.assert_array_equal(n_fibres[disco.mask] > 0, True)
    assert np.all(n_fibres[~disco.mask] == 0)


def test_estimate_response_warns_and_keeps_the_tissues_found(disco):
    with pytest.warns(UserWarning, match=r"no response voxels.*estimating \('wm',\) only"):
        response = estimate_response(disco.gtab, disco.data, disco.mask)
    assert response.tissues == ("wm",)
    with pytest.raises(ValueError, match="tissues must be a subset"):
        TissueResponse.from_dipy_msmt(disco.gtab, disco.data, tissues=("gm",))


def run_benchmark(data_home, *args):
    home, _ = data_home
    # DIPY_HOME hides a real DiSCo download in ~/.dipy from the benchmark.
    env = {**os.environ, "DIPY_HOME": str(home / "no_dipy"), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--data-home",
                           str(home), *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPOSITORY)


@pytest.mark.slow
def test_benchmark_scores_csd_on_disco_and_names_missing_downloads(data_home, tmp_path):
    home, fibres = data_home
    out = tmp_path / "accuracy"
    run = run_benchmark(data_home, "--disco", "1", "--snr", "none", "--methods", "csd",
                        "--no-write-docs", "--out", str(out))
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["disco1-clean"]
    scores = results["disco1-clean"]["csd"]
    assert scores["n_voxels"] == len(fibres)
    assert scores["default"]["all"]["angular_error"] < 5.0
    assert scores["fractions"] is None  # DiSCo has no tissue fractions
    assert (out / "accuracy_disco_vs_crossing_angle.png").is_file()
    # Phantom 1 is there, phantom 2 is not: the run stops before any fit.
    missing = tmp_path / "missing"
    run = run_benchmark(data_home, "--disco", "1", "2", "--snr", "none", "--methods", "csd",
                        "--no-write-docs", "--out", str(missing))
    assert run.returncode != 0
    assert (f"esdmri_fetch disco --phantom 2 --resolution high --snr none --out_dir {home}"
            in run.stderr)
    assert "fetch_disco(phantom=2, resolution='high', snr=None)" in run.stderr
    assert not (missing / "results.json").exists()
    run = run_benchmark(data_home, "--disco", "1", "--snr", "15")
    assert run.returncode == 2 and "--snr" in run.stderr
