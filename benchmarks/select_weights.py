"""Choose pretrained weights by the refined fit of held-aside cohort scans (issue 27).

``esdmri_pretrain`` keeps the weights with the lowest supervised loss on its
held-aside scans, but the default fit refines the corrected prior, and an
earlier reading (docs/benchmarks.md, "A bigger cohort and a longer schedule")
was that a network closer to the truth alone is not a better refinement start;
this script tests it (it did not hold: "Kept weights chosen by the refined fit
of held-aside scans"). It scores weights (e.g. every checkpoint of
``esdmri_pretrain --checkpoints DIR``) by what the default fit makes of them
on cohort scans that no pretraining used: each scan's prior (responses estimated from the scan) ->
the weights' correction -> the models' default refinement
(``RTESDModel.refine``, exactly ``RTESDModel(gtab, pretrained=WEIGHTS).fit``),
then the crossing-voxel angular error and false-negative rate of its peaks
against the scan's true fibres (``benchmarks/devset.py``'s matching, at the
relative peak thresholds ``THRESHOLDS``), and, for the record, the
supervised loss the pretraining chooses by. The network-free fit
(``pretrained=False``) is scored on the same scans.

Usage::

    OMP_NUM_THREADS=1 esdmri_pretrain --num_threads 1 --checkpoints out/ck
    python -m benchmarks.select_weights out/ck/step-*.pt --scans 56 12 --out out/select
    # the table again, from the per-weights files (nothing refitted)
    python -m benchmarks.select_weights --out out/select
    # beside the dev results of some of them (benchmarks.pretrain --dev runs)
    python -m benchmarks.select_weights --out out/select \
        --dev step-00200=out/dev-200/results-dev.json step-02200=...

One JSON file per weights (and one for the network-free fit) in ``--out``;
weights scored already are skipped, so the script can run while the
checkpoints appear.
"""

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from esdmri.atomic import staged_output
from esdmri.cohort import (FAMILIES, SNRS, build_phantom, cohort_settings, prepare_scan,
                           wm_mask)
from esdmri.metrics import evaluate_peaks
from esdmri.peaks import peaks_threshold_sweep
from esdmri.reconst.fit import DeconvolutionFit
from esdmri.reconst.models import RTESDModel
from esdmri.reconst.pretrained import PriorCorrection, check_architecture, load_correction
from esdmri.reconst.pretraining import as_tensors, evaluate

from .devset import MATCH_ANGLE
from .heldout import markdown

# Relative peak thresholds scored; the selection reads PICK_THRESHOLD, the one
# every refined row of the dev split chose (docs/benchmarks.md).
THRESHOLDS = (0.15, 0.2, 0.25)
PICK_THRESHOLD = 0.2
NETWORK_FREE = "network-free"


def held_settings(after, count, seed=0, families=None, snrs=None):
    """The first ``count`` cohort settings of ``seed`` after the first ``after``
    whose family is in ``families`` and SNR in ``snrs`` (None: any)."""
    chosen, n = [], after + count
    while len(chosen) < count:
        chosen = [s for s in cohort_settings(n, seed)[after:]
                  if (families is None or s["family"] in families)
                  and (snrs is None or s["snr"] in snrs)][:count]
        n *= 2
    return chosen


