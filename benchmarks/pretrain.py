"""Score pretrained corrections (issue 27) on the dev phantoms, and time them.

The weights come from ``esdmri_pretrain`` (:mod:`esdmri.workflows.pretrain`; the
cohort is :mod:`esdmri.cohort`, the training :mod:`esdmri.reconst.pretraining`).
This script puts one weights file in the pretrained rows of
``benchmarks/devset.py`` (dev split only) and times the fits with and without
it, interleaved.

Usage::

    OMP_NUM_THREADS=1 esdmri_pretrain --architecture esd --num_threads 1 \
        --out_dir out --out_weights esd.pt
    # the dev split with these weights (the ESDModel rows)
    python -m benchmarks.pretrain --dev out/esd.pt --architecture esd \
        --dev-out out/pretrain-dev-esd
    python -m benchmarks.pretrain --timing esdmri/data/pretrained_rtesd.pt
    # refinement steps and evaluations from several weights' outputs (issue 28)
    python -m benchmarks.pretrain --timing shipped=esdmri/data/pretrained_rtesd.pt \
        refined=out/refined.pt --repeats 1
    # the evaluations the best possible correction would leave
    python -m benchmarks.pretrain --oracle
    # the accuracy the best possible correction would give the refined fit
    python -m benchmarks.pretrain --truth-start --split dev
    # issue 25's loss goal against the loss of the noise-free fit on the noisy scan
    python -m benchmarks.pretrain --loss-floor --split dev
    # issue 25's loss goal for corrections alone, and their inference CPU time at 40^3
    python -m benchmarks.pretrain --losses shipped=esdmri/data/pretrained_rtesd.pt \
        order12=out/pretrained12.pt
    python -m benchmarks.pretrain --inference shipped=esdmri/data/pretrained_rtesd.pt \
        order12=out/pretrained12.pt --side 40
    # the ablation an unrolled correction must beat: k plain steps without TV from the
    # prior and from corrections (applied twice with --unroll 2)
    python -m benchmarks.pretrain --plain-steps shipped=esdmri/data/pretrained_rtesd.pt --side 14
    # pretraining variants (issue 27: losses, WM-masked windows) on whole and WM masks
    python -m benchmarks.pretrain --dev out/unsup.pt --baselines none \
        --dev-out out/dev-unsup-wm --fit-mask wm
    python -m benchmarks.pretrain --variants unsup=out/dev-unsup/results-dev.json ...
"""

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from esdmri.reconst.models import MODEL_CLASSES

from .heldout import markdown, scan_of, scored_voxels

# The dev rows of each architecture's pretrained correction (benchmarks/devset.py).
PRETRAINED_ROWS = {
    "rtesd": ("esdmri pretrained alone", "esdmri default (pretrained + refinement)"),
    "esd": ("esdmri ESD pretrained alone", "esdmri ESD pretrained + refinement"),
    "cesd": ("esdmri C-ESD pretrained alone", "esdmri C-ESD pretrained + refinement"),
}
NETWORK_FREE_ROW = "esdmri network-free (pretrained=False)"
BASELINES = {"all": (NETWORK_FREE_ROW, "esdmri linear prior alone", "DIPY CSD"),
             "network-free": (NETWORK_FREE_ROW,), "none": ()}


def wm_scan_of(phantom):
    """``devset``'s scan fitted on the scored (WM) voxels only, with the responses
    estimated from the whole mask (as ``benchmarks/network_test.py`` fits)."""
    return dataclasses.replace(scan_of(phantom), mask=scored_voxels(phantom))


def score_on_dev(weights, out, side, architecture="rtesd", refine_steps=None,
                 baselines="all", fit_mask="whole", split="dev", thresholds=None):
    """``benchmarks/devset.py``'s ``split`` with ``architecture``'s pretrained rows
    using ``weights`` (and ``refine_steps`` for the refined row, default: the models'
    default), with the rows of ``BASELINES[baselines]``, every method fitted on the
    phantom's whole mask or (``fit_mask="wm"``) on its WM voxels only;
    ``thresholds``: a dev run's results JSON (for the test split)."""
    from . import devset, methods

    methods.PRETRAINED["pretrained"] = str(weights)
    if refine_steps is not None:
        methods.PRETRAINED["refine_steps"] = refine_steps
    if fit_mask == "wm":
        devset.scan_of = wm_scan_of  # this process's devset runs fit the WM voxels
    rows = PRETRAINED_ROWS[architecture] + BASELINES[baselines]
    extra = ["--thresholds", str(thresholds)] if thresholds else []
    devset.main(["--split", split, "--side", str(side), "--out", str(out), "--rows", *rows,
                 *extra])
    devset.main(["--report", str(out / f"results-{split}.json")])


