"""Peaks at the sphere's vertices against sub-vertex refined peaks, from the same fits.

Every row of the dev set (:mod:`benchmarks.devset`) fits each phantom once and
scores its peaks twice at the row's relative peak threshold: at the vertices
DIPY's ``peak_directions`` returns, and moved by
:func:`esdmri.peaks.subvertex_directions` (the default of
:func:`esdmri.peaks.peaks_from_sh` and of the devset's scoring). Methods that
give their fODF on their own sphere (RUMBA-SD) are refined on that sphere from
their own samples, by the same rule. Responses as in the devset: estimated from
each phantom by :func:`esdmri.response.estimate_response`.

Usage::

    python -m benchmarks.peak_refinement --split dev --out out/peaks_dev.json
    python -m benchmarks.peak_refinement --split test --families dispersed \\
        --rows "DIPY MSMT-CSD" --out out/peaks_msmt.json
    python -m benchmarks.peak_refinement --report out/peaks_dev.json out/peaks_msmt.json
"""

import argparse
import json
import time
import warnings
from pathlib import Path

from esdmri.atomic import staged_output

from .devset import (ROWS, add_phantom_arguments, at_threshold, make_family,
                     phantom_families, scan_with_response, scored_sweep)
from .heldout import markdown
from .methods import METHODS, NotApplicable

# Each row's relative peak threshold, as the devset's dev rule chose it
# (docs/benchmarks.md, "Dev and test tables, every method").
DEV_THRESHOLDS = {
    "esdmri default (pretrained + refinement)": 0.20,
    "esdmri network-free (pretrained=False)": 0.20,
    "esdmri network-free, refine_tv=0": 0.25,
    "esdmri linear prior alone": 0.75,
    "esdmri pretrained alone": 0.30,
    "DIPY CSD": 0.55,
    "DIPY MSMT-CSD": 0.20,
    "DIPY RUMBA-SD + TV (own ODF peaks)": 0.20,
    "MRtrix3 dhollander + msmt_csd": 0.30,
}
METRICS = ("angular_error", "success_rate", "fn_rate", "fp_rate")


def scores_at(sweep, threshold):
    """The crossing and all-voxel scores of a :func:`~benchmarks.devset.scored_sweep`
    at ``threshold``."""
    entry = at_threshold(sweep, threshold)
    return {part: {metric: entry[part][metric] for metric in METRICS}
            for part in ("crossing", "all")}


def run(args):
    records = []
    for family in phantom_families(args):
        for snr in args.snrs:
            phantom = make_family(family, args.side, snr, args.split)
            scan = scan_with_response(family, phantom, "estimated")
            mask = phantom.mask & (phantom.n_fibres > 0)
            for label in args.rows:
                method = METHODS[ROWS[label]]
                if not method.is_available():
                    print(f"{family} SNR {snr} {label}: skipped, needs "
                          f"{', '.join(method.missing())}", flush=True)
                    continue
                start = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        result = method.fit(scan, mask)
                except NotApplicable as reason:
                    print(f"{family} SNR {snr} {label}: not applicable ({reason})", flush=True)
                    continue
                seconds = time.perf_counter() - start
                threshold = DEV_THRESHOLDS[label]
                record = {"split": args.split, "family": family, "snr": snr, "row": label,
                          "threshold": threshold, "seconds": seconds}
                for subvertex in (False, True):
                    sweep = scored_sweep(result, phantom.fibre_dirs, mask, subvertex=subvertex)
                    record["subvertex" if subvertex else "vertex"] = scores_at(sweep, threshold)
                records.append(record)
                print(f"{family} SNR {snr} {label}: {seconds:.1f} s, crossing AE "
                      f"{record['vertex']['crossing']['angular_error']:.2f} -> "
                      f"{record['subvertex']['crossing']['angular_error']:.2f}", flush=True)
                if args.out:
                    with staged_output(args.out) as staged:
                        with open(staged, "w") as handle:
                            json.dump(records, handle, indent=1)
    return records


HEADER = ["split", "family", "SNR", "method", "threshold",
          "crossing AE (deg): vertex -> sub-vertex", "crossing success", "crossing FN",
          "all-voxel AE (deg)", "all-voxel success", "all-voxel FP"]


def report_rows(records):
    def pair(record, part, metric, digits):
        before, after = (record[kind][part][metric] for kind in ("vertex", "subvertex"))
        return f"{before:.{digits}f} -> {after:.{digits}f}"

    order = {label: index for index, label in enumerate(ROWS)}
    rows = []
    for record in sorted(records, key=lambda r: (r["split"], r["family"], -r["snr"],
                                                 order.get(r["row"], 99))):
        rows.append([record["split"], record["family"], f"{record['snr']:g}", record["row"],
                     f"{record['threshold']:.2f}", pair(record, "crossing", "angular_error", 2),
                     pair(record, "crossing", "success_rate", 3),
                     pair(record, "crossing", "fn_rate", 3),
                     pair(record, "all", "angular_error", 2),
                     pair(record, "all", "success_rate", 3),
                     pair(record, "all", "fp_rate", 3)])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_phantom_arguments(parser)
    parser.add_argument("--rows", nargs="+", choices=list(DEV_THRESHOLDS),
                        default=["esdmri default (pretrained + refinement)",
                                 "esdmri network-free (pretrained=False)", "DIPY CSD"])
    parser.add_argument("--side", type=int, default=14, help="phantom edge (voxels)")
    parser.add_argument("--out", help="results JSON (written after every fit)")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="only tabulate these runs' results")
    args = parser.parse_args(argv)
    if args.report:
        records = [record for path in args.report
                   for record in json.loads(Path(path).read_text())]
    else:
        args.snrs = [int(snr) if float(snr).is_integer() else snr for snr in args.snrs]
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        records = run(args)
    print(markdown(HEADER, report_rows(records)))


if __name__ == "__main__":
    main()