def held_scans(after, count, side=14, seed=0, families=None, snrs=None):
    """The cohort scans of :func:`held_settings`, each prepared once: (setting,
    phantom, prepared scan, prior, supervised-loss item)."""
    scans = []
    for setting in held_settings(after, count, seed, families, snrs):
        phantom = build_phantom(setting, side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = RTESDModel(phantom.gtab, verbose=False)
            scan = model.prepare(phantom.data, mask=phantom.mask)
            prior = model.prior_coefficients(scan)
        scans.append((setting, phantom, scan, prior, as_tensors(prepare_scan(setting, side))))
    return scans


def crossing_scores(shm_coeff, phantom, thresholds=THRESHOLDS):
    """Crossing-voxel {threshold: [AE (degrees), FN rate]} of a fit's peaks on the
    phantom's WM-fibre voxels (``benchmarks/devset.py``'s matching)."""
    scored = wm_mask(phantom)
    scores = {}
    for threshold, directions, _ in peaks_threshold_sweep(shm_coeff, thresholds, mask=scored):
        crossing = evaluate_peaks(directions, phantom.fibre_dirs, scored,
                                  threshold_deg=MATCH_ANGLE)["crossing"]
        scores[f"{threshold:.2f}"] = [float(crossing["angular_error"]),
                                      float(crossing["fn_rate"])]
    return scores


def score_weights(weights, scans):
    """The default fit's crossing scores and the correction's supervised loss on
    each held-aside scan, for ``weights`` (a file, or ``False``: network-free)."""
    # The untrained correction (zero head) leaves the prior: the prior's loss.
    correction = load_correction(weights) if weights else \
        PriorCorrection(check_architecture("e3so3-stem")).zero_head()
    per_scan = []
    for setting, phantom, scan, prior, item in scans:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = RTESDModel(phantom.gtab, verbose=False,
                               pretrained=str(weights) if weights else False)
            fitted, history = model.refine(model.corrected_prior(prior, scan), scan)
        fit = DeconvolutionFit(model, fitted, scan.mask, response=scan.response,
                               refine_history=history)
        supervised = evaluate(correction, [item])[0]
        per_scan.append({"setting": setting, "crossing": crossing_scores(fit.shm_coeff, phantom),
                         "supervised": supervised, "refine_steps": int(history.steps)})
    return per_scan


def checkpoint_step(weights):
    """The pretraining step and own held-aside loss stored with weights: a
    checkpoint's, or the step and loss a run kept (None where not stored)."""
    metadata = torch.load(weights, map_location="cpu", weights_only=True).get("metadata", {})
    if "held_loss" in metadata:
        return metadata["steps"], metadata["held_loss"]
    history = metadata.get("history") or [(None, None)]
    best = min(history, key=lambda entry: np.inf if entry[1] is None else entry[1])[0]
    return metadata.get("best_step", best), metadata.get("best_loss")


def summarise(per_scan, free, threshold=PICK_THRESHOLD):
    """Mean crossing AE and FN, mean AE over the network-free fit's, and the scans
    at most 0.9x the network-free fit, at ``threshold``."""
    key = f"{threshold:.2f}"
    errors = np.array([s["crossing"][key] for s in per_scan])
    free_errors = np.array([s["crossing"][key] for s in free])
    ratios = errors[:, 0] / free_errors[:, 0]
    return {"ae": float(errors[:, 0].mean()), "fn": float(errors[:, 1].mean()),
            "ratio": float(ratios.mean()), "at_most_0.9": int((ratios <= 0.9).sum()),
            "supervised": float(np.mean([s["supervised"] for s in per_scan]))}


def table(out, halves=True):
    """Print the per-weights scores stored in ``out`` (network-free first, then
    the weights by step) and which weights the refined score picks."""
    records = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))}
    if NETWORK_FREE not in records:
        raise SystemExit(f"no {NETWORK_FREE}.json in {out}: score the weights first")
    free = records.pop(NETWORK_FREE)["scans"]
    n = len(free)
    order = sorted(records, key=lambda label: (records[label]["step"] is None,
                                               records[label]["step"] or 0, label))
    rows, scores = [], {}
    for label in [NETWORK_FREE, *order]:
        record = {"scans": free, "step": None, "held_loss": None} if label == NETWORK_FREE \
            else records[label]
        if len(record["scans"]) != n:
            raise SystemExit(f"{label} was scored on {len(record['scans'])} scans, "
                             f"the network-free fit on {n}")
        s = summarise(record["scans"], free)
        first, second = (summarise(record["scans"][part], free[part])["ae"]
                         for part in (slice(0, n // 2), slice(n // 2, n)))
        scores[label] = s["ae"]
        held = record.get("held_loss")
        rows.append([label, "-" if record["step"] is None else str(record["step"]),
                     "-" if held is None else f"{held:.4f}", f"{s['supervised']:.4f}",
                     f"{s['ae']:.2f} / {s['fn']:.3f}", f"{first:.2f}", f"{second:.2f}",
                     f"{s['ratio']:.3f}", f"{s['at_most_0.9']} of {n}",
                     *(f"{summarise(record['scans'], free, t)['ae']:.2f}"
                       for t in THRESHOLDS if t != PICK_THRESHOLD)])
    print(markdown(["weights", "step", "own held-aside supervised loss",
                    f"supervised loss, {n} scans", f"refined crossing AE / FN ({n} scans, "
                    f"threshold {PICK_THRESHOLD:g})", "AE, first half", "AE, second half",
                    "AE over network-free", "at most 0.9x",
                    *(f"AE at {t:g}" for t in THRESHOLDS if t != PICK_THRESHOLD)], rows))
    picked = min(order, key=lambda label: scores[label]) if order else None
    print(f"\npicked by the refined crossing AE at {PICK_THRESHOLD:g}: {picked}")
    if len(order) > 2:
        # Is the selection signal real? Rank agreement of the two halves' scores.
        from scipy.stats import spearmanr

        a = [summarise(records[label]["scans"][: n // 2], free[: n // 2])["ae"] for label in order]
        b = [summarise(records[label]["scans"][n // 2:], free[n // 2:])["ae"] for label in order]
        print(f"Spearman rank correlation of the two halves' AE over the weights: "
              f"{spearmanr(a, b)[0]:.2f}")
    return picked


def dev_refined_error(path):
    """Mean crossing AE of the default (refined) row of a ``benchmarks.pretrain --dev``
    run over its phantoms, at the threshold the run chose on them."""
    from .devset import THRESHOLDS as DEV_THRESHOLDS
    from .pretrain import PRETRAINED_ROWS

    results = json.loads(Path(path).read_text())
    errors = [o["sweep"][list(DEV_THRESHOLDS).index(results["thresholds"][o["method"]])]
              ["crossing"]["angular_error"] for o in results["outcomes"]
              if o["row"] == PRETRAINED_ROWS["rtesd"][1] and o["sweep"]]
    return float(np.mean(errors)), len(errors)


def against_dev(out, labelled):
    """Each weights' held-aside scores beside its dev refined mean (``LABEL=JSON``, the
    label a weights file's stem in ``out``), and their rank correlations over the weights:
    does the held-aside score predict the dev result?"""
    from scipy.stats import spearmanr

    records = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))}
    free = records[NETWORK_FREE]["scans"]
    rows, held, supervised, dev = [], [], [], []
    for item in labelled:
        label, path = item.split("=", 1)
        s = summarise(records[label]["scans"], free)
        error, n = dev_refined_error(path)
        held.append(s["ae"])
        supervised.append(s["supervised"])
        dev.append(error)
        rows.append([label, f"{records[label]['held_loss']:.4f}", f"{s['supervised']:.4f}",
                     f"{s['ae']:.2f}", f"{error:.2f} ({n} phantoms)"])
    print(markdown(["weights", "own held-aside supervised loss", "supervised loss, held scans",
                    "refined crossing AE, held scans", "dev refined crossing AE"], rows))
    for name, values in (("refined crossing AE", held), ("supervised loss", supervised)):
        print(f"Spearman rank correlation over {len(dev)} weights, held-aside {name} vs dev "
              f"refined AE: {spearmanr(values, dev)[0]:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="*", type=Path,
                        help="weights files (e.g. esdmri_pretrain --checkpoints files)")
    parser.add_argument("--scans", type=int, nargs=2, default=(56, 12), metavar=("AFTER", "COUNT"),
                        help="score on the first COUNT cohort scans after the first AFTER "
                             "(of --families and --snrs; default "
                             "56 12: every family and acquisition once, past every cohort "
                             "trained or compared on so far)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES,
                        help="only cohort scans of these families (default: all)")
    parser.add_argument("--snrs", nargs="+", type=float, choices=SNRS,
                        help="only cohort scans at these SNRs (default: all)")
    parser.add_argument("--side", type=int, default=14, help="phantom edge (voxels)")
    parser.add_argument("--seed", type=int, default=0, help="the cohort's seed")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder of the per-weights results (LABEL.json)")
    parser.add_argument("--dev", nargs="+", metavar="LABEL=JSON",
                        help="also compare the held-aside scores with these weights' dev "
                             "runs (benchmarks.pretrain --dev results-dev.json)")
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [(NETWORK_FREE, False)] + [(path.stem, path) for path in args.weights]
    todo = [(label, weights) for label, weights in todo
            if not (args.out / f"{label}.json").exists()]
    if todo:
        scans = held_scans(*args.scans, side=args.side, seed=args.seed,
                           families=args.families, snrs=args.snrs)
        for label, weights in todo:
            step, held_loss = checkpoint_step(weights) if weights else (None, None)
            record = {"weights": str(weights) if weights else None, "step": step,
                      "held_loss": held_loss, "scans_after": args.scans[0],
                      "families": args.families, "snrs": args.snrs,
                      "scans": score_weights(weights, scans)}
            with staged_output(args.out / f"{label}.json") as temporary:
                temporary.write_text(json.dumps(record, indent=1))
            print(f"scored {label}", flush=True)
    table(args.out)
    if args.dev:
        print()
        against_dev(args.out, args.dev)


if __name__ == "__main__":
    main()
