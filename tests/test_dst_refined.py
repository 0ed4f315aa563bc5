"""The distillation target and loss of pretraining (``loss="refined"``, issues 27/28).

The cohort scan here is the straight scan of ``esdmri.cohort.cohort_settings(2, 0)``
at 8^3 voxels (cohort seeds, none of the dev or test seeds).
"""

import warnings

import numpy as np
import pytest

from esdmri.cohort import build_phantom, cohort_settings, prepare_scan
from esdmri.reconst.models import RTESDModel
from esdmri.reconst.network import NORMALIZATION_FLOOR, volume_fractions_from_coefficients
from esdmri.reconst.pretrained import PriorCorrection, check_architecture
from esdmri.reconst.pretraining import (
    as_tensors,
    pretrain_correction,
    random_window,
    refined_loss,
    training_loss,
)

SIDE = 8
SETTING = cohort_settings(2, 0)[1]  # straight crossings, DIPY's 3-shell table


@pytest.fixture(scope="module")
def scan():
    return prepare_scan(SETTING, SIDE, refined=True)


def correction():
    return PriorCorrection(check_architecture("e3so3-stem")).zero_head().eval()


def test_target_is_the_default_fit(scan):
    # The target is what a user's default fit of the same data returns
    # (RTESDModel.fit: shipped correction, then the default refinement).
    phantom = build_phantom(SETTING, SIDE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = RTESDModel(phantom.gtab, verbose=False).fit(phantom.data, mask=phantom.mask)
    n_wm = fit.shm_coeff_descoteaux07.shape[-1]
    np.testing.assert_allclose(scan["refined"][..., :n_wm], fit.shm_coeff_descoteaux07,
                               atol=1e-6 * np.abs(fit.shm_coeff_descoteaux07).max())
    assert scan["refined_history"].evaluations == fit.refine_history.evaluations > 0
    # A refinement ran: the target is not the prior.
    inside = scan["mask"]
    assert np.abs(scan["refined"][inside] - scan["prior"][inside]).max() > 1e-3
    assert not np.any(scan["refined"][~inside])


def test_loss_is_zero_at_the_target_and_brute_force_elsewhere(scan):
    item = as_tensors(scan)
    net = correction()
    assert float(refined_loss(net, item, item["refined"])) == 0.0
    # At the prior: the squared distance of WM degrees 2-8 (coefficients 1-44),
    # divided by the prior's tissue total, averaged over the fitted voxels.
    prior, refined = scan["prior"].astype(np.float64), scan["refined"].astype(np.float64)
    n_wm = prior.shape[-1] - (len(scan["tissues"]) - 1)
    total = volume_fractions_from_coefficients(prior, n_wm).sum(-1)
    scale = np.maximum(total, NORMALIZATION_FLOOR)[..., None]
    error = (((prior - refined)[..., 1:45] / scale) ** 2).sum(-1)
    expected = error[scan["mask"]].mean()
    assert float(training_loss("refined", net, item)) == pytest.approx(expected, rel=1e-4)
    assert expected > 0


def test_windows_carry_the_target_and_training_lowers_the_loss(scan):
    item = as_tensors(scan)
    window = random_window(item, 6, np.random.default_rng(0))
    assert window["refined"].shape == window["prior"].shape
    net, summary = pretrain_correction([item], [item], loss="refined", steps=30, window=6,
                                       every=30, progress=False)
    assert summary["best_loss"] < summary["prior_loss"]


def test_refined_loss_needs_the_target():
    bare = prepare_scan(SETTING, SIDE)
    assert "refined" not in bare
    with pytest.raises(ValueError, match="refined=True"):
        refined_loss(correction(), as_tensors(bare))


def test_supervised_plus_refined_is_their_mean(scan):
    item = as_tensors(scan)
    net = correction()
    halves = [float(training_loss(loss, net, item)) for loss in ("supervised", "refined")]
    assert float(training_loss("supervised+refined", net, item)) == pytest.approx(
        np.mean(halves), rel=1e-6)


def test_reached_reads_the_evaluations_of_a_refinement_history():
    # benchmarks.pretrain --timing: when the network-free path got as low as a start.
    from benchmarks.pretrain import reached

    from esdmri.reconst.refine import RefinementHistory

    history = RefinementHistory()
    for value, evaluations in ((1.0, 1), (0.5, 12), (0.4, 23)):
        history.record(value, evaluations)
    history.evaluations = 30
    assert reached(history, 0.6) == "12"
    assert reached(history, 0.4) == "23"
    assert reached(history, 1.5) == "1"
    assert reached(history, 0.1) == ">30"