def variants(labelled):
    """Pretraining variants side by side: ``LABEL=JSON`` devset runs of the RT-ESD rows
    (one weights file each; the network-free row from any run that has it), crossing
    voxels, AE / FN per cell, each run's own thresholds (chosen on dev, or the dev
    ones a test run was given), and per variant the phantoms on which the refined
    fit is worse than the network-free fit (AE more than 0.1 degree or FN more than
    0.02 above it); then each refined fit's AE over the network-free fit's, and on how
    many phantoms that ratio is at most 0.9 (issue 27's goal), and where each refined fit
    is worse than the first label's (AE more than 0.1 degree or FN more than 0.005 above:
    the rule for replacing the shipped weights, given first)."""
    from .devset import at_threshold

    cells, free = {}, {}
    for item in labelled:
        label, path = item.split("=", 1)
        results = json.loads(Path(path).read_text())
        for o in results["outcomes"]:
            if not o["sweep"] or o["method"] not in results["thresholds"]:
                continue
            threshold = results["thresholds"][o["method"]]
            scores = at_threshold(o["sweep"], threshold)["crossing"]
            key = (o["family"], o["snr"])
            if o["row"] == NETWORK_FREE_ROW:
                free[key] = scores
            elif o["row"] in PRETRAINED_ROWS["rtesd"]:
                part = "alone" if o["row"] == PRETRAINED_ROWS["rtesd"][0] else "refined"
                cells[(label, part, key)] = scores
    columns = sorted({(label, part) for label, part, _ in cells},
                     key=lambda c: ([i.split("=")[0] for i in labelled].index(c[0]), c[1]))
    keys = sorted({key for *_, key in cells} | set(free), key=lambda k: (k[0], -k[1]))
    rows, errors, worse = [], {}, {}
    for key in keys:
        row = [key[0], f"{key[1]:g}"]
        for column in (("network-free", ""),) + tuple(columns):
            scores = free.get(key) if column[0] == "network-free" else cells.get((*column, key))
            if scores is None:
                row.append("-")
                continue
            errors.setdefault(column, []).append(scores["angular_error"])
            row.append(f"{scores['angular_error']:.1f} / {scores['fn_rate']:.2f}")
            if column[1] == "refined" and key in free and (
                    scores["angular_error"] > free[key]["angular_error"] + 0.1
                    or scores["fn_rate"] > free[key]["fn_rate"] + 0.02):
                worse.setdefault(column, []).append(f"{key[0]} {key[1]:g}")
        rows.append(row)
    rows.append(["mean AE", "", *(f"{np.mean(errors[c]):.2f}" if c in errors else "-"
                                  for c in (("network-free", ""),) + tuple(columns))])
    rows.append(["worse than network-free", "", "", *(
        (", ".join(worse.get(c, [])) or "none") if c[1] == "refined" else ""
        for c in columns)])
    print(markdown(["family", "SNR", "network-free",
                    *(f"{label} {part}" for label, part in columns)], rows))
    # Issue 27's goal: the refined fit's crossing error at most 0.9x the network-free fit's.
    refined = [c for c in columns if c[1] == "refined"]
    ratios = {c: {key: cells[(*c, key)]["angular_error"] / free[key]["angular_error"]
                  for key in keys if (*c, key) in cells and key in free} for c in refined}
    if not any(ratios.values()):
        return
    rows = [[key[0], f"{key[1]:g}", *(f"{ratios[c][key]:.2f}" if key in ratios[c] else "-"
                                      for c in refined)] for key in keys]
    rows.append(["at most 0.90x", "", *(f"{sum(r <= 0.9 for r in ratios[c].values())} of "
                                        f"{len(ratios[c])}" for c in refined)])
    # The rule for replacing shipped weights: not worse than the first refined column
    # (the shipped weights) on any phantom, by more than 0.1 degree or 0.005 FN.
    first = refined[0]
    rows.append([f"worse than {first[0]} refined", "", *(", ".join(
        f"{key[0]} {key[1]:g}" for key in keys if (*c, key) in cells and (*first, key) in cells
        and (cells[(*c, key)]["angular_error"] > cells[(*first, key)]["angular_error"] + 0.1
             or cells[(*c, key)]["fn_rate"] > cells[(*first, key)]["fn_rate"] + 0.005))
        or "none" for c in refined)])
    print("\nrefined crossing AE / network-free crossing AE\n"
          + markdown(["family", "SNR", *(f"{label} refined" for label, _ in refined)], rows))


COMPARED = (("network-free", "esdmri network-free (pretrained=False)"),) + tuple(
    (f"{name} {part}", row) for part, index in (("alone", 0), ("+ refinement", 1))
    for name, row in zip(("RT-ESD", "ESD", "C-ESD"),
                         (PRETRAINED_ROWS[kind][index] for kind in ("rtesd", "esd", "cesd"))))


