"""Pretraining of the acquisition-agnostic correction on a simulated cohort (issue 27).

:func:`pretrain_correction` trains a
:class:`esdmri.reconst.pretrained.PriorCorrection` on scans prepared by
:func:`esdmri.cohort.prepare_scan` (prior coefficients, supervised target and
voxel weights), one random window of one scan per step, Adam with a cosine
decay of the learning rate over the steps, and keeps the weights that scored
best on held-aside cohort scans. Every random choice follows from ``seed``, so
``esdmri_pretrain`` reproduces its weights on the same device.

Five losses (``loss``):

- ``"supervised"`` (:func:`supervised_loss`, the shipped weights'): the
  squared distance of the corrected WM degrees 0-8 to the true fibres as
  apodised deltas carrying the true WM fraction of the prior's tissue total
  (:func:`esdmri.reconst.pretrained.fibre_target`; the WM l = 0 term is not
  corrected), per voxel divided by that total tissue fraction, weighted by
  0.2 + the true WM fraction;
- ``"unsupervised"`` (:func:`unsupervised_loss`): each scan's own objective,
  the one the refinement then descends and fine-tuning trains on (signal fit
  through the scan's forward model, sparsity, non-negativity, the
  refinement's total variation: :func:`esdmri.reconst.training.coefficient_loss`
  with :func:`esdmri.reconst.finetune.finetuning_weights`), divided by the
  prior's value of it on the whole scan so that noisy scans do not outweigh
  clean ones (1 at the prior on every scan); no true fODF enters it;
- ``"mixed"``: the mean of the supervised and unsupervised losses;
- ``"refined"`` (:func:`refined_loss`, distillation): the squared distance
  of the corrected WM degrees 2-8 to those of the scan's default fit (the
  prior corrected by the shipped network, then the models' default
  refinement; :func:`esdmri.cohort.prepare_scan` with ``refined=True``), per
  voxel divided by the prior's total tissue fraction, averaged over the
  fitted voxels. A correction whose output is near the point the refinement
  ends at leaves the refinement less to do; no true fODF enters it;
- ``"supervised+refined"``: the mean of the supervised and distillation losses.
"""

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..shm import n_coeffs
from .config import check_integer
from .network import build_fodf_sampler, build_forward_model
from .pretrained import CORRECTED_ORDER, PriorCorrection, check_architecture
from .training import coefficient_loss

LOSSES = ("supervised", "unsupervised", "mixed", "refined", "supervised+refined")
# The volumes of a prepared scan that a window cuts (``refined`` only when the
# cohort was built for the distillation loss).
VOLUMES = ("prior", "target", "signal", "weight", "mask", "refined")


def as_tensors(scan, device="cpu"):
    """A prepared scan (:func:`esdmri.cohort.prepare_scan`) as ``[1, C, X, Y, Z]`` tensors.

    Returns
    -------
    item : dict
        ``prior``, ``target``, ``signal`` (the normalised signal), ``weight``
        and ``mask`` ([1, X, Y, Z]) on ``device``, the scan's
        ``forward_model``, ``fodf_sampler``, ``n_wm_coeffs`` and
        ``unsupervised_weights``, ``tissues``, ``inside`` (the indices of the
        weighted voxels, on the CPU) and ``prior_unsupervised`` (the
        unnormalised :func:`unsupervised_loss` of the prior on the whole scan);
        ``refined`` when the scan has its default fit.
    """
    def volume(array):
        return torch.as_tensor(array).permute(3, 0, 1, 2)[None].contiguous().to(device)
    order = scan["order"]
    item = {"prior": volume(scan["prior"]), "target": volume(scan["target"]),
            "signal": volume(scan["normalized"]),
            "weight": torch.as_tensor(scan["weight"])[None].to(device),
            "mask": torch.as_tensor(scan["mask"])[None].to(device),
            "forward_model": build_forward_model(scan["response"], scan["gtab"], order, device),
            "fodf_sampler": build_fodf_sampler(order, device), "n_wm_coeffs": n_coeffs(order),
            "unsupervised_weights": scan["unsupervised_weights"],
            "tissues": scan["tissues"], "inside": np.argwhere(scan["weight"] > 0),
            "prior_unsupervised": 1.0}
    if "refined" in scan:
        item["refined"] = volume(scan["refined"])
    with torch.no_grad():
        item["prior_unsupervised"] = float(unsupervised_loss(item))
    return item


