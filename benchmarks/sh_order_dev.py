"""Dev-phantom choice of the models' SH order, and what training adds at it (issue 15).

Dev phantoms only: ``make_heldout_phantom`` at 20^3 with the dev geometry of
``benchmarks/heldout.py`` (seed 101) at SNR 20 and 10, responses estimated from
the data, peaks from ``esdmri.peaks.peaks_from_sh`` at the relative threshold
with the highest success rate averaged over both SNRs (the held-out
benchmark's rule). Two groups of rows:

- ``order``: the fit without training (``epochs=0``: the linear prior refined
  with the spatially coupled refinement) at SH orders 8 to 18 (nside 8 where
  nside 4's 96 hemisphere vertices hold too few samples);
- ``training``: RT-ESD at SH order 12 trained (``epochs=30``) with the default window budget
  and without it, each as the network alone and refined, against the
  voxel-wise fit, the linear prior alone and ``epochs=0``.

The table is printed in markdown; results go to ``--out`` after every fit::

    python -m benchmarks.sh_order_dev --groups order training
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np


from esdmri import RTESDModel
from esdmri.metrics import threshold_sweep
from esdmri.reconst.config import option_defaults

from . import heldout
from .methods import TRAINED

NO_CAP = dict(train_windows=1_000_000)
# name -> (options of the refined fit, name of the network-alone row or None).
# A row with a network-alone partner trains once: the partner is the same
# network with refine_steps=0.
GROUPS = {
    "order": {
        "epochs=0, SH 8 (nside 4)": (dict(epochs=0, sh_order_max=8), None),
        "epochs=0, SH 10 (nside 4)": (dict(epochs=0, sh_order_max=10), None),
        "epochs=0, SH 12 (nside 4)": (dict(epochs=0, sh_order_max=12), None),
        "epochs=0, SH 12 (nside 8)": (dict(epochs=0, sh_order_max=12, nside=8), None),
        "epochs=0, SH 16 (nside 8)": (dict(epochs=0, sh_order_max=16, nside=8), None),
        "epochs=0, SH 18 (nside 8)": (dict(epochs=0, sh_order_max=18, nside=8), None),
    },
    "training": {
        "SH 12, trained (epochs=30, 100-window budget)": (
            dict(sh_order_max=12, **TRAINED), "SH 12, trained network alone (100-window budget)"),
        "SH 12, trained, all epochs": (dict(sh_order_max=12, **TRAINED, **NO_CAP),
                                       "SH 12, trained network alone, all epochs"),
        "SH 12, voxel-wise fit (epochs=0, refine_tv=0)": (
            dict(sh_order_max=12, epochs=0, refine_tv=0.0), None),
        "SH 12, linear prior alone (epochs=0, refine_steps=0)": (
            dict(sh_order_max=12, epochs=0, refine_steps=0), None),
        "SH 12, epochs=0": (dict(sh_order_max=12, epochs=0), None),
    },
}
DEV_SNRS = (20, 10)
DEV_GEOMETRY = 101
SHAPE = (20, 20, 20)


def fit_rows(scan, options, alone_name):
    """``[(row suffix, shm_coeff, seconds, epochs)]``: the refined fit and its network alone."""
    refine_steps = options.get("refine_steps", option_defaults()["refine_steps"])
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if alone_name is None:
            model = RTESDModel(scan.gtab, scan.response, verbose=False, **options)
            fit = model.fit(scan.data, mask=scan.mask)
            return [(None, fit.shm_coeff_descoteaux07, time.perf_counter() - start,
                     len(model.training_history))]
        model = RTESDModel(scan.gtab, scan.response, verbose=False,
                           **{**options, "refine_steps": 0})
        alone = model.fit(scan.data, mask=scan.mask)
        alone_seconds = time.perf_counter() - start
        refined = model.with_options(refine_steps=refine_steps).fit(scan.data, mask=scan.mask)
    epochs = len(model.training_history)
    return [(alone_name, alone.shm_coeff_descoteaux07, alone_seconds, epochs),
            (None, refined.shm_coeff_descoteaux07, time.perf_counter() - start, epochs)]


def run(groups, out):
    results = {}  # row -> list over SNRs of {"snr", "seconds", "epochs", "sweep"}
    for snr in DEV_SNRS:
        phantom = heldout.build_phantom(SHAPE, DEV_GEOMETRY, snr, "dev")
        scan = heldout.scan_of(phantom)
        mask = heldout.scored_voxels(phantom)
        for group in groups:
            for name, (options, alone_name) in GROUPS[group].items():
                for row, shm_coeff, seconds, epochs in fit_rows(scan, options, alone_name):
                    row = row or name
                    sweep = threshold_sweep(np.where(mask[..., None], shm_coeff, 0),
                                            phantom.fibre_dirs, mask, heldout.THRESHOLDS,
                                            threshold_deg=heldout.MATCH_ANGLE)
                    results.setdefault(row, []).append(
                        {"snr": snr, "seconds": seconds, "epochs": epochs,
                         "sweep": [{"all": heldout.summary(r["all"]),
                                    "crossing": heldout.summary(r["crossing"])}
                                   for r in sweep["results"]]})
                    print(f"SNR {snr} {row}: {seconds:.0f} s, {epochs} epochs", flush=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.with_suffix(".tmp").write_text(json.dumps(results, default=float))
                    out.with_suffix(".tmp").replace(out)
    return results


def table(results):
    header = ["row", "threshold"] + [f"SNR {s}: {k}" for s in DEV_SNRS
                                     for k in ("AE x", "success", "FP", "s")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, runs in results.items():
        success = np.mean([[r["all"]["success_rate"] for r in run["sweep"]] for run in runs],
                          axis=0)
        error = np.mean([[r["all"]["angular_error"] for r in run["sweep"]] for run in runs],
                        axis=0)
        index = int(np.lexsort((error, -success))[0])
        cells = [row, f"{heldout.THRESHOLDS[index]:.2f}"]
        for run in runs:
            chosen = run["sweep"][index]
            cells += [heldout.fmt(chosen["crossing"]["angular_error"]),
                      heldout.fmt(chosen["all"]["success_rate"], 2),
                      heldout.fmt(chosen["all"]["fp_rate"], 2), f"{run['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--out", type=Path, default=Path("out/sh_order_dev.json"))
    parser.add_argument("--from-results", type=Path, metavar="JSON",
                        help="only print the table of a saved run")
    args = parser.parse_args(argv)
    if args.from_results:
        results = json.loads(args.from_results.read_text())
    else:
        results = run(args.groups, args.out)
    print(table(results))


if __name__ == "__main__":
    main()