def compare(files):
    """The three architectures side by side, crossing voxels, AE / success / FN per cell,
    of ``benchmarks/devset.py`` runs (thresholds chosen per row on their dev outcomes)."""

    from .devset import ROWS, at_threshold, choose_thresholds

    outcomes = {}
    for path in files:
        for o in json.loads(Path(path).read_text())["outcomes"]:
            if o["sweep"]:
                outcomes[(o["split"], o["family"], o["snr"], o["row"])] = o
    thresholds = choose_thresholds([o for o in outcomes.values() if o["split"] == "dev"])
    columns = [(name, row) for name, row in COMPARED
               if any(key[3] == row for key in outcomes)]
    for split in ("dev", "test"):
        keys = sorted({key[:3] for key in outcomes if key[0] == split},
                      key=lambda key: (key[1], -key[2]))
        if not keys:
            continue
        rows, errors = [], {name: [] for name, _ in columns}
        for key in keys:
            cells = []
            for name, row in columns:
                o = outcomes.get((*key, row))
                if o is None:
                    cells.append("-")
                    continue
                scores = at_threshold(o["sweep"], thresholds[o["method"]])["crossing"]
                errors[name].append(scores["angular_error"])
                cells.append(f"{scores['angular_error']:.1f} / {scores['success_rate']:.2f} / "
                             f"{scores['fn_rate']:.2f}")
            rows.append([key[1], f"{key[2]:g}", *cells])
        rows.append(["mean AE", "", *(f"{np.mean(errors[name]):.1f}" if errors[name] else "-"
                                      for name, _ in columns)])
        print(f"\n{split} (thresholds: " + ", ".join(
            f"{name} {thresholds[ROWS[row]]:.2f}" for name, row in columns
            if ROWS[row] in thresholds) + ")\n"
            + markdown(["family", "SNR", *(name for name, _ in columns)], rows))


def held_aside_losses(labelled, scans=24, held=3, side=14, seed=0):
    """Every pretraining loss of ``LABEL=WEIGHTS`` RT-ESD corrections on the cohort's
    held-aside scans (``esdmri_pretrain``'s defaults), fitted on the whole mask and on
    the WM voxels; each loss's value for the prior in the first row ("refined": the
    distance to each scan's default fit, computed here)."""
    from esdmri.cohort import MASKS, cohort_settings, prepare_scan
    from esdmri.reconst.pretrained import load_correction
    from esdmri.reconst.pretraining import LOSSES, as_tensors, evaluate

    items = {mask: [as_tensors(prepare_scan(setting, side, mask, refined=True))
                    for setting in cohort_settings(scans + held, seed)[scans:]]
             for mask in MASKS}
    columns = [(loss, mask) for mask in MASKS for loss in LOSSES]
    rows = []
    for item in labelled:
        label, path = item.split("=", 1)
        correction = load_correction(path)
        values = {column: evaluate(correction, items[column[1]], column[0])
                  for column in columns}
        if not rows:
            rows.append(["prior", *(f"{values[c][1]:.4f}" for c in columns)])
        rows.append([label, *(f"{values[c][0]:.4f}" for c in columns)])
    print(markdown(["weights", *(f"{loss} ({mask} mask)" for loss, mask in columns)], rows))


def time_on_dev(labelled, side, repeats, architecture="rtesd"):
    """Fit CPU seconds, refinement steps and evaluations of the network-free default and
    of each pretrained path (``LABEL=WEIGHTS``, or a bare path labelled "pretrained") on
    the dev phantoms, interleaved in one process (on a shared machine the ratios count;
    the steps and evaluations do not depend on the load); then each start's objective,
    the objective at the stop, and the evaluations the network-free refinement took to
    get as low as that start."""
    options = [("network-free", False)] + labelled_weights(labelled)
    rows, objectives, totals = [], [], {label: [0.0, 0, 0] for label, _ in options}
    for family, snr, phantom in dev_phantoms(side):
        seconds = {label: [] for label, _ in options}
        histories = {}
        for _ in range(repeats):
            for label, weights_option in options:
                start = time.process_time()
                fit = quiet_fit(MODEL_CLASSES[architecture], phantom,
                                pretrained=weights_option)
                seconds[label].append(time.process_time() - start)
                histories[label] = fit.refine_history
        free = np.median(seconds["network-free"])
        row = [family, f"{snr:g}"]
        for label, _ in options:
            cpu, history = np.median(seconds[label]), histories[label]
            totals[label][0] += cpu
            totals[label][1] += history.steps
            totals[label][2] += history.evaluations
            row.append(f"{cpu:.1f} ({cpu / free:.2f}), {history.steps} / "
                       f"{history.evaluations}")
        rows.append(row)
        objectives.append([family, f"{snr:g}", *(
            f"{histories[label][0]:.4g} / {histories[label][-1]:.4g} / "
            f"{reached(histories['network-free'], histories[label][0])}"
            for label, _ in options)])
    free = totals["network-free"][0]
    rows.append(["total", "", *(f"{cpu:.1f} ({cpu / free:.2f}), {steps} / {evaluations}"
                               for cpu, steps, evaluations in totals.values())])
    print("fit CPU seconds (over the network-free fit's), refinement steps / evaluations; "
          f"median of {repeats} interleaved fits, one thread\n"
          + markdown(["family", "SNR", *(label for label, _ in options)], rows))
    print("\nobjective per voxel at the start / at the stop / evaluations the network-free "
          "refinement took to get as low as this start (checked every 10 steps)\n"
          + markdown(["family", "SNR", *(label for label, _ in options)], objectives))