def _scaled_distance(correction, item, corrected, reference, first, last, weight):
    """Weighted mean over the voxels of the squared distance of the coefficients
    ``first:last`` of ``corrected`` (default the prior) to ``reference``, each
    voxel scaled as the correction's input (by the prior's tissue total)."""
    if corrected is None:
        corrected = item["prior"]
    last = min(last, corrected.shape[1] - (len(item["tissues"]) - 1))
    _, scale = correction.inputs(item["prior"], item["tissues"])
    error = ((corrected[:, first:last] - reference[:, first:last]) / scale).pow(2).sum(1)
    return (error * weight).sum() / weight.sum().clamp_min(1e-6)


def supervised_loss(correction, item, corrected=None):
    """Weighted target distance of a window or volume (``corrected``: default the prior)."""
    target = item["target"]
    return _scaled_distance(correction, item, corrected, target, 0, target.shape[1],
                            item["weight"])


def unsupervised_loss(item, corrected=None):
    """The scan's own objective of a window or volume (``corrected``: default the prior).

    The value the refinement's objective takes on the masked voxels, per
    voxel, unnormalised (:func:`training_loss` divides it by
    ``item["prior_unsupervised"]``).
    """
    if corrected is None:
        corrected = item["prior"]
    total, _ = coefficient_loss(corrected, item["n_wm_coeffs"], item["forward_model"],
                                item["fodf_sampler"], item["signal"], item["mask"],
                                item["unsupervised_weights"])
    return total


def refined_loss(correction, item, corrected=None):
    """Distance of a window or volume to the scan's default fit (``corrected``: default
    the prior): the WM degrees 2-8 that the correction changes, scaled as the
    correction's input, mean over the fitted voxels."""
    refined = item.get("refined")
    if refined is None:
        raise ValueError('loss="refined" needs scans prepared with refined=True '
                         "(esdmri.cohort.prepare_scan)")
    # Degree 0 (the WM amount) is the prior's: the correction leaves it.
    return _scaled_distance(correction, item, corrected, refined, 1, correction.n_corrected,
                            item["mask"].to(refined.dtype))


def training_loss(loss, correction, item, corrected=None):
    """The pretraining loss ``loss`` (one of :data:`LOSSES`) of a window or volume."""
    if loss == "supervised":
        return supervised_loss(correction, item, corrected)
    if loss == "refined":
        return refined_loss(correction, item, corrected)
    if loss == "supervised+refined":
        return 0.5 * (supervised_loss(correction, item, corrected)
                      + refined_loss(correction, item, corrected))
    own = unsupervised_loss(item, corrected) / item["prior_unsupervised"]
    if loss == "unsupervised":
        return own
    return 0.5 * (supervised_loss(correction, item, corrected) + own)


