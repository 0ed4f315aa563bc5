"""Does the network learn? Fine-tuning the shipped correction, on dev and test phantoms.

The phantoms of ``benchmarks/devset.py`` (every family, SNR 10 and 20, split
``dev`` to choose settings and each row's relative peak threshold, split
``test`` once with them: geometry and noise seeds never used on dev). Every
method is fitted on the scored voxels (those with WM fibres) with the
responses estimated from the scan, at the package's default SH order. Rows:

- the linear prior alone (``pretrained=False, refine_steps=0``) and the
  network-free coupled fit (``pretrained=False``);
- the shipped pretrained correction alone (``refine_steps=0``) and the
  default fit (pretrained correction + refinement);
- the correction fine-tuned on the scan (``epochs=N``: the refinement's
  objective as the loss, :mod:`esdmri.reconst.finetune`) for each setting of
  ``--finetune`` (``lr:batch_size:epochs``), alone and refined;
- optionally (``--trained``) the per-scan network trained from scratch
  (``pretrained=False, epochs=N``, order 8 on nside 4) as measured before;
- DIPY's CSD (and, with ``--baselines``, RUMBA-SD + TV; ``benchmarks/methods.py``).

It also records issue 25's loss goals: the mean per-voxel loss (signal fit,
sparsity, non-negativity; no TV) over the fitted voxels of the linear prior,
the pretrained and the fine-tuned correction and the per-voxel minimum
(:func:`benchmarks.training_curve.per_voxel_minimum`, the refinement without
TV run until it stalls), and the refinement's objective per voxel (with its
TV, which the fine-tuning minimises) of the three.

Usage::

    python -m benchmarks.network_test --split dev --side 12 --out out/network_test
    python -m benchmarks.network_test --split test --side 12 --finetune 1e-3:4:10 \
        --out out/network_test
    python -m benchmarks.network_test --report out/network_test/results-*.json
"""

import argparse
import copy
import itertools
import json
import re
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from esdmri import RTESDModel
from esdmri.atomic import staged_output
from esdmri.metrics import evaluate_peaks
from esdmri.reconst.finetune import HeldOutError, holdout_volumes, retained_scan
from esdmri.reconst.fit import DeconvolutionFit
from esdmri.reconst.network import build_fodf_sampler, build_forward_model
from esdmri.reconst.pretrained import apply_correction
from esdmri.reconst.refine import refine_coefficients
from esdmri.reconst.training import IMPROVEMENT
from esdmri.shm import n_coeffs

from .devset import FAMILIES, MATCH_ANGLE, SNRS, SPLITS, THRESHOLDS, make_family
from .heldout import markdown, scan_of, scored_voxels
from .methods import METHODS, MethodResult, peak_sweep
from .training_curve import per_voxel_minimum, voxel_losses

# Fine-tuning settings "lr:batch_size:epochs[:holdout:holdout_refine_steps]" (no
# hold-out part: holdout=0, the evaluation loss keeps the weights): the one chosen on
# dev, which the test split runs (tried on dev: 3e-4:4:10, 1e-3:16:10, 1e-3:4:3 without
# hold-out; 1e-3:4:10 and 3e-4:4:10 with hold-out 0.125 and every rule of --study;
# docs/benchmarks.md, "Does the network learn?").
FINETUNE_SETTINGS = ("1e-3:4:10:0.125:30",)
# The from-scratch per-scan network as measured before the fine-tuning (order 8, nside 4).
EPOCHS = 25
TRAIN_WINDOWS = 300
SCRATCH_SHAPE = {"sh_order_max": 8, "nside": 4}
TV_IN_LOSS = {"train_tv": 0.5, "train_tv_form": "normalized_fodf"}
# Trained rows: label prefix -> extra options.
TRAINED_ROWS = {"trained network": {}, "trained network, TV in loss": TV_IN_LOSS}
BASELINES = {"DIPY CSD": "csd", "DIPY RUMBA-SD + TV": "rumba-tv"}
# Rows that may be left out on dev (compute) take the dev threshold of their twin.
THRESHOLD_TWINS = {"trained network, TV in loss alone": "trained network alone",
                   "trained network, TV in loss + refinement": "trained network + refinement"}
MINIMUM_STEPS = 5000
# Refinement steps before the held-out volumes are predicted, per epoch of --study.
STUDY_STEPS = (0, 10, 30)