def reached(history, value):
    """Evaluations ``history`` (a RefinementHistory) had made at its first recorded
    objective at or below ``value`` (">N": never, N its evaluations in all)."""
    for recorded, evaluations in zip(history, history.evaluations_at):
        if recorded <= value:
            return str(evaluations)
    return f">{history.evaluations}"


def oracle_starts(side, architecture="rtesd"):
    """How many refinement evaluations the best possible correction would leave: per dev
    phantom, the refinement's steps / evaluations from the prior (network-free), from the
    shipped correction (the default fit), from the default fit's own end point, and from
    the prior with its WM degrees 2-8 replaced by the end point's (all a correction of
    degrees 2-8 can change: the distillation's target reached exactly)."""
    from esdmri.reconst.pretrained import CORRECTED_ORDER
    from esdmri.shm import n_coeffs

    labels = ("prior (network-free)", "shipped correction (default)",
              "the default fit's end point", "prior + end point's degrees 2-8")
    rows = []
    for family, snr, phantom in dev_phantoms(side):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = MODEL_CLASSES[architecture](phantom.gtab, verbose=False)
            scan = model.prepare(phantom.data, mask=phantom.mask)
            prior = model.prior_coefficients(scan)
            default, history = model.refine(model.corrected_prior(prior, scan), scan)
            n = min(n_coeffs(CORRECTED_ORDER),
                    prior.shape[-1] - (len(scan.response.tissues) - 1))
            perfect = prior.copy()
            perfect[..., 1:n] = default[..., 1:n]
            histories = [model.refine(prior, scan)[1], history,
                         model.refine(default, scan)[1], model.refine(perfect, scan)[1]]
        rows.append([family, f"{snr:g}", *(f"{h.steps} / {h.evaluations}"
                                          for h in histories)])
    print("refinement steps / evaluations to the stop, by start (default refinement)\n"
          + markdown(["family", "SNR", *labels], rows))


def crossing_at_default_threshold(model, coefficients, scan, phantom):
    """Crossing-voxel scores (``benchmarks.devset.scored_sweep``'s) of a model's
    coefficients on a phantom's scored voxels, peaks at the default's dev threshold
    (``PEAK_THRESHOLD``, 0.20)."""
    from esdmri.reconst.config import PEAK_THRESHOLD
    from esdmri.reconst.fit import DeconvolutionFit

    from .devset import at_threshold, scored_sweep
    from .methods import MethodResult

    scored = scored_voxels(phantom)
    fit = DeconvolutionFit(model, coefficients, scan.mask, response=scan.response)
    result = MethodResult(np.where(scored[..., None], fit.shm_coeff_descoteaux07, 0))
    return at_threshold(scored_sweep(result, phantom.fibre_dirs, scored),
                        PEAK_THRESHOLD)["crossing"]


def truth_starts(side, split="dev", architecture="rtesd"):
    """Does the refinement's start decide where it ends? Per phantom of ``split``, the
    crossing error / success / FN (peaks at 0.20, the default's dev threshold) of the
    refinement from the prior (network-free), from the shipped correction (the default
    fit) and from the truth (the prior with every WM degree above 0 replaced by the true
    fibres, :func:`esdmri.cohort.true_target`: the best start any correction could
    give), and of that true start itself."""
    from esdmri.cohort import true_target
    from esdmri.shm import n_coeffs

    labels = ("from the prior (network-free)", "from the shipped correction (default)",
              "from the truth", "the true start itself")
    rows = []
    for family, snr, phantom in dev_phantoms(side, split):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = MODEL_CLASSES[architecture](phantom.gtab, verbose=False)
            scan = model.prepare(phantom.data, mask=phantom.mask)
            prior = model.prior_coefficients(scan)
            n_wm = n_coeffs(model.config.network.sh_order_max)
            truth = prior.copy()
            target = true_target(phantom, prior, n_wm, model.config.network.sh_order_max)
            truth[..., 1:n_wm] = np.where(scan.mask[..., None], target[..., 1:], 0)
            ends = [model.refine(start, scan) for start in
                    (prior, model.corrected_prior(prior, scan), truth)]
        cells = []
        for coefficients, history in [*ends, (truth, None)]:
            crossing = crossing_at_default_threshold(model, coefficients, scan, phantom)
            cells.append(f"{crossing['angular_error']:.2f} / {crossing['success_rate']:.2f} / "
                         f"{crossing['fn_rate']:.2f}"
                         + (f" ({history.steps})" if history is not None else ""))
        rows.append([family, f"{snr:g}", *cells])
    print(f"crossing AE / success / FN at 0.20 ({split}, {side}^3; refinement steps in "
          "brackets)\n" + markdown(["family", "SNR", *labels], rows))


