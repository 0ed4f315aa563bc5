"""What per-scan training costs on a CPU: steps, seconds per step and the total, 20^3 and 40^3.

By default it times fine-tuning the shipped correction (``epochs=N``, the
package's default SH order, batches of ``--batch-size`` windows); ``--scratch``
times the per-scan network trained from scratch (``pretrained=False``, SH
order 8 on nside 4) as measured before. A single-scan fit with ``epochs=N``
trains on windows centred on masked voxels
(every masked voxel inside some window once per epoch,
:func:`esdmri.reconst.tiling.training_windows`) under the cap of
``train_windows`` optimiser steps, and scores the starting weights and every
epoch in evaluation mode. This script builds the dev phantom of
``benchmarks/heldout.py`` at each size, counts the windows of one epoch over
its mask (the brain mask a user gives), and times the trainer twice with one
epoch cut at 5 and at 20 steps: the difference over 15 steps is the time of
one step, the rest of the shorter run the set-up and the two evaluation
passes. The projection of a fit: ``steps = min(epochs * ceil(windows /
batch), train_windows)`` at that rate, plus one evaluation pass per epoch and
the start.

Usage::

    python -m benchmarks.training_cost --sizes 20 40 --threads 2 --epochs 10 --batch-size 4
    python -m benchmarks.training_cost --sizes 20 40 --threads 2 --scratch

Times depend on the machine's load: the script prints the load average.
"""

import argparse
import os
import time
import warnings

import numpy as np
import torch

from esdmri import RTESDModel
from esdmri.reconst.config import option_defaults
from esdmri.reconst.tiling import training_windows

from .heldout import build_phantom, markdown, scan_of

SHORT, LONG = 5, 20


def timed_training(scan, steps, options):
    model = RTESDModel(scan.gtab, scan.response, epochs=1, train_windows=steps, **options)
    prepared = model.prepare(scan.data, mask=scan.mask)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cap's warning: cut on purpose
        model.train(prepared, max_steps=steps)
    assert model.training_summary["steps"] == steps
    return time.perf_counter() - start


def measure(size, epochs, options):
    phantom = build_phantom((size,) * 3, 101, 20, "dev")
    scan = scan_of(phantom)
    block = option_defaults()["block_size"]
    windows = int(np.ceil(len(training_windows(scan.mask, block, np.random.default_rng(0)))
                          / options.get("batch_size", 1)))
    short, long = (timed_training(scan, steps, options) for steps in (SHORT, LONG))
    per_step = (long - short) / (LONG - SHORT)
    if per_step <= 0:
        # The 30 extra steps were lost in the load's noise: nothing is measured.
        per_step = float("nan")
    evaluation = max(short - SHORT * per_step, 0.0) / 2 if per_step == per_step else float("nan")
    cap = option_defaults()["train_windows"]
    steps = min(epochs * windows, cap)
    epochs_run = min(epochs, int(np.ceil(steps / windows)))
    total = steps * per_step + (epochs_run + 1) * evaluation
    return {"size": size, "voxels": int(scan.mask.sum()), "windows": windows,
            "steps": steps, "epochs_run": epochs_run, "per_step": per_step,
            "evaluation": evaluation, "total": total}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[20, 40])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--scratch", action="store_true",
                        help="the per-scan network from scratch (order 8, nside 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = dict(batch_size=args.batch_size, verbose=False)
    if args.scratch:
        options.update(pretrained=False, sh_order_max=8, nside=4)
    rows = []
    for size in args.sizes:
        load = os.getloadavg()[0]
        r = measure(size, args.epochs, options)
        rows.append([f"{size}^3", str(r["voxels"]), str(r["windows"]),
                     f"{r['steps']} ({r['epochs_run']} epochs)", f"{r['per_step']:.2f}",
                     f"{r['evaluation']:.1f}", f"{r['total'] / 60:.1f}", f"{load:.1f}"])
        print(rows[-1], flush=True)
    print(markdown(["volume", "mask voxels", "steps / epoch", "steps",
                    "s / step", "s / evaluation pass", "projected total (min)",
                    "load average"], rows))


if __name__ == "__main__":
    main()