def finetune_options(setting):
    """The model options of a ``lr:batch_size:epochs[:holdout:refine_steps]`` setting."""
    lr, batch_size, epochs, *holdout = setting.split(":")
    options = {"lr": float(lr), "batch_size": int(batch_size), "epochs": int(epochs),
               "train_windows": 10**9, "holdout": 0.0}  # no hold-out: the loss keeps
    if holdout:
        options.update(holdout=float(holdout[0]), holdout_refine_steps=int(holdout[1]))
    return options


def finetune_label(setting):
    lr, batch_size, epochs, *holdout = setting.split(":")
    label = f"fine-tuned (lr {lr}, batch {batch_size}, {epochs} epochs"
    if holdout:
        label += f", hold-out {holdout[0]}, {holdout[1]} refine steps"
    return label + ")"


def epoch_study(model, states, prepared, prior, phantom, mask, sweep):
    """Per epoch of a hold-out fine-tuning: the held-out errors and the fits' accuracy.

    For the starting weights and each epoch's (``states``): the held-out
    error after :data:`STUDY_STEPS` refinement steps on the retained volumes,
    the loss of the correction alone, and the peak sweeps of the correction
    alone and of the full fit (the model's refinement of the corrected
    whole-scan prior), so that every selection rule can be replayed on the
    same path of training.
    """
    training = model.config.training
    held = holdout_volumes(prepared.gtab, training.holdout, training.seed)
    retained_prior = model.prior_coefficients(
        retained_scan(prepared, held, model.sphere.vertices))
    judges = {steps: HeldOutError(prepared, held, retained_prior,
                                  model.with_options(holdout_refine_steps=steps).config)
              for steps in STUDY_STEPS}
    correction = copy.deepcopy(model.pretrained_correction())
    records = []
    for state in states:
        correction.load_state_dict({name.removeprefix("correction."): value
                                    for name, value in state.items()})
        correction.eval()
        corrected = apply_correction(correction, prior, prepared.mask,
                                     prepared.response.tissues)
        refined, _ = model.refine(corrected, prepared)
        records.append({
            "heldout": {str(steps): judge(correction) for steps, judge in judges.items()},
            "loss": voxel_losses(model, corrected, prepared.normalized, prepared.mask),
            "alone_sweep": sweep(model, corrected), "full_sweep": sweep(model, refined)})
    return records


def sweep_of(result, phantom, mask):
    """Crossing and all-voxel scores at every threshold, as ``benchmarks/devset.py`` keeps them."""
    sweep = []
    for _, directions in peak_sweep(result, THRESHOLDS, mask):
        scores = evaluate_peaks(directions, phantom.fibre_dirs, mask, threshold_deg=MATCH_ANGLE)
        sweep.append({part: {k: float(scores[part][k]) for k in
                             ("angular_error", "success_rate", "fn_rate", "fp_rate")}
                      for part in ("all", "crossing")})
    return sweep


def objective(model, coefficients, scan):
    """The refinement's objective per voxel (with its TV) at some coefficients."""
    order, config = model.config.network.sh_order_max, model.config.refinement
    _, history = refine_coefficients(
        coefficients, scan.normalized, scan.mask,
        build_forward_model(scan.response, model.gtab, order).matrix, build_fodf_sampler(order),
        n_coeffs(order), order, model.config.training.loss_weights,
        **{**config.solver_options(), "steps": 0}, normalize=False)
    return float(history[0])