def random_window(item, size, rng):
    """A window of ``size`` voxels whose inner part holds a weighted voxel."""
    centre = item["inside"][rng.integers(len(item["inside"]))]
    shape = np.array(item["weight"].shape[1:])
    start = np.clip(centre - size // 2, 0, np.maximum(shape - size, 0))
    region = tuple(slice(s, s + size) for s in start)
    window = {**item, **{name: item[name][(..., *region)] for name in VOLUMES if name in item}}
    # The border voxels lack neighbours the whole volume gives them: not scored.
    inner = torch.zeros_like(window["weight"])
    inner[:, 1:-1, 1:-1, 1:-1] = 1
    window["weight"] = window["weight"] * inner
    window["mask"] = window["mask"] & inner.bool()
    return window


@torch.no_grad()
def evaluate(correction, items, loss="supervised"):
    """Mean ``loss`` of the corrected prior and of the prior over whole scans."""
    was_training = correction.training
    correction.eval()
    network, prior = [], []
    for item in items:
        network.append(float(training_loss(loss, correction, item,
                                           correction(item["prior"], item["tissues"]))))
        prior.append(float(training_loss(loss, correction, item)))
    correction.train(was_training)
    return float(np.mean(network)), float(np.mean(prior))


def pretrain_correction(items, held, *, kind="e3so3-stem", loss="supervised", steps=3159,
                        seed=0, lr=1e-3, window=10, every=200, device="cpu", on_best=None,
                        on_evaluation=None, log=None, progress=True,
                        corrected_order=CORRECTED_ORDER):
    """Train a correction on prepared cohort scans, keeping the best on held-aside ones.

    Parameters
    ----------
    items, held : list of dict
        Training and held-aside scans (:func:`as_tensors` on ``device``).
    kind : str
        Architecture (a key of :data:`esdmri.reconst.pretrained.ARCHITECTURES`).
    loss : {"supervised", "unsupervised", "mixed", "refined", "supervised+refined"}
        The training loss (module docstring), which also chooses the best
        weights on ``held``; the ``"refined"`` losses need scans prepared with
        ``refined=True``.
    steps : int
        Optimiser steps (one window of one scan each).
    seed : int
        Seeds the initial weights, the scan and window of every step.
    lr : float
        Adam's initial learning rate, decayed to 0 by a cosine over ``steps``.
    window : int
        Edge of the training windows (voxels).
    every : int
        Steps between evaluations on ``held`` (and after the last step).
    device : str or torch.device
    on_best : callable, optional
        ``on_best(correction, progress)`` after each evaluation that improves
        on the best so far (``progress``: dict of ``steps`` and ``best_loss``).
    on_evaluation : callable, optional
        ``on_evaluation(correction, progress)`` after every evaluation,
        including the untrained start (``progress``: dict of ``steps`` and
        ``held_loss``), e.g. to save every checkpoint so that the kept
        weights can be chosen afterwards by another criterion than ``loss``
        (``esdmri_pretrain --checkpoints``).
    log : callable, optional
        Receives a line per evaluation.
    progress : bool
        Show a tqdm bar.
    corrected_order : int
        Highest WM SH degree corrected
        (:func:`esdmri.reconst.pretrained.check_architecture`); the scans'
        supervised targets should reach it
        (:func:`esdmri.cohort.build_cohort`'s ``target_order``).

    Returns
    -------
    correction : PriorCorrection
        The best weights, in evaluation mode.
    summary : dict
        ``steps``, ``cpu_seconds`` (of training), ``best_loss``,
        ``best_step``, ``prior_loss`` and ``history`` ([step, network loss,
        prior loss] per evaluation), all on ``held`` and of ``loss``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    # A window of 3 or more voxels: its border voxels are not scored.
    for name, value, low in (("steps", steps, 1), ("every", every, 1), ("window", window, 3)):
        check_integer(name, value, low)
    if not items or not held:
        raise ValueError(f"pretraining needs training and held-aside scans, got "
                         f"{len(items)} and {len(held)}")
    n_target = n_coeffs(corrected_order)
    if "supervised" in loss or loss == "mixed":
        short = [item for item in items + held if item["target"].shape[1] < n_target]
        if short:
            raise ValueError(f"corrected_order={corrected_order} needs supervised targets of "
                             f"{n_target} coefficients; {len(short)} scans have fewer (build "
                             "the cohort with target_order=corrected_order)")
    log = log or (lambda message: None)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    correction = PriorCorrection(check_architecture(kind, corrected_order)).zero_head().to(
        device)
    optimizer = torch.optim.Adam(correction.parameters(), lr=lr)
    best_loss, prior_loss = evaluate(correction, held, loss)
    best_step = 0
    best = {k: v.clone() for k, v in correction.state_dict().items()}
    history = [(0, best_loss, prior_loss)]
    log(f"start: held-aside loss {best_loss:.5f} (prior {prior_loss:.5f})")
    if on_evaluation is not None:
        on_evaluation(correction, {"steps": 0, "held_loss": best_loss})
    start = time.process_time()
    bar = tqdm(total=steps, desc=f"pretraining {kind}", unit="step", disable=not progress)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        item = items[rng.integers(len(items))]
        batch = random_window(item, window, rng)
        value = training_loss(loss, correction, batch,
                              correction(batch["prior"], batch["tissues"]))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        bar.update()
        if step % every and step != steps:
            continue
        held_loss, _ = evaluate(correction, held, loss)
        history.append((step, held_loss, prior_loss))
        if on_evaluation is not None:
            on_evaluation(correction, {"steps": step, "held_loss": held_loss})
        marker = ""
        if held_loss < best_loss:
            best_loss, best_step, marker = held_loss, step, " (best)"
            best = {k: v.clone() for k, v in correction.state_dict().items()}
            if on_best is not None:
                on_best(correction, {"steps": step, "best_loss": best_loss})
        bar.set_postfix(held=f"{held_loss:.4f}", prior=f"{prior_loss:.4f}")
        log(f"step {step}: train {value.item():.5f}, held-aside {held_loss:.5f} "
            f"(prior {prior_loss:.5f}){marker}")
    bar.close()
    correction.load_state_dict(best)
    return correction.eval(), {"steps": steps, "cpu_seconds": time.process_time() - start,
                               "best_loss": best_loss, "best_step": best_step,
                               "prior_loss": prior_loss, "history": history}
