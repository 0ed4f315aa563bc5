"""The simulated cohort that the shipped corrections are pretrained on (issue 27).

Each cohort scan is a phantom of one of three families, simulated on one of
four acquisitions at one SNR, with its linear prior computed the way a user's
fit computes it (responses estimated from the scan:
``RTESDModel(gtab).prepare`` then ``prior_coefficients``) and its supervised
target (:func:`esdmri.reconst.pretrained.fibre_target`) and, for the
distillation loss, its default fit (the shipped correction then the
default refinement). Everything follows
from one seed, so ``esdmri_pretrain`` rebuilds the same cohort anywhere.

Families (none of the seeds is a dev or test seed of ``benchmarks/devset.py``,
geometry 1 / 101 dev and 7 / 107 test, or of ``benchmarks/heldout.py``,
geometry 0 test and 101 dev):

- ``dispersed``: :func:`esdmri.heldout_phantom.make_heldout_phantom`, geometry
  seeds 200 and up, Watson concentrations of the default range or a sharper one;
- ``straight``: :func:`esdmri.straight_phantom.make_straight_phantom`'s
  undispersed straight crossings, geometry seeds 300 and up, crossing angles
  35-90 degrees, single-fibre FA 0.5-0.85;
- ``curved``: :func:`esdmri.sims.make_phantom` (its fixed layout), tensor
  eigenvalues of FA 0.5-0.85;

acquisitions cycled through single-shell b 1000 with 30 directions, DIPY's
``get_3shell_gtab``, :func:`esdmri.sims.default_gtab` and two shells (b 1000 and
2000, 45 directions each); SNR drawn from 5-40.

Each scan is fitted on the phantom's whole mask (WM, GM and CSF voxels); with
``wm_masks`` the cohort holds every scan a second time fitted on its WM voxels
only (those with fibres), with the responses of the whole mask, so that the
correction also sees priors that a mask cuts through, as a user's WM-masked
fit gives them.
"""

import warnings

import numpy as np
from dipy.core.gradients import generate_bvecs, gradient_table
from dipy.data import get_3shell_gtab

from .heldout_phantom import make_heldout_phantom
from .reconst.config import check_integer
from .reconst.finetune import finetuning_weights
from .reconst.models import RTESDModel
from .reconst.network import SQRT_4PI, volume_fractions_from_coefficients
from .reconst.pretrained import CORRECTED_ORDER, fibre_target
from .shm import n_coeffs
from .sims import default_gtab, make_phantom
from .straight_phantom import make_straight_phantom, radial_for_fa

SNRS = (5, 10, 15, 20, 30, 40)
FAMILIES = ("dispersed", "straight", "curved")
# The masks a cohort scan is fitted on: the phantom's, or its WM voxels only.
MASKS = ("whole", "wm")


def _shells(bvals, n_directions, n_b0, seed):
    rng = np.random.default_rng(seed)
    bvecs = [np.zeros((n_b0, 3))]
    for _ in bvals:
        directions = generate_bvecs(n_directions, iters=2000, rng=rng)
        bvecs.append(directions)
    all_bvals = np.concatenate([np.zeros(n_b0), np.repeat(bvals, n_directions)])
    return gradient_table(all_bvals, bvecs=np.concatenate(bvecs))


ACQUISITIONS = {
    "b1000x30": lambda: _shells([1000.0], 30, 2, seed=11),
    "dipy-3shell": get_3shell_gtab,
    "heldout-default": default_gtab,
    "b1000+b2000x45": lambda: _shells([1000.0, 2000.0], 45, 3, seed=12),
}


