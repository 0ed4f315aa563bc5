"""Pretraining of the acquisition-agnostic correction on a simulated cohort (issue 27).

:func:`pretrain_correction` trains a
:class:`esdmri.reconst.pretrained.PriorCorrection` on scans prepared by
:func:`esdmri.cohort.prepare_scan` (prior coefficients, supervised target and
voxel weights), one random window of one scan per step, Adam with a cosine
decay of the learning rate over the steps, and keeps the weights that scored
best on held-aside cohort scans. Every random choice follows from ``seed``, so
``esdmri_pretrain`` reproduces its weights on the same device.

The loss is supervised (:func:`esdmri.reconst.pretrained.fibre_target`): the
squared distance of the corrected WM degrees 0-8 to the true fibres as
apodised deltas carrying the true WM fraction of the prior's tissue total (the
WM l = 0 term is not corrected), per voxel divided by that total tissue
fraction, weighted by 0.2 + the true WM fraction.
"""

import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .pretrained import PriorCorrection, check_architecture


def as_tensors(scan, device="cpu"):
    """A prepared scan (:func:`esdmri.cohort.prepare_scan`) as ``[1, C, X, Y, Z]`` tensors.

    Returns
    -------
    item : dict
        ``prior``, ``target``, ``weight`` ([1, X, Y, Z]) on ``device``,
        ``tissues`` and ``inside`` (the indices of the weighted voxels, on the CPU).
    """
    def volume(array):
        return torch.as_tensor(array).permute(3, 0, 1, 2)[None].contiguous().to(device)
    return {"prior": volume(scan["prior"]), "target": volume(scan["target"]),
            "weight": torch.as_tensor(scan["weight"])[None].to(device),
            "tissues": scan["tissues"], "inside": np.argwhere(scan["weight"] > 0)}


def scan_loss(correction, item, corrected=None):
    """Weighted target distance of a window or volume (``corrected``: default the prior)."""
    prior, target, weight = item["prior"], item["target"], item["weight"]
    if corrected is None:
        corrected = prior
    n = min(target.shape[1], corrected.shape[1] - (len(item["tissues"]) - 1))
    _, scale = correction.inputs(prior, item["tissues"])
    error = ((corrected[:, :n] - target[:, :n]) / scale).pow(2).sum(1)
    return (error * weight).sum() / weight.sum().clamp_min(1e-6)


def random_window(item, size, rng):
    """A window of ``size`` voxels whose inner part holds a weighted voxel."""
    centre = item["inside"][rng.integers(len(item["inside"]))]
    shape = np.array(item["weight"].shape[1:])
    start = np.clip(centre - size // 2, 0, np.maximum(shape - size, 0))
    region = tuple(slice(s, s + size) for s in start)
    window = {"prior": item["prior"][(..., *region)], "target": item["target"][(..., *region)],
              "weight": item["weight"][(..., *region)].clone(), "tissues": item["tissues"]}
    # The border voxels lack neighbours the whole volume gives them: not scored.
    inner = torch.zeros_like(window["weight"])
    inner[:, 1:-1, 1:-1, 1:-1] = 1
    window["weight"] = window["weight"] * inner
    return window


@torch.no_grad()
def evaluate(correction, items):
    """Mean loss of the corrected prior and of the prior over whole scans."""
    was_training = correction.training
    correction.eval()
    network, prior = [], []
    for item in items:
        network.append(float(scan_loss(correction, item, correction(item["prior"],
                                                                     item["tissues"]))))
        prior.append(float(scan_loss(correction, item)))
    correction.train(was_training)
    return float(np.mean(network)), float(np.mean(prior))


def pretrain_correction(items, held, *, kind="e3so3-stem", steps=3159, seed=0, lr=1e-3,
                        window=10, every=200, device="cpu", on_best=None, log=None,
                        progress=True):
    """Train a correction on prepared cohort scans, keeping the best on held-aside ones.

    Parameters
    ----------
    items, held : list of dict
        Training and held-aside scans (:func:`as_tensors` on ``device``).
    kind : str
        Architecture (a key of :data:`esdmri.reconst.pretrained.ARCHITECTURES`).
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
    log : callable, optional
        Receives a line per evaluation.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    correction : PriorCorrection
        The best weights, in evaluation mode.
    summary : dict
        ``steps``, ``cpu_seconds`` (of training), ``best_loss``,
        ``best_step``, ``prior_loss`` and ``history`` ([step, network loss,
        prior loss] per evaluation), all on ``held``.
    """
    for name, value in (("steps", steps), ("every", every), ("window", window)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if window < 3:
        raise ValueError(f"window must be >= 3 (its border voxels are not scored), got "
                         f"{window}")
    if not items or not held:
        raise ValueError(f"pretraining needs training and held-aside scans, got "
                         f"{len(items)} and {len(held)}")
    log = log or (lambda message: None)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    correction = PriorCorrection(check_architecture(kind)).zero_head().to(device)
    optimizer = torch.optim.Adam(correction.parameters(), lr=lr)
    best_loss, prior_loss = evaluate(correction, held)
    best_step = 0
    best = {k: v.clone() for k, v in correction.state_dict().items()}
    history = [(0, best_loss, prior_loss)]
    log(f"start: held-aside loss {best_loss:.5f} (prior {prior_loss:.5f})")
    start = time.process_time()
    bar = tqdm(total=steps, desc=f"pretraining {kind}", unit="step", disable=not progress)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        item = items[rng.integers(len(items))]
        batch = random_window(item, window, rng)
        loss = scan_loss(correction, batch, correction(batch["prior"], batch["tissues"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.update()
        if step % every and step != steps:
            continue
        held_loss, _ = evaluate(correction, held)
        history.append((step, held_loss, prior_loss))
        marker = ""
        if held_loss < best_loss:
            best_loss, best_step, marker = held_loss, step, " (best)"
            best = {k: v.clone() for k, v in correction.state_dict().items()}
            if on_best is not None:
                on_best(correction, {"steps": step, "best_loss": best_loss})
        bar.set_postfix(held=f"{held_loss:.4f}", prior=f"{prior_loss:.4f}")
        log(f"step {step}: train {loss.item():.5f}, held-aside {held_loss:.5f} "
            f"(prior {prior_loss:.5f}){marker}")
    bar.close()
    correction.load_state_dict(best)
    return correction.eval(), {"steps": steps, "cpu_seconds": time.process_time() - start,
                               "best_loss": best_loss, "best_step": best_step,
                               "prior_loss": prior_loss, "history": history}