def network_rows(scan, mask, args, log, phantom=None):
    """Every esdmri row of one scan: {label: (MethodResult, seconds)} and the loss records."""
    options = dict(sh_order_max=args.sh_order, seed=args.seed, verbose=False)
    base = RTESDModel(scan.gtab, scan.response, pretrained=False, **options)
    prepared = base.prepare(scan.data, mask=mask)

    def result(model, coefficients):
        fit = DeconvolutionFit(model, coefficients, prepared.mask, response=prepared.response)
        return MethodResult(np.where(mask[..., None], fit.shm_coeff_descoteaux07, 0.0))

    def losses_of(model, coefficients):
        return {"loss": voxel_losses(model, coefficients, normalized, prepared.mask),
                "objective": objective(model, coefficients, prepared)}

    normalized = prepared.normalized
    start = time.perf_counter()
    prior = base.prior_coefficients(prepared)
    prior_seconds = time.perf_counter() - start
    rows = {"linear prior alone": (result(base, prior), prior_seconds)}
    refined, _ = base.refine(prior, prepared)
    rows["network-free (pretrained=False)"] = (result(base, refined),
                                               time.perf_counter() - start)
    minimum, minimum_normalized, minimum_steps = per_voxel_minimum(
        base, prior, normalized, prepared.mask, MINIMUM_STEPS)
    losses = {"prior": losses_of(base, prior), "per_voxel_minimum": minimum,
              "per_voxel_minimum_normalized": minimum_normalized,
              "minimum_steps": minimum_steps}
    default = RTESDModel(scan.gtab, scan.response, **options)
    start = time.perf_counter()
    corrected = default.corrected_prior(prior, prepared)
    rows["pretrained alone"] = (result(default, corrected),
                                prior_seconds + time.perf_counter() - start)
    refined, _ = default.refine(corrected, prepared)
    rows["default (pretrained + refinement)"] = (
        result(default, refined), prior_seconds + time.perf_counter() - start)
    losses["pretrained"] = {**losses_of(default, corrected),
                            "refined": voxel_losses(default, refined, normalized,
                                                    prepared.mask)}
    for setting in args.finetune:
        label = finetune_label(setting)
        model = RTESDModel(scan.gtab, scan.response, **finetune_options(setting), **options)
        states = []

        def record_epoch(state):
            if not states:
                states.append(state["initial_state"])
            states.append(state["network"])
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(prepared, on_epoch=record_epoch if args.study else None)
        tuned = model.corrected_prior(prior, prepared)
        seconds = prior_seconds + time.perf_counter() - start
        rows[f"{label} alone"] = (result(model, tuned), seconds)
        refined, _ = model.refine(tuned, prepared)
        rows[f"{label} + refinement"] = (result(model, refined),
                                         prior_seconds + time.perf_counter() - start)
        summary = model.training_summary
        losses[label] = {**losses_of(model, tuned),
                         "refined": voxel_losses(model, refined, normalized, prepared.mask),
                         "eval_start": summary["start_loss"], "eval_best": summary["best_loss"],
                         "eval_history": [h["eval_total"] for h in model.training_history],
                         "best_epoch": summary["best_epoch"], "steps": summary["steps"],
                         "fell_back": summary["fell_back"], "train_seconds": seconds,
                         "selection_history": [h.get("selection")
                                               for h in model.training_history],
                         "start_selection": summary.get("start_selection")}
        if args.study and model.config.training.holdout:
            study_start = time.perf_counter()
            losses[label]["study"] = epoch_study(
                model, states, prepared, prior, phantom, mask,
                lambda m, c: sweep_of(result(m, c), phantom, mask))
            log(f"  {label}: epoch study in {time.perf_counter() - study_start:.0f} s")
        log(f"  {label}: {summary['steps']} steps in {seconds:.0f} s, loss "
            f"{losses[label]['loss']:.5g} (prior {losses['prior']['loss']:.5g}, pretrained "
            f"{losses['pretrained']['loss']:.5g}, per-voxel minimum {minimum:.5g}), "
            f"fell back: {summary['fell_back']}")
    for label in args.trained:
        model = RTESDModel(scan.gtab, scan.response, pretrained=False, epochs=args.epochs,
                           train_windows=args.train_windows, **TRAINED_ROWS[label],
                           **{**options, **SCRATCH_SHAPE})
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(prepared, max_steps=model.config.training.train_windows)
        network = model.network_coefficients(prepared)
        seconds = time.perf_counter() - start
        rows[f"{label} alone"] = (result(model, network), seconds)
        refined, _ = model.refine(network, prepared)
        rows[f"{label} + refinement"] = (result(model, refined), time.perf_counter() - start)
        summary = model.training_summary
        losses[label] = {"loss": voxel_losses(model, network, normalized, prepared.mask),
                         "refined": voxel_losses(model, refined, normalized, prepared.mask),
                         "steps": summary["steps"], "fell_back": summary["fell_back"],
                         "stopped_by": summary["stopped_by"], "train_seconds": seconds}
    return rows, losses