def cohort_settings(n_scans, seed):
    """The settings of every cohort scan.

    Parameters
    ----------
    n_scans : int
    seed : int
        Seeds the SNRs, FAs, Watson ranges and crossing angles; scan ``i`` has
        geometry seed 200 + i (dispersed) or 300 + i and noise seed 5000 + i.

    Returns
    -------
    settings : list of dict
        Keys ``family``, ``acquisition``, ``snr``, ``fa``, ``geometry_seed``,
        ``noise_seed``, ``sharp``, ``angles``. The first scans of a larger
        cohort are those of a smaller one with the same seed.
    """
    check_integer("n_scans", n_scans, 1)
    rng = np.random.default_rng(seed)
    acquisitions = list(ACQUISITIONS)
    settings = []
    for i in range(n_scans):
        family = FAMILIES[i % len(FAMILIES)]
        settings.append({
            "family": family,  # Every (family, acquisition) pair once in 12 scans.
            "acquisition": acquisitions[(i % len(FAMILIES) + i // len(FAMILIES))
                                        % len(acquisitions)],
            "snr": float(rng.choice(SNRS)), "fa": float(rng.uniform(0.5, 0.85)),
            "geometry_seed": (200 if family == "dispersed" else 300) + i,
            "noise_seed": 5000 + i, "sharp": bool(rng.random() < 0.5),
            "angles": (float(rng.uniform(35, 60)), float(rng.uniform(60, 90)))})
    return settings


def build_phantom(setting, side):
    """The phantom of one cohort scan (:func:`cohort_settings`), side x side x side voxels."""
    gtab = ACQUISITIONS[setting["acquisition"]]()
    shape = (side,) * 3
    if setting["family"] == "dispersed":
        kappa = (16.0, 64.0) if setting["sharp"] else (4.0, 24.0)
        return make_heldout_phantom(shape, gtab, snr=setting["snr"], seed=setting["noise_seed"],
                                    geometry_seed=setting["geometry_seed"], kappa_range=kappa)
    if setting["family"] == "straight":
        return make_straight_phantom(gtab, shape, setting["snr"], angles=setting["angles"],
                                     fa=setting["fa"], geometry_seed=setting["geometry_seed"],
                                     seed=setting["noise_seed"])
    axial = 1.7e-3
    radial = radial_for_fa(axial, setting["fa"])
    return make_phantom(shape, gtab, snr=setting["snr"], seed=setting["noise_seed"],
                        wm_evals=(axial, radial, radial))


def fibre_weights(phantom):
    """Each true fibre's share of its voxel's WM, shape (X, Y, Z, K)."""
    weights = getattr(phantom, "fibre_fractions", None)
    present = np.all(np.isfinite(phantom.fibre_dirs), axis=-1)
    if weights is None:  # straight bundles: equal shares
        weights = present / np.maximum(present.sum(-1, keepdims=True), 1)
    weights = np.where(present, np.nan_to_num(weights), 0)
    total = weights.sum(-1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def wm_mask(phantom):
    """The phantom's voxels that hold WM fibres, shape (X, Y, Z)."""
    return phantom.mask & (phantom.n_fibres > 0)


def true_target(phantom, coefficients, n_wm_coeffs, order):
    """A phantom's true fibres in a fit's units: the supervised target of a correction.

    Parameters
    ----------
    phantom : Phantom
        With ``fibre_dirs``, ``tissue_fractions`` (and ``fibre_fractions``
        where fibres differ in weight).
    coefficients : ndarray, shape (X, Y, Z, C_total)
        A fit's tissue coefficients (e.g. the linear prior's), whose total
        tissue fraction carries the true WM fraction.
    n_wm_coeffs : int
        WM SH coefficients in ``coefficients``.
    order : int
        SH order of the target (even).

    Returns
    -------
    target : ndarray, float32, shape (X, Y, Z, n_coeffs(order))
        :func:`esdmri.reconst.pretrained.fibre_target` of the true fibres with
        the true WM fraction of the fit's tissue total; its l = 0 term is the
        fit's own WM amount (a correction does not change it).

    Raises
    ------
    ValueError
        ``coefficients`` not on the phantom's grid, ``n_wm_coeffs`` not in
        1..C_total, ``order`` not an even integer >= 0.
    """
    coefficients = np.asarray(coefficients)
    if coefficients.ndim != 4 or coefficients.shape[:3] != phantom.mask.shape:
        raise ValueError(f"coefficients must have shape {phantom.mask.shape} + (C_total,), "
                         f"the phantom's grid, got {coefficients.shape}")
    check_integer("n_wm_coeffs", n_wm_coeffs, 1)
    if n_wm_coeffs > coefficients.shape[-1]:
        raise ValueError(f"n_wm_coeffs must be at most the coefficients' "
                         f"{coefficients.shape[-1]}, got {n_wm_coeffs}")
    check_integer("order", order, 0)
    if order % 2:
        raise ValueError(f"order must be an even SH order, got {order}")
    # Anchoring the lobes to the fit's own WM amount instead flipped them where
    # that amount is negative: the linear prior shares the WM's isotropic part
    # with GM and CSF.
    total = volume_fractions_from_coefficients(coefficients, n_wm_coeffs).sum(-1)
    amount = total * phantom.tissue_fractions[..., 0] / SQRT_4PI
    target = fibre_target(phantom.fibre_dirs, fibre_weights(phantom), amount, order)
    target[..., 0] = coefficients[..., 0]
    return target


def prepare_scan(setting, side, mask="whole", refined=False, target_order=CORRECTED_ORDER):
    """One cohort scan: its prior (estimated responses), target and voxel weights.

    Parameters
    ----------
    setting : dict
        One entry of :func:`cohort_settings`.
    side : int
        Phantom edge in voxels.
    mask : {"whole", "wm"}
        Fit the phantom's whole mask, or its WM voxels only (:func:`wm_mask`)
        with the responses estimated from the whole mask.
    refined : bool
        Also compute the scan's default fit (``refined``): the prior
        corrected by the shipped network and refined with the models' default
        refinement (:meth:`esdmri.reconst.models.RTESDModel.refine`), what the
        distillation loss (``loss="refined"`` of
        :mod:`esdmri.reconst.pretraining`) trains toward. One refinement per
        scan, computed once here.
    target_order : int
        SH order of the supervised target: the corrected order of the
        correction it trains (:data:`esdmri.reconst.pretrained.CORRECTED_ORDER`
        for the shipped ones).

    Returns
    -------
    scan : dict
        ``prior`` (X, Y, Z, C_total), ``target`` (X, Y, Z, n_coeffs(target_order)),
        ``weight`` (X, Y, Z; zero outside the fitted mask), ``tissues``,
        ``setting``, ``order`` (the prior's WM SH order), ``mask`` (the
        fitted voxels), ``normalized`` (X, Y, Z, N: the signal divided by the
        b0), ``gtab``, ``response`` and ``unsupervised_weights`` (the loss
        weights of the refinement's objective on this scan,
        :func:`esdmri.reconst.finetune.finetuning_weights`): what the
        unsupervised loss needs; with ``refined``, ``refined`` (X, Y, Z,
        C_total, float32: the default fit's coefficients, zero outside the
        fitted mask) and ``refined_history`` (its
        :class:`esdmri.reconst.refine.RefinementHistory`).
    """
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    phantom = build_phantom(setting, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = RTESDModel(phantom.gtab, verbose=False)
        scan = model.prepare(phantom.data, mask=phantom.mask)
        if mask == "wm":
            model = RTESDModel(phantom.gtab, scan.response, verbose=False)
            scan = model.prepare(phantom.data, mask=wm_mask(phantom))
        prior = model.prior_coefficients(scan)
        if refined:
            # The default fit, as RTESDModel.fit runs it: prior -> shipped correction
            # -> refinement with the models' default settings.
            fitted, history = model.refine(model.corrected_prior(prior, scan), scan)
    target = true_target(phantom, prior, n_coeffs(model.config.network.sh_order_max),
                         target_order)
    weight = np.where(scan.mask, 0.2 + phantom.tissue_fractions[..., 0], 0).astype(np.float32)
    extra = {"refined": np.asarray(fitted, np.float32), "refined_history": history} \
        if refined else {}
    return {**extra, "prior": prior, "target": target, "weight": weight,
            "tissues": tuple(scan.response.tissues), "setting": setting,
            "order": model.config.network.sh_order_max, "mask": scan.mask,
            "normalized": scan.normalized.astype(np.float32), "gtab": scan.gtab,
            "response": scan.response,
            "unsupervised_weights": finetuning_weights(model.config, scan.normalized,
                                                       scan.mask)}


def build_cohort(n_scans, side, seed, progress=True, log=None, wm_masks=False, refined=False,
                 target_order=CORRECTED_ORDER):
    """Prepare the first ``n_scans`` scans of the cohort of ``seed``.

    Parameters
    ----------
    n_scans : int
    side : int
        Phantom edge in voxels (>= 6).
    seed : int
    progress : bool
        Show a tqdm bar.
    log : callable, optional
        Receives one line per scan.
    wm_masks : bool
        Also fit every scan on its WM voxels only (``prepare_scan(...,
        mask="wm")``).
    refined : bool
        Also compute every scan's default fit (``prepare_scan(...,
        refined=True)``), the target of the distillation loss.
    target_order : int
        SH order of the supervised target (:func:`prepare_scan`).

    Returns
    -------
    scans : list of list of dict
        Per setting of :func:`cohort_settings`, :func:`prepare_scan`'s
        output on the whole mask (and, with ``wm_masks``, on the WM mask).
    """
    from tqdm.auto import tqdm

    check_integer("side", side, 6)
    masks = MASKS if wm_masks else MASKS[:1]
    scans = []
    for setting in tqdm(cohort_settings(n_scans, seed), desc="simulating the cohort",
                        unit="scan", disable=not progress):
        scans.append([prepare_scan(setting, side, mask, refined, target_order)
                      for mask in masks])
        if log is not None:
            log(f"scan {len(scans)}/{n_scans}: {describe(scans[-1][0])}")
    return scans


def describe(scan):
    """One line of a prepared scan: family, acquisition, SNR, FA, SH order, tissues."""
    setting = scan["setting"]
    refined = scan.get("refined_history")
    return (f"{setting['family']} {setting['acquisition']} SNR {setting['snr']:g} "
            f"FA {setting['fa']:.2f} order {scan['order']} {','.join(scan['tissues'])}"
            + (f"; default fit refined in {refined.steps} steps, {refined.evaluations} "
               "evaluations" if refined is not None else ""))