def dev_phantoms(side, split="dev"):
    """Each phantom of ``split`` of ``benchmarks/devset.py`` (every family, SNR 10 and
    20) at ``side``^3, as (family, SNR, phantom)."""
    from .devset import FAMILIES, SNRS, make_family

    for family in FAMILIES:
        for snr in SNRS:
            yield family, snr, make_family(family, side, snr, split)


def labelled_weights(labelled):
    """``LABEL=WEIGHTS`` items (a bare path labelled "pretrained") as (label, path) pairs."""
    return [tuple(item.split("=", 1)) if "=" in item else ("pretrained", item)
            for item in map(str, labelled)]


def scored_prior(phantom):
    """A dev phantom fitted on its scored (WM) voxels as ``benchmarks/network_test.py``
    fits: its scan, the network-free model, the prepared scan, the linear prior, the
    prior's mean per-voxel loss (no TV) and the per-voxel minimum's (the refinement
    without TV from the prior, run until it stalls)."""
    from esdmri import RTESDModel

    from .network_test import MINIMUM_STEPS
    from .training_curve import per_voxel_minimum, voxel_losses

    scan = scan_of(phantom)
    base = RTESDModel(scan.gtab, scan.response, pretrained=False, verbose=False)
    prepared = base.prepare(scan.data, mask=scored_voxels(phantom))
    prior = base.prior_coefficients(prepared)
    _, minimum, _ = per_voxel_minimum(base, prior, prepared.normalized, prepared.mask,
                                      MINIMUM_STEPS)
    prior_loss = voxel_losses(base, prior, prepared.normalized, prepared.mask)
    return scan, base, prepared, prior, prior_loss, minimum


def losses_on_dev(labelled, side):
    """Issue 25's loss goal for RT-ESD corrections (``LABEL=WEIGHTS``) alone: per dev
    phantom, fitted on its scored (WM) voxels as ``benchmarks/network_test.py`` fits, the
    mean per-voxel loss (signal fit, sparsity, non-negativity; no TV) of the linear prior,
    of each correction's output and of the per-voxel minimum (the refinement without TV
    from the prior, run until it stalls), and each correction's over the prior's and the
    minimum's."""
    from esdmri import RTESDModel

    from .training_curve import voxel_losses

    options = labelled_weights(labelled)
    rows = []
    for family, snr, phantom in dev_phantoms(side):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scan, base, prepared, prior, prior_loss, minimum = scored_prior(phantom)
            row = [family, f"{snr:g}", f"{prior_loss:.5f}", f"{minimum:.5f}"]
            for _, path in options:
                model = RTESDModel(scan.gtab, scan.response, pretrained=path, verbose=False)
                loss = voxel_losses(model, model.corrected_prior(prior, prepared),
                                    prepared.normalized, prepared.mask)
                row.append(f"{loss:.5f} ({loss / prior_loss:.2f} / {loss / minimum:.2f})")
        rows.append(row)
        print(" | ".join(row), flush=True)
    print("mean per-voxel loss on the scored voxels, network alone (over the prior's / "
          "over the per-voxel minimum's)\n"
          + markdown(["family", "SNR", "prior", "per-voxel min.",
                      *(label for label, _ in options)], rows))


