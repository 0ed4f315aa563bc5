"""Pretraining losses and WM-masked cohort scans (issue 27).

The cohort scans here are those of ``esdmri.cohort.cohort_settings(3, 0)`` at
8^3 voxels: the cohort's own seeds (geometry 200 and up, 300 and up), none of
the dev or test seeds of ``benchmarks/devset.py`` and ``benchmarks/heldout.py``.
"""

import warnings

import numpy as np
import pytest
import torch
from benchmarks.network_test import objective

from esdmri.cohort import build_cohort, build_phantom, cohort_settings, prepare_scan, wm_mask
from esdmri.reconst.models import RTESDModel
from esdmri.reconst.pretrained import PriorCorrection, check_architecture
from esdmri.reconst.pretraining import (
    as_tensors,
    pretrain_correction,
    random_window,
    supervised_loss,
    training_loss,
    unsupervised_loss,
)

SIDE = 8
# The cohort's first scans: dispersed, straight and curved, in that order.
SETTINGS = cohort_settings(3, 0)


@pytest.fixture(scope="module")
def straight():
    """The straight cohort scan fitted on its whole mask and on its WM voxels."""
    return {mask: prepare_scan(SETTINGS[1], SIDE, mask) for mask in ("whole", "wm")}


def zero_correction():
    """An untrained correction: its head starts at zero, so it returns the prior."""
    return PriorCorrection(check_architecture("e3so3-stem")).zero_head().eval()


