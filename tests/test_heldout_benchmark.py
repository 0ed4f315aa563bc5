"""The held-out benchmark (benchmarks/heldout.py) on tiny phantoms."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from esdmri.response import TissueResponse
from esdmri.sims import default_gtab


@pytest.fixture(scope="module")
def heldout():
    # The repository root is on pytest's path (setup.cfg), so the benchmarks
    # import as the package they are.
    from benchmarks import heldout

    return heldout


def test_rumba_gets_the_tensor_of_the_response():
    # The WM response of a known tensor converts back to its eigenvalues on
    # every shell (to the truncation of its SH order 12 at b = 3000), and the
    # isotropic responses to their diffusivities.
    from benchmarks import methods
    gtab = default_gtab()
    response = TissueResponse.from_tensors(
        [0, 1000, 2000, 3000], wm_evals=(1.9e-3, 0.4e-3, 0.4e-3), gm_diffusivity=0.75e-3,
        s0=80.0)
    wm, gm, csf = methods._rumba_responses(response, gtab)
    np.testing.assert_allclose(wm, np.tile([1.9e-3, 0.4e-3, 0.4e-3], (3, 1)), rtol=1e-2)
    assert gm == pytest.approx(0.75e-3) and csf == pytest.approx(3.0e-3)
    wm_only = response.select_tissues(("wm",))
    assert methods._rumba_responses(wm_only, gtab)[1:] == (None, None)


def test_heldout_benchmark_runs_and_writes_its_section(heldout, tmp_path, monkeypatch):
    # A tiny run: dev phantom chooses CSD's shell and the thresholds, the test
    # phantom is scored (peaks and tracking), the docs section is written
    # between its markers and can be redone from results.json.
    mode = heldout.Mode(shape=(16, 16, 16), dev=((101, 30),), test_snrs=(30,), n_seeds=100,
                        families=("DIPY CSD", "linear prior alone"))
    monkeypatch.setitem(heldout.MODES, "quick", mode)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# B\n\n<!-- accuracy-heldout:start -->\nSTALE TABLE\n"
                    "<!-- accuracy-heldout:end -->\n\n## Other\nkept\n")
    monkeypatch.setattr(heldout, "DOCS_FILE", docs)
    heldout.main(["--quick", "--out", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["choices"]) == {"DIPY CSD", "linear prior alone"}
    assert results["choices"]["DIPY CSD"]["method"] in ("csd-shell1", "csd-shell2", "csd")
    test = [o for o in results["outcomes"] if o["split"] == "test"]
    assert len(test) == 2 and not any(o["error"] for o in test)
    for outcome in test:
        # Chosen on dev, applied on test.
        assert outcome["threshold"] == results["choices"][outcome["family"]]["threshold"]
        assert 0 < outcome["peaks"]["all"]["angular_error"] < 45
        assert outcome["tracking"]["det"]["n_streamlines"] == 100
        assert outcome["tracking"]["det"]["vc_rate"] > 0.2
    text = docs.read_text()
    assert "STALE TABLE" not in text and text.endswith("## Other\nkept\n")
    assert "| test | 30 | DIPY CSD |" in text and "| 30 | DIPY CSD | det |" in text
    # Redo the section from the results only.
    docs.write_text("<!-- accuracy-heldout:start -->\n<!-- accuracy-heldout:end -->\n")
    heldout.main(["--from-results", str(tmp_path / "out" / "results.json")])
    assert "| test | 30 | DIPY CSD |" in docs.read_text()


def test_peaks_from_a_method_own_sphere_are_dipy_peak_directions():
    # RUMBA-SD's peaks come from its fODF on its own sphere (issue 26): one
    # search, then a threshold filter, must give what DIPY's peak_directions
    # gives at each threshold (at the vertices: without sub-vertex refinement).
    from dipy.data import get_sphere
    from dipy.reconst.dirspeed import peak_directions
    from dipy.sims.voxel import multi_tensor_odf

    from benchmarks import methods

    sphere = get_sphere(name="repulsion724")
    rng = np.random.default_rng(3)
    odf = np.zeros((2, 3, 1, len(sphere.vertices)))
    for index in np.ndindex(odf.shape[:3]):
        share = rng.uniform(20, 80)
        odf[index] = multi_tensor_odf(sphere.vertices, np.array([[1.7e-3, 3e-4, 3e-4]] * 2),
                                      rng.uniform(0, 180, size=(2, 2)),
                                      [share, 100 - share]) - rng.uniform(0, 0.02)
    result = methods.MethodResult(np.zeros(odf.shape[:3] + (45,)), odf=odf, sphere=sphere)
    mask = np.ones(odf.shape[:3], dtype=bool)
    mask[1, 2, 0] = False
    thresholds = [0.1, 0.5, 0.8]
    for threshold, directions in methods.peak_sweep(result, thresholds, mask, subvertex=False):
        for index in np.ndindex(mask.shape):
            found = directions[index][~np.isnan(directions[index][:, 0])]
            if not mask[index]:
                assert len(found) == 0
                continue
            expected, _, _ = peak_directions(odf[index], sphere,
                                             relative_peak_threshold=threshold,
                                             min_separation_angle=25)
            np.testing.assert_array_equal(found, expected[:5])
    # Refined (the default), the same peaks move by less than the sphere's
    # spacing (repulsion724: neighbours 7-8 degrees apart).
    for (_, refined), (_, at_vertices) in zip(
            methods.peak_sweep(result, thresholds, mask),
            methods.peak_sweep(result, thresholds, mask, subvertex=False)):
        np.testing.assert_array_equal(np.isnan(refined), np.isnan(at_vertices))
        found = ~np.isnan(refined[..., 0])
        cosines = np.abs(np.sum(refined[found] * at_vertices[found], axis=-1))
        assert np.degrees(np.arccos(np.clip(cosines, 0, 1))).max() < 8


@pytest.mark.slow
def test_network_rows_share_one_training(heldout, monkeypatch):
    # The "network alone" row is the trained network; "defaults" is the same
    # network refined, so the two differ only by the refinement.
    from esdmri.sims import make_phantom

    phantom = make_phantom((8, 8, 8), snr=30, max_fibres=2, seed=2)
    scan = SimpleNamespace(data=phantom.data, gtab=phantom.gtab, mask=phantom.mask,
                           response=phantom.response)
    small = dict(sh_order_max=4, nside=2, depth=2, filter_start=2, block_size=8, epochs=1,
                 pretrained=False)
    from esdmri.reconst import models

    original = models.MODEL_CLASSES["esd"]

    class Small(original):
        def __init__(self, gtab, response, **kwargs):
            super().__init__(gtab, response, **{**small, **kwargs})

    monkeypatch.setitem(models.MODEL_CLASSES, "esd", Small)
    mask = phantom.mask & (phantom.n_fibres > 0)
    fits = heldout.fit_network_pair("esd", scan, mask)
    (alone, alone_seconds), (refined, refined_seconds) = fits["esd-net"], fits["esd"]
    alone, refined = alone.shm_coeff, refined.shm_coeff
    assert refined_seconds > alone_seconds
    assert np.abs(alone - refined).max() > 1e-4
    # The pair trains as the benchmark's trained rows do (heldout.TRAINED).
    reference = Small(phantom.gtab, phantom.response, verbose=False, refine_steps=0,
                      **heldout.TRAINED).fit(phantom.data, mask=phantom.mask)
    np.testing.assert_allclose(alone, np.where(mask[..., None],
                                               reference.shm_coeff_descoteaux07, 0), atol=1e-5)