def loss_floor(side, split="dev"):
    """What issue 25's loss goal asks of a network: per phantom of ``split``, fitted on
    its scored (WM) voxels as :func:`losses_on_dev` fits, the mean per-voxel loss (no TV)
    on the noisy scan of the linear prior, of the per-voxel minimum, of the **noise-free
    fit** (the per-voxel minimum of the same phantom without noise: same geometry, the
    noisy scan's response and settings, the true signal divided by the noisy b0; the
    model's best account of the true signal, scored against the noisy measurements) and of
    the shipped correction's output (the network alone). With ``N`` measurements and ``C``
    coefficients a least-squares fit's residual is ``(N - C) / N`` of the noise's, the
    true signal's all of it; ``N / (N - C)`` is printed beside the measured ratio."""
    from esdmri import RTESDModel
    from esdmri.reconst.network import build_fodf_sampler, build_forward_model
    from esdmri.reconst.refine import refine_coefficients
    from esdmri.shm import n_coeffs

    from .devset import make_family
    from .network_test import MINIMUM_STEPS
    from .training_curve import voxel_losses

    rows = []
    for family, snr, phantom in dev_phantoms(side, split):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scan, base, prepared, prior, prior_loss, minimum = scored_prior(phantom)
            noise_free = make_family(family, side, np.inf, split).data
            clean = base.prepare(noise_free, mask=scored_voxels(phantom))
            # The true signal in the noisy scan's units (divided by its noisy b0, as the
            # network's input is): a b0 scale the data show is not noise to ignore.
            b0 = phantom.gtab.b0s_mask
            scale = np.divide(noise_free[..., b0].mean(-1), phantom.data[..., b0].mean(-1),
                              out=np.zeros(phantom.mask.shape), where=clean.mask)
            clean = dataclasses.replace(
                clean, normalized=(clean.normalized * scale[..., None]).astype(np.float32))
            order = base.config.network.sh_order_max
            matrix = build_forward_model(base.response, base.gtab, order).matrix
            fitted, _ = refine_coefficients(
                base.prior_coefficients(clean), clean.normalized, clean.mask, matrix,
                build_fodf_sampler(order), n_coeffs(order), order,
                base.config.training.loss_weights, steps=MINIMUM_STEPS,
                lr=base.config.refinement.refine_lr, total_variation=0.0, tolerance=1e-5,
                normalize=base.normalizes)
            truth = voxel_losses(base, fitted, prepared.normalized, prepared.mask)
            shipped = RTESDModel(scan.gtab, scan.response, verbose=False)
            network = voxel_losses(shipped, shipped.corrected_prior(prior, prepared),
                                   prepared.normalized, prepared.mask)
        n, c = matrix.shape[1], matrix.shape[0]
        rows.append([family, f"{snr:g}", f"{prior_loss:.5f}", f"{minimum:.5f}", f"{truth:.5f}",
                     f"{network:.5f}", f"{prior_loss / minimum:.2f}", f"{truth / minimum:.2f}",
                     f"{network / minimum:.2f}", f"{network / truth:.2f}", f"{n} / {c}",
                     f"{n / (n - c):.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    print(f"mean per-voxel loss on the scored voxels ({split}, {side}^3)\n"
          + markdown(["family", "SNR", "prior", "per-voxel min.", "noise-free fit",
                      "shipped network alone", "prior / min.", "noise-free fit / min.",
                      "network / min.", "network / noise-free fit", "N / C", "N / (N - C)"],
                     rows))


PLAIN_STEPS = (0, 1, 2, 3, 5, 10, 20)


def plain_steps_on_dev(labelled, side, out, steps=PLAIN_STEPS, unroll=1):
    """The ablation an unrolled correction must beat: ``k`` plain refinement steps without
    TV (the default L-BFGS, ``refine_tv=0``) from the linear prior and from each RT-ESD
    correction's output (``LABEL=WEIGHTS``), per dev phantom fitted on its scored voxels as
    ``--losses`` fits: the mean per-voxel loss (``--losses``' definition) over the prior's
    and over the per-voxel minimum's, the loss evaluations, and the crossing-voxel AE / FN
    at the threshold ``benchmarks/devset.py`` would choose for each start and ``k`` over
    these dev phantoms (highest mean success, then lowest mean crossing error); the
    results in ``out`` (JSON). ``unroll``: each correction applied that many times, each
    time to the last one's output."""
    from esdmri import RTESDModel
    from esdmri.atomic import staged_output
    from esdmri.reconst.network import build_fodf_sampler, build_forward_model
    from esdmri.reconst.refine import refine_coefficients
    from esdmri.shm import n_coeffs

    from .devset import scored_sweep
    from .methods import MethodResult
    from .training_curve import voxel_losses

    if unroll < 1:
        raise ValueError(f"unroll must be an integer >= 1, got {unroll!r}")

    starts = [("prior", None)] + labelled_weights(labelled)
    results = []
    for family, snr, phantom in dev_phantoms(side):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scan, base, prepared, prior, prior_loss, minimum = scored_prior(phantom)
            order = base.config.network.sh_order_max
            n_wm = n_coeffs(order)
            forward = build_forward_model(base.response, base.gtab, order).matrix
            sampler = build_fodf_sampler(order)
            for label, path in starts:
                start = prior
                if path is not None:
                    model = RTESDModel(scan.gtab, scan.response, pretrained=path,
                                       verbose=False)
                    for _ in range(unroll):
                        start = model.corrected_prior(start, prepared)
                    label = label if unroll == 1 else f"{label} x{unroll}"
                for k in steps:
                    fitted, evaluations = start, 0
                    if k:
                        fitted, history = refine_coefficients(
                            start, prepared.normalized, prepared.mask, forward, sampler, n_wm,
                            order, base.config.training.loss_weights, steps=k,
                            lr=base.config.refinement.refine_lr, total_variation=0.0,
                            normalize=base.normalizes)
                        evaluations = history.evaluations
                    loss = voxel_losses(base, fitted, prepared.normalized, prepared.mask)
                    sweep = scored_sweep(MethodResult(np.asarray(fitted)[..., :n_wm]),
                                         phantom.fibre_dirs, prepared.mask)
                    results.append({
                        "family": family, "snr": snr, "start": label, "k": k,
                        "evaluations": evaluations, "loss": loss, "prior_loss": prior_loss,
                        "minimum": minimum, "sweep": sweep})
                    print(f"{family} {snr:g} {label} k={k}: loss {loss:.5f} "
                          f"({loss / prior_loss:.3f} / {loss / minimum:.3f}), "
                          f"{evaluations} evaluations", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_output(out) as temporary:
        temporary.write_text(json.dumps(results))
    plain_steps_report(results)


def plain_steps_report(results):
    """The tables of :func:`plain_steps_on_dev`'s results."""
    from .devset import THRESHOLDS, best_threshold

    keys = sorted({(r["family"], r["snr"]) for r in results}, key=lambda k: (k[0], -k[1]))
    columns = list(dict.fromkeys((r["start"], r["k"]) for r in results))
    by = {(r["family"], r["snr"], r["start"], r["k"]): r for r in results}
    chosen = {column: best_threshold([r["sweep"] for r in results
                                      if (r["start"], r["k"]) == column])
              for column in columns}
    head = ["family", "SNR", *(f"{start} k={k}" for start, k in columns)]
    for title, cell in (
            ("loss over the prior's / over the per-voxel minimum's",
             lambda r, c: f"{r['loss'] / r['prior_loss']:.2f} / {r['loss'] / r['minimum']:.2f}"),
            ("crossing AE (degrees) / FN at each column's dev threshold",
             lambda r, c: "{angular_error:.1f} / {fn_rate:.2f}".format(
                 **r["sweep"][chosen[c]]["crossing"]))):
        rows = [[family, f"{snr:g}", *(cell(by[(family, snr, *c)], c) for c in columns)]
                for family, snr in keys]
        means, last = ["mean", ""], ["", ""]
        for c in columns:
            picked = [by[(family, snr, *c)] for family, snr in keys]
            if title.startswith("loss"):
                means.append(f"{np.mean([r['loss'] / r['prior_loss'] for r in picked]):.2f} / "
                             f"{np.mean([r['loss'] / r['minimum'] for r in picked]):.2f}")
                near = sum(r["loss"] <= 1.25 * r["minimum"] for r in picked)
                last[0] = "within 1.25x the minimum"
                last.append(f"{near} of {len(picked)}")
            else:
                errors = [r["sweep"][chosen[c]]["crossing"]["angular_error"] for r in picked]
                means.append(f"{np.mean(errors):.2f}")
                last[0] = "threshold"
                last.append(f"{THRESHOLDS[chosen[c]]:g}")
        rows += [means, last]
        print(f"{title}\n" + markdown(head, rows))
    evaluations = ["evaluations (sum over phantoms)", "",
                   *(str(sum(by[(f, s, *c)]["evaluations"] for f, s in keys)) for c in columns)]
    print(markdown(head, [evaluations]))


def time_inference(labelled, side, repeats):
    """CPU seconds of :func:`esdmri.reconst.pretrained.apply_correction` (the default
    pass: folded on a CPU where the correction folds) of RT-ESD corrections
    (``LABEL=WEIGHTS``) on the real linear prior of ``benchmarks/bench_correction.py``'s
    dev phantom (``side``^3, SNR 20), interleaved in one process (the ratios count on a
    shared machine), median of ``repeats``."""
    from esdmri.reconst.folded import foldable
    from esdmri.reconst.pretrained import apply_correction, load_correction

    from .bench_correction import cpu_seconds, dev_phantom, dev_prior

    coefficients, mask, tissues = dev_prior(dev_phantom(side))
    corrections = [(label, load_correction(path)) for label, path in
                   labelled_weights(labelled)]
    seconds = {label: [] for label, _ in corrections}
    for repeat in range(repeats):
        for label, correction in corrections[::1 if repeat % 2 == 0 else -1]:
            seconds[label].append(cpu_seconds(apply_correction, correction, coefficients,
                                              mask, tissues)[0])
    first = np.median(seconds[corrections[0][0]])
    rows = [[label, f"{correction.order}", f"{correction.architecture['nside']}",
             "folded" if foldable(correction) else "layered",
             f"{np.median(seconds[label]):.2f}", f"{np.median(seconds[label]) / first:.2f}",
             f"{1e6 * np.median(seconds[label]) / mask.sum():.0f}"]
            for label, correction in corrections]
    print(f"apply_correction on the {side}^3 dev phantom's prior ({int(mask.sum())} masked "
          f"voxels, {coefficients.shape[-1]} coefficients: WM SH and tissues), CPU "
          f"seconds, median of {repeats} interleaved, {torch.get_num_threads()} thread(s)\n"
          + markdown(["weights", "corrected order", "nside", "pass", "CPU (s)",
                      f"/ {corrections[0][0]}", "us per voxel"], rows))


def quiet_fit(model_class, phantom, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_class(phantom.gtab, verbose=False, **options).fit(phantom.data,
                                                                       mask=phantom.mask)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dev", type=Path, metavar="WEIGHTS",
                      help="score these weights on the dev phantoms")
    mode.add_argument("--timing", nargs="+", metavar="[LABEL=]WEIGHTS",
                      help="time the fits of the dev phantoms with and without these weights "
                           "and count their refinement steps and evaluations")
    mode.add_argument("--compare", nargs="+", type=Path, metavar="JSON",
                      help="tabulate the three architectures' rows of devset runs")
    mode.add_argument("--variants", nargs="+", metavar="LABEL=JSON",
                      help="tabulate the RT-ESD rows of devset runs of several weights")
    mode.add_argument("--oracle", action="store_true",
                      help="refinement evaluations from the prior, the shipped correction, "
                           "the default fit's end point and the best a correction can give")
    mode.add_argument("--truth-start", action="store_true",
                      help="crossing accuracy of the refinement from the prior, the shipped "
                           "correction and the true fibres (--split)")
    mode.add_argument("--loss-floor", action="store_true",
                      help="issue 25's loss goal against the loss of the noise-free fit on "
                           "the noisy scan (--split)")
    mode.add_argument("--losses", nargs="+", metavar="[LABEL=]WEIGHTS",
                      help="issue 25's loss goal: the network-alone loss of these RT-ESD "
                           "weights on the dev phantoms against the prior's and the "
                           "per-voxel minimum's")
    mode.add_argument("--plain-steps", nargs="*", metavar="[LABEL=]WEIGHTS",
                      help="the ablation of an unrolled correction: k plain refinement steps "
                           "without TV from the prior (and from these RT-ESD corrections) "
                           "on the dev phantoms: loss, evaluations, crossing AE")
    parser.add_argument("--plain-out", type=Path, default=Path("out/plain-steps.json"),
                        help="with --plain-steps: the results JSON")
    parser.add_argument("--unroll", type=int, default=1,
                        help="with --plain-steps: apply each correction this many times")
    mode.add_argument("--inference", nargs="+", metavar="[LABEL=]WEIGHTS",
                      help="CPU seconds of these RT-ESD corrections on the prior of a "
                           "--side^3 dev phantom (e.g. 40), interleaved")
    mode.add_argument("--held", nargs="+", metavar="LABEL=WEIGHTS",
                      help="the pretraining losses of RT-ESD weights on the cohort's "
                           "held-aside scans")
    parser.add_argument("--held-scans", type=int, nargs=2, default=(24, 3),
                        metavar=("AFTER", "COUNT"),
                        help="with --held: score on the COUNT cohort scans after the first "
                             "AFTER (default: esdmri_pretrain's held-aside scans, 24 3; "
                             "past every cohort compared, e.g. 52 4, for weights trained "
                             "on more scans)")
    parser.add_argument("--architecture", choices=tuple(PRETRAINED_ROWS), default="rtesd",
                        help="the weights' architecture (the model class that runs them)")
    parser.add_argument("--side", type=int, default=14, help="phantom edge (voxels)")
    parser.add_argument("--dev-out", type=Path, default=Path("out/pretrain-dev"))
    parser.add_argument("--refine-steps", type=int,
                        help="with --dev: the refined row's step budget (default: the "
                             "models' default)")
    parser.add_argument("--baselines", choices=tuple(BASELINES), default="all",
                        help="with --dev: the rows beside the pretrained ones")
    parser.add_argument("--fit-mask", choices=("whole", "wm"), default="whole",
                        help="with --dev: fit the phantoms' whole masks or their WM voxels")
    parser.add_argument("--split", choices=("dev", "test"), default="dev",
                        help="with --dev: the split (test: once, with --thresholds); with "
                             "--truth-start and --loss-floor: the phantoms")
    parser.add_argument("--thresholds", type=Path,
                        help="with --dev --split test: the dev run's results JSON")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    if args.compare:
        compare(args.compare)
    elif args.variants:
        variants(args.variants)
    elif args.oracle:
        oracle_starts(args.side, args.architecture)
    elif args.loss_floor:
        loss_floor(args.side, args.split)
    elif args.truth_start:
        truth_starts(args.side, args.split, args.architecture)
    elif args.held:
        held_aside_losses(args.held, *args.held_scans)
    elif args.losses:
        losses_on_dev(args.losses, args.side)
    elif args.plain_steps is not None:
        plain_steps_on_dev(args.plain_steps, args.side, args.plain_out, unroll=args.unroll)
    elif args.inference:
        time_inference(args.inference, args.side, args.repeats)
    elif args.dev:
        score_on_dev(args.dev, args.dev_out, args.side, args.architecture, args.refine_steps,
                     baselines=args.baselines, fit_mask=args.fit_mask, split=args.split,
                     thresholds=args.thresholds)
    else:
        time_on_dev(args.timing, args.side, args.repeats, args.architecture)


if __name__ == "__main__":
    main()