def baseline_rows(scan, mask, labels, record, log):
    """The baselines' fits, {label: (MethodResult, seconds)}; a failure goes on ``record``."""
    rows = {}
    for label in labels:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = METHODS[BASELINES[label]].fit(scan, mask)
            rows[label] = (result, time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - one baseline must not stop the run
            log(traceback.format_exc())
            record["rows"][label] = {"sweep": [], "seconds": float("nan"),
                                     "error": f"{type(error).__name__}: {error}"}
    return rows


def run(args, log):
    outcomes = []
    for family, snr in itertools.product(args.families, args.snrs):
        phantom = make_family(family, args.side, snr, args.split)
        scan, mask = scan_of(phantom), scored_voxels(phantom)
        log(f"{family} SNR {snr:g} ({args.split}): {int(mask.sum())} voxels, "
            f"{int((phantom.n_fibres >= 2).sum())} crossing")
        record = {"family": family, "snr": snr, "split": args.split, "rows": {}, "losses": {}}
        rows = {}
        if not args.baselines_only:
            rows, record["losses"] = network_rows(scan, mask, args, log, phantom)
        rows.update(baseline_rows(scan, mask, args.baselines, record, log))
        for label, (method_result, seconds) in rows.items():
            record["rows"][label] = {"sweep": sweep_of(method_result, phantom, mask),
                                     "seconds": seconds, "error": ""}
            log(f"  {label}: {seconds:.0f} s")
        outcomes.append(record)
        save(args, outcomes)
    return outcomes


def save(args, outcomes):
    args.out.mkdir(parents=True, exist_ok=True)
    with staged_output(args.out / f"results-{args.split}.json") as temporary:
        temporary.write_text(json.dumps({"split": args.split, "side": args.side,
                                         "sh_order_max": args.sh_order,
                                         "finetune": args.finetune, "epochs": args.epochs,
                                         "train_windows": args.train_windows,
                                         "outcomes": outcomes}, indent=1, default=float))


def choose_thresholds(outcomes):
    """Per row: the threshold of highest mean success over the dev phantoms (ties: error)."""
    chosen = {}
    labels = {label for o in outcomes for label in o["rows"]}
    for label in labels:
        sweeps = [o["rows"][label]["sweep"] for o in outcomes
                  if label in o["rows"] and o["rows"][label]["sweep"]]
        if not sweeps:
            continue
        success = np.mean([[s["all"]["success_rate"] for s in sw] for sw in sweeps], axis=0)
        error = np.mean([[s["crossing"]["angular_error"] for s in sw] for sw in sweeps], axis=0)
        chosen[label] = float(THRESHOLDS[np.lexsort((error, -success))[0]])
    for label, twin in THRESHOLD_TWINS.items():
        if label not in chosen and twin in chosen:
            chosen[label] = chosen[twin]
    return chosen


HEADER = ["family", "SNR", "method", "threshold", "AE crossing (deg)", "success crossing",
          "FN crossing", "AE all (deg)", "fit (s)"]
SUMMARY_HEADER = ["method", "SNR", "mean AE crossing (deg)", "mean success crossing",
                  "mean FN crossing", "AE / prior alone", "worse than default on"]
LOSS_HEADER = ["family", "SNR", "correction", "prior loss", "per-voxel min.", "loss",
               "loss / prior", "loss / min.", "objective (with TV)", "prior objective",
               "steps", "best epoch", "fell back"]


def _scores(row, threshold):
    return row["sweep"][list(THRESHOLDS).index(threshold)]["crossing"]


def replay_rows(outcome):
    """Rows of the other hold-out selection rules, replayed on an outcome's --study paths.

    The path of training does not depend on which held-out error keeps the
    weights (:class:`esdmri.reconst.training.Trainer`), so the fit a run with
    ``holdout_refine_steps=K`` returns is the study's record of the epoch
    that rule keeps: its rows (alone, + refinement) are added under their
    own labels, for the dev thresholds of a setting chosen after the runs.
    """
    for label, losses in list(outcome["losses"].items()):
        if not isinstance(losses, dict) or "study" not in losses:
            continue
        study = losses["study"]
        for steps in STUDY_STEPS:
            other = re.sub(r"\d+ refine steps\)$", f"{steps} refine steps)", label)
            if f"{other} alone" in outcome["rows"]:
                continue
            kept = study[kept_epoch([r["heldout"][str(steps)] for r in study])]
            for suffix, sweep in ((" alone", "alone_sweep"), (" + refinement", "full_sweep")):
                outcome["rows"][other + suffix] = {"sweep": kept[sweep], "error": "",
                                                   "seconds": float("nan"), "replayed": True}


def report(files):
    """The tables: thresholds chosen on the dev outcomes, applied to every split."""
    outcomes = [o for path in files for o in json.loads(Path(path).read_text())["outcomes"]]
    for outcome in outcomes:
        replay_rows(outcome)
    thresholds = choose_thresholds([o for o in outcomes if o["split"] == "dev"])
    for split in SPLITS:
        chosen = sorted((o for o in outcomes if o["split"] == split),
                        key=lambda o: (o["family"], -o["snr"]))
        rows, loss_rows, summary = [], [], []
        for o in chosen:
            for label, row in o["rows"].items():
                if row["error"] or label not in thresholds:
                    rows.append([o["family"], f"{o['snr']:g}", label, "-", "-", "-", "-", "-",
                                 row["error"][:60] or "no dev threshold"])
                    continue
                scores = row["sweep"][list(THRESHOLDS).index(thresholds[label])]
                rows.append([o["family"], f"{o['snr']:g}", label, f"{thresholds[label]:.2f}",
                             f"{scores['crossing']['angular_error']:.1f}",
                             f"{scores['crossing']['success_rate']:.2f}",
                             f"{scores['crossing']['fn_rate']:.2f}",
                             f"{scores['all']['angular_error']:.1f}", f"{row['seconds']:.0f}"])
            losses = o["losses"]
            prior = losses["prior"]
            for label in (label for label in losses if isinstance(losses[label], dict)
                          and label != "prior" and "objective" in losses[label]):
                one = losses[label]
                loss_rows.append([
                    o["family"], f"{o['snr']:g}", label, f"{prior['loss']:.5f}",
                    f"{losses['per_voxel_minimum']:.5f}", f"{one['loss']:.5f}",
                    f"{one['loss'] / prior['loss']:.2f}",
                    f"{one['loss'] / losses['per_voxel_minimum']:.2f}",
                    f"{one['objective']:.5f}", f"{prior['objective']:.5f}",
                    str(one.get("steps", "-")), str(one.get("best_epoch", "-")),
                    {True: "yes", False: "no"}.get(one.get("fell_back"), "-")])
        labels = [label for label in dict.fromkeys(
            label for o in chosen for label in o["rows"]) if label in thresholds]
        for label, snr in itertools.product(labels, sorted({o["snr"] for o in chosen})):
            ours = [o for o in chosen if o["snr"] == snr and label in o["rows"]
                    and not o["rows"][label]["error"]]
            if not ours:
                continue
            scores = [_scores(o["rows"][label], thresholds[label]) for o in ours]
            error = np.mean([s["angular_error"] for s in scores])
            prior = np.mean([_scores(o["rows"]["linear prior alone"],
                                     thresholds["linear prior alone"])["angular_error"]
                             for o in ours])
            worse = "-"
            if label.endswith("+ refinement") and label.startswith("fine-tuned"):
                default = "default (pretrained + refinement)"
                worse = str(sum(
                    s["angular_error"] > _scores(o["rows"][default],
                                                 thresholds[default])["angular_error"] + 0.05
                    for s, o in zip(scores, ours))) + f" of {len(ours)}"
            summary.append([label, f"{snr:g}", f"{error:.1f}",
                            f"{np.mean([s['success_rate'] for s in scores]):.2f}",
                            f"{np.mean([s['fn_rate'] for s in scores]):.2f}",
                            f"{error / prior:.2f}", worse])
        if rows:
            print(f"\n{split}\n\n" + markdown(SUMMARY_HEADER, summary) + "\n\n"
                  + markdown(HEADER, rows) + "\n\n" + markdown(LOSS_HEADER, loss_rows))
    return thresholds


def kept_epoch(scores):
    """The trainer's keep-best rule replayed: the index kept (0: the starting weights)."""
    best, kept = scores[0], 0
    for index, score in enumerate(scores[1:], 1):
        if score < best * (1 - IMPROVEMENT):
            best, kept = score, index
    return kept


STUDY_HEADER = ["family", "SNR", "rule", "kept epoch", "full fit AE crossing (deg)",
                "default fit", "full - default", "alone AE crossing", "pretrained alone",
                "alone / prior alone", "loss / prior", "loss / min."]


def study_report(files):
    """Every selection rule replayed on the --study paths, at the default fit's dev threshold.

    Rules: the held-out error after 0, 10 or 30 refinement steps
    (:data:`STUDY_STEPS`), the evaluation loss (the rule without hold-out),
    the last epoch, and the best full fit in hindsight (an oracle no scan
    gives). Epoch 0 is the starting (pretrained) weights, whose full fit is
    the default fit.
    """
    outcomes = [o for path in files for o in json.loads(Path(path).read_text())["outcomes"]]
    dev = [o for o in outcomes if o["split"] == "dev"]
    thresholds = choose_thresholds(dev)
    full_at = list(THRESHOLDS).index(thresholds["default (pretrained + refinement)"])
    alone_at = list(THRESHOLDS).index(thresholds["pretrained alone"])
    prior_at = list(THRESHOLDS).index(thresholds["linear prior alone"])
    rows, worse, pivot = [], {}, []
    for o in sorted(outcomes, key=lambda o: (o["family"], -o["snr"])):
        for label, losses in o["losses"].items():
            if not isinstance(losses, dict) or "study" not in losses:
                continue
            study = losses["study"]
            full = [r["full_sweep"][full_at]["crossing"]["angular_error"] for r in study]
            alone = [r["alone_sweep"][alone_at]["crossing"]["angular_error"] for r in study]
            rules = {f"held-out, {steps} steps": [r["heldout"][str(steps)] for r in study]
                     for steps in STUDY_STEPS}
            rules["evaluation loss"] = [losses["eval_start"]] + losses["eval_history"]
            kept = {rule: kept_epoch(scores) for rule, scores in rules.items()}
            kept["last epoch"] = len(study) - 1
            kept["oracle (best full fit)"] = int(np.argmin(full))
            prior = o["losses"]["prior"]["loss"]
            prior_error = o["rows"]["linear prior alone"]["sweep"][prior_at]["crossing"][
                "angular_error"]
            pivot.append([o["family"], f"{o['snr']:g}", label.removeprefix("fine-tuned "),
                          f"{full[0]:.2f}"] + [f"{full[index] - full[0]:+.2f} ({index})"
                                               for index in kept.values()])
            for rule, index in kept.items():
                difference = full[index] - full[0]
                worse.setdefault(rule, []).append(difference)
                rows.append([o["family"], f"{o['snr']:g}", rule, str(index),
                             f"{full[index]:.2f}", f"{full[0]:.2f}", f"{difference:+.2f}",
                             f"{alone[index]:.1f}", f"{alone[0]:.1f}",
                             f"{alone[index] / prior_error:.2f}",
                             f"{study[index]['loss'] / prior:.2f}",
                             f"{study[index]['loss'] / o['losses']['per_voxel_minimum']:.2f}"])
    print(markdown(STUDY_HEADER, rows))
    print("\n" + markdown(["family", "SNR", "run", "default fit AE crossing (deg)"]
                          + [f"{rule}: full - default (epoch)" for rule in worse], pivot))
    print("\n" + markdown(["rule", "phantoms", "worse by > 0.05 deg", "mean full - default",
                           "worst", "best"],
                          [[rule, str(len(d)), str(sum(x > 0.05 for x in d)),
                            f"{np.mean(d):+.2f}", f"{max(d):+.2f}", f"{min(d):+.2f}"]
                           for rule, d in worse.items()]))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=tuple(SPLITS), default="dev")
    parser.add_argument("--families", nargs="+", choices=FAMILIES,
                        default=sorted(FAMILIES))
    parser.add_argument("--snrs", nargs="+", type=float, default=list(SNRS))
    parser.add_argument("--side", type=int, default=12, help="phantom edge (voxels)")
    parser.add_argument("--sh-order", type=int, default=None,
                        help="SH order (default: the package's for the scan)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune", nargs="*", default=list(FINETUNE_SETTINGS),
                        metavar="LR:BATCH:EPOCHS", help="fine-tuning settings to fit")
    parser.add_argument("--study", action="store_true",
                        help="with hold-out settings, record every epoch's held-out errors "
                             "and fits (to choose the selection rule on dev)")
    parser.add_argument("--baselines", nargs="*", choices=tuple(BASELINES),
                        default=["DIPY CSD"])
    parser.add_argument("--baselines-only", action="store_true",
                        help="fit only the baselines (a slow one in a process of its own)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--train-windows", type=int, default=TRAIN_WINDOWS)
    parser.add_argument("--trained", nargs="*", choices=tuple(TRAINED_ROWS), default=[],
                        help="per-scan networks trained from scratch to fit")
    parser.add_argument("--out", type=Path, default=Path("out/network_test"))
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="only tabulate these runs' results")
    parser.add_argument("--study-report", nargs="+", metavar="JSON",
                        help="only replay the selection rules on these --study runs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    if args.study_report:
        return study_report(args.study_report)

    def log(message):
        print(message, flush=True)

    return run(args, log)


if __name__ == "__main__":
    main()
