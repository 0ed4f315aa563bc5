"""The default fit with model options changed, on every phantom of a devset split (issue 26).

What ``docs/benchmarks.md``, "Debiasing the noise floor", tabulates: the fit of the
devset's esdmri rows (``RTESDModel`` with the estimated responses) with some keyword
options overridden (``noise_floor``, ``sparsity``, ``pretrained`` ...), every family at
SNR 10 and 20, scored per relative peak threshold; ``--report`` prints one markdown row
per results file: crossing AE / crossing FN / all-voxel FP per phantom, each file at the
threshold of highest mean all-voxel success (ties: lowest crossing AE), or at a threshold
given after ``@`` (a test file at its dev threshold).

Usage::

    python -m benchmarks.noise_floor_dev --out power.json \\
        --options '{"noise_floor": "power", "sparsity": 1.5e-4}' --rician-response
    python -m benchmarks.noise_floor_dev --report "shipped=base.json" "power=power.json@0.20"
    python -m benchmarks.noise_floor_dev --rule base.json power.json@0.20

``--rule BASE CANDIDATE`` applies the rule that a setting must pass on dev before it may
replace the default (:func:`switch_rule`).
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from esdmri.atomic import staged_output
from esdmri.metrics import evaluate_peaks
from esdmri.response import estimate_response

from .devset import (ALL_SPECS, ANGLE_EDGES, MATCH_ANGLE, add_phantom_arguments,
                     make_family, phantom_families)
from .heldout import markdown
from .methods import MethodResult, peak_sweep

THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
METRICS = ("angular_error", "success_rate", "fn_rate", "fp_rate")


def run(options, response_options, split, families, snrs, side):
    """One record per (family, SNR, threshold) of the default fit with ``options``.

    ``response_options``: keyword options of
    :func:`esdmri.response.estimate_response` (``rician``, ``tissues`` ...).
    """
    from esdmri import RTESDModel

    records = []
    for family in families:
        for snr in snrs:
            phantom = make_family(family, side, snr, split)
            scored = phantom.mask & (phantom.n_fibres > 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                response = estimate_response(phantom.gtab, phantom.data, phantom.mask,
                                             **response_options)
                start = time.perf_counter()
                fit = RTESDModel(phantom.gtab, response, verbose=False,
                                 **options).fit(phantom.data, mask=phantom.mask)
                seconds = time.perf_counter() - start
            coefficients = np.where(scored[..., None], fit.shm_coeff_descoteaux07, 0)
            for threshold, directions in peak_sweep(MethodResult(coefficients), THRESHOLDS,
                                                    scored):
                scores = evaluate_peaks(directions, phantom.fibre_dirs, scored,
                                        threshold_deg=MATCH_ANGLE,
                                        crossing_angle_edges=ANGLE_EDGES)
                records.append({"family": family, "snr": snr, "t": float(threshold),
                                "seconds": seconds,
                                **{f"{part}_{key}": float(scores[part][key])
                                   for part in ("all", "crossing") for key in METRICS}})
            print(f"{family} SNR {snr}: {seconds:.1f} s", flush=True)
    return records


def chosen_threshold(records):
    """The threshold of highest mean all-voxel success, ties lowest crossing AE."""
    def key(threshold):
        rows = [r for r in records if r["t"] == threshold]
        return (-np.mean([r["all_success_rate"] for r in rows]),
                np.mean([r["crossing_angular_error"] for r in rows]))
    return min(sorted({r["t"] for r in records}), key=key)


# What a candidate may lose on any one dev phantom against the default, in crossing
# AE (degrees), crossing FN and all-voxel FP, for it to replace the default.
RULE_TOLERANCES = {"crossing_angular_error": 0.2, "crossing_fn_rate": 0.01,
                   "all_fp_rate": 0.02}


def switch_rule(base, candidate, base_threshold=None, candidate_threshold=None):
    """Whether ``candidate`` may replace ``base``: no dev phantom worse, and a lower mean.

    Each results list is scored at its own threshold (:func:`chosen_threshold`
    unless given). The candidate passes when on every phantom of ``base`` it is
    worse by at most :data:`RULE_TOLERANCES` and its mean crossing AE is lower.

    Returns
    -------
    passed : bool
    rows : list of tuple
        ``(family, snr, differences, failed)`` per phantom, ``differences``
        keyed like :data:`RULE_TOLERANCES` (candidate minus base).
    means : tuple of float
        Mean crossing AE of base and candidate.
    """
    base_threshold = chosen_threshold(base) if base_threshold is None else base_threshold
    candidate_threshold = (chosen_threshold(candidate) if candidate_threshold is None
                           else candidate_threshold)
    at_base = [r for r in base if r["t"] == base_threshold]
    at_candidate = {(r["family"], r["snr"]): r for r in candidate if r["t"] == candidate_threshold}
    rows = []
    for record in at_base:
        key = (record["family"], record["snr"])
        if key not in at_candidate:
            raise ValueError(f"candidate has no result for {key[0]} at SNR {key[1]} "
                             f"(threshold {candidate_threshold})")
        differences = {name: at_candidate[key][name] - record[name] for name in RULE_TOLERANCES}
        failed = any(differences[name] > limit for name, limit in RULE_TOLERANCES.items())
        rows.append((*key, differences, failed))
    means = (float(np.mean([r["crossing_angular_error"] for r in at_base])),
             float(np.mean([at_candidate[(r["family"], r["snr"])]["crossing_angular_error"]
                            for r in at_base])))
    passed = not any(row[-1] for row in rows) and means[1] < means[0]
    return passed, rows, means


def report_rows(entries):
    """Markdown rows of ``label=path[@threshold]`` entries, and the header."""
    phantoms = sorted({(r["family"], r["snr"]) for _, _, records in entries for r in records},
                      key=lambda p: (list(ALL_SPECS).index(p[0]), p[1]))
    header = (["setting", "threshold"] + [f"{family} {snr}" for family, snr in phantoms]
              + ["mean crossing AE", "mean crossing FN", "mean all-voxel FP",
                 "mean all-voxel success"])
    rows = []
    for label, threshold, records in entries:
        threshold = chosen_threshold(records) if threshold is None else threshold
        chosen = [r for r in records if r["t"] == threshold]
        cells = []
        for family, snr in phantoms:
            match = [r for r in chosen if r["family"] == family and r["snr"] == snr]
            cells.append("-" if not match else
                         "{crossing_angular_error:.1f} / {crossing_fn_rate:.2f} / "
                         "{all_fp_rate:.2f}".format(**match[0]))
        means = [np.mean([r[key] for r in chosen]) for key in (
            "crossing_angular_error", "crossing_fn_rate", "all_fp_rate", "all_success_rate")]
        rows.append([label, f"{threshold:.2f}", *cells, f"{means[0]:.2f}", f"{means[1]:.3f}",
                     f"{means[2]:.3f}", f"{means[3]:.3f}"])
    return header, rows


def parse_entry(entry):
    """``label=path[@threshold]`` -> (label, threshold or None, records)."""
    label, path = entry.rsplit("=", 1)
    threshold = None
    if "@" in path:
        path, threshold = path.rsplit("@", 1)
        threshold = float(threshold)
    with open(path) as handle:
        return label, threshold, json.load(handle)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results JSON to write")
    parser.add_argument("--options", default="{}",
                        help="model keyword options as JSON, e.g. '{\"noise_floor\": \"power\"}'")
    parser.add_argument("--rician-response", action="store_true",
                        help="estimate the responses with estimate_response(rician=True)")
    parser.add_argument("--response-options", default="{}",
                        help="estimate_response keyword options as JSON, e.g. "
                             "'{\"tissues\": [\"wm\", \"gm\"]}'")
    add_phantom_arguments(parser)
    parser.add_argument("--side", type=int, default=14)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--report", nargs="+", metavar="LABEL=PATH[@THRESHOLD]",
                        help="only print the table of earlier results")
    parser.add_argument("--rule", nargs=2, metavar=("BASE[@THRESHOLD]", "CANDIDATE[@THRESHOLD]"),
                        help="only apply the dev switch rule to two earlier results")
    args = parser.parse_args(argv)
    if args.rule:
        (_, base_threshold, base), (_, threshold, candidate) = (
            parse_entry(f"{label}={entry}") for label, entry in zip(("base", "candidate"),
                                                                    args.rule))
        passed, rows, means = switch_rule(base, candidate, base_threshold, threshold)
        for family, snr, differences, failed in rows:
            print(f"{family} SNR {snr}: crossing AE {differences['crossing_angular_error']:+.2f}, "
                  f"crossing FN {differences['crossing_fn_rate']:+.3f}, all-voxel FP "
                  f"{differences['all_fp_rate']:+.3f}{'  FAIL' if failed else ''}")
        print(f"mean crossing AE {means[0]:.2f} -> {means[1]:.2f}: "
              f"{'PASS' if passed else 'FAIL'}")
        return
    if args.report:
        header, rows = report_rows([parse_entry(entry) for entry in args.report])
        print(markdown(header, rows))
        return
    if not args.out:
        parser.error("--out is required unless --report is given")
    torch.set_num_threads(args.num_threads)
    snrs = [int(snr) if float(snr).is_integer() else snr for snr in args.snrs]
    response_options = json.loads(args.response_options)
    if args.rician_response:
        response_options["rician"] = True
    records = run(json.loads(args.options), response_options, args.split,
                  phantom_families(args), snrs, args.side)
    with staged_output(args.out) as staged:
        Path(staged).write_text(json.dumps(records))


if __name__ == "__main__":
    main()