def test_unsupervised_loss_is_the_refinements_objective(straight):
    # The pretraining's unsupervised loss of a whole scan against the refinement's
    # own objective (written out by benchmarks/network_test.py), recomputed here
    # from the phantom with a fresh model that takes the scan's responses.
    scan = straight["whole"]
    phantom = build_phantom(SETTINGS[1], SIDE)
    model = RTESDModel(phantom.gtab, scan["response"], verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = model.prepare(phantom.data, mask=phantom.mask)
    item = as_tensors(scan)
    expected = objective(model, scan["prior"], prepared)
    assert float(unsupervised_loss(item)) == pytest.approx(expected, rel=1e-4)
    assert item["prior_unsupervised"] == pytest.approx(expected, rel=1e-4)
    # Corrected coefficients are scored by the same objective, not the prior's.
    shifted = scan["prior"].copy()
    shifted[..., 1:6] += 0.05 * shifted[..., :1]
    corrected = torch.as_tensor(shifted).permute(3, 0, 1, 2)[None]
    assert float(unsupervised_loss(item, corrected)) == pytest.approx(
        objective(model, shifted, prepared), rel=1e-4)


def test_training_losses_are_normalised_and_mixed(straight):
    item = as_tensors(straight["whole"])
    correction = zero_correction()
    with torch.no_grad():
        corrected = correction(item["prior"], item["tissues"])
        # Untrained, the correction is the prior: the unsupervised loss is 1 on every scan.
        assert float(training_loss("unsupervised", correction, item, corrected)) == (
            pytest.approx(1.0, rel=1e-5))
        supervised = float(supervised_loss(correction, item))
        assert supervised > 0
        assert float(training_loss("supervised", correction, item)) == supervised
        assert float(training_loss("mixed", correction, item)) == pytest.approx(
            0.5 * (supervised + 1.0), rel=1e-5)


def test_wm_masked_scans_are_cut_through_and_give_partly_masked_windows(straight):
    whole, wm = straight["whole"], straight["wm"]
    phantom = build_phantom(SETTINGS[1], SIDE)
    assert np.array_equal(wm["mask"], wm_mask(phantom))
    assert np.array_equal(whole["mask"], phantom.mask)
    # A proper part of the phantom's mask: GM/CSF voxels are left out.
    assert wm["mask"].sum() < whole["mask"].sum() and not (wm["mask"] & ~whole["mask"]).any()
    # The same responses (estimated on the whole mask), so the same tissues.
    assert wm["tissues"] == whole["tissues"]
    outside = whole["mask"] & ~wm["mask"]
    assert np.all(wm["prior"][outside] == 0) and np.all(wm["weight"][outside] == 0)
    assert np.any(whole["prior"][outside] != 0)
    # Inside the WM mask the linear prior is the whole-mask fit's, voxel by voxel.
    np.testing.assert_allclose(wm["prior"][wm["mask"]], whole["prior"][wm["mask"]],
                               rtol=1e-4, atol=1e-6)
    # Windows drawn for training hold both fitted voxels and voxels of the phantom
    # that the mask left out (zeros the correction must read as outside); on the
    # whole mask (here every voxel of the volume) no window is cut.
    assert whole["mask"].all()

    def cut_windows(scan):
        item, rng = as_tensors(scan), np.random.default_rng(0)
        cut = 0
        for _ in range(20):
            window = random_window(item, 6, rng)
            inner = window["prior"][..., 1:-1, 1:-1, 1:-1].abs().sum(1) > 0
            assert torch.equal(inner, window["mask"][..., 1:-1, 1:-1, 1:-1])
            assert torch.equal(window["mask"], window["weight"] > 0) and inner.any()
            cut += bool((~inner).any())
        return cut

    assert cut_windows(wm) == 20 and cut_windows(whole) == 0


def test_cohort_with_wm_masks_pairs_each_scan_with_its_wm_fit():
    cohort = build_cohort(1, SIDE, 0, progress=False, wm_masks=True)
    assert len(cohort) == 1 and [scan["mask"].sum() > 0 for scan in cohort[0]] == [True] * 2
    whole, wm = cohort[0]
    assert whole["setting"] == wm["setting"] == SETTINGS[0]
    assert wm["mask"].sum() < whole["mask"].sum()
    assert [len(scans) for scans in build_cohort(1, SIDE, 0, progress=False)] == [1]
    with pytest.raises(ValueError, match="mask must be one of"):
        prepare_scan(SETTINGS[0], SIDE, "gm")


@pytest.mark.slow
def test_unsupervised_pretraining_lowers_its_held_aside_loss(straight):
    items = [as_tensors(straight["whole"]), as_tensors(straight["wm"])]
    correction, summary = pretrain_correction(items, items, loss="unsupervised", steps=6,
                                              every=3, window=6, progress=False)
    assert summary["prior_loss"] == pytest.approx(1.0, rel=1e-5)
    assert summary["best_loss"] < 1.0 and summary["best_step"] > 0
    assert not correction.training
    with pytest.raises(ValueError, match="loss must be one of"):
        pretrain_correction(items, items, loss="truth", steps=1, progress=False)


def test_true_target_is_the_fibres_as_apodised_deltas_in_the_fits_units():
    """Single-fibre voxels: the target's degrees above 0 are DIPY's SH of the fibre,
    apodised, carrying the true WM fraction of the fit's tissue total; l = 0 is the
    fit's; doubling the fit doubles the lobes."""
    from dipy.core.geometry import cart2sphere
    from dipy.reconst.shm import real_sh_descoteaux

    from esdmri.cohort import true_target
    from esdmri.reconst.network import volume_fractions_from_coefficients
    from esdmri.shm import n_coeffs, sh_degrees

    phantom = build_phantom(SETTINGS[1], SIDE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = RTESDModel(phantom.gtab, verbose=False)
        scan = model.prepare(phantom.data, mask=phantom.mask)
        prior = model.prior_coefficients(scan)
    order = 8
    n_wm = n_coeffs(model.config.network.sh_order_max)
    target = true_target(phantom, prior, n_wm, order)
    assert target.shape == phantom.mask.shape + (n_coeffs(order),)
    np.testing.assert_array_equal(target[..., 0], prior[..., 0])
    single = np.argwhere(scan.mask & (phantom.n_fibres == 1))
    assert len(single) > 10
    total = volume_fractions_from_coefficients(prior, n_wm).sum(-1)
    degrees = sh_degrees(order)
    for x, y, z in single[:20]:
        direction = phantom.fibre_dirs[x, y, z, 0]
        _, theta, phi = cart2sphere(*direction)
        basis = real_sh_descoteaux(order, np.array([theta]), np.array([phi]),
                                   legacy=False)[0][0]
        # A unit-mass delta has l = 0 coefficient Y_00 = 1 / sqrt(4 pi); the target's
        # l = 0 would be the true WM's, total * fraction / sqrt(4 pi).
        amount = total[x, y, z] * phantom.tissue_fractions[x, y, z, 0]
        expected = amount * np.exp(-degrees * (degrees + 1) / 150.0) * basis
        np.testing.assert_allclose(target[x, y, z, 1:], expected[1:], rtol=1e-4,
                                   atol=1e-6 * abs(amount))
    doubled = true_target(phantom, 2 * prior, n_wm, order)
    np.testing.assert_allclose(doubled[..., 1:], 2 * target[..., 1:], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("change, message", [
    (lambda c, n, o: (c[1:], n, o), "coefficients must have shape"),
    (lambda c, n, o: (c, 0, o), "n_wm_coeffs must be an integer"),
    (lambda c, n, o: (c, c.shape[-1] + 1, o), "n_wm_coeffs must be at most"),
    (lambda c, n, o: (c, n, 7), "order must be an even"),
    (lambda c, n, o: (c, n, 8.0), "order must be an integer"),
])
def test_true_target_refuses_bad_input_naming_the_argument(change, message):
    from esdmri.cohort import true_target

    phantom = build_phantom(SETTINGS[1], SIDE)
    coefficients = np.zeros(phantom.mask.shape + (47,), np.float32)
    with pytest.raises(ValueError, match=message):
        true_target(phantom, *change(coefficients, 45, 8))
