"""The refinement with an active set (``active_set``) against the full solve, on one fit's inputs.

The default fit's refinement inputs are prepared once (``bench_preconditioner``'s
``refinement_inputs``) on the 40^3 dev phantom of ``bench_stages.py`` or, with
``--brain``, the clinical-size scan of ``bench_memory.py``; then
:func:`refine_coefficients` runs with the model's options and each ``active_set``
threshold (0: every voxel every step, main's solver), in one process, the order
alternating between repeats (A, B, B, A ...). Printed per threshold: evaluations,
equivalent full evaluations (each evaluation weighted by the share of voxels it
evaluated), steps, the objective per voxel at the stop, the distance of each voxel's
refined coefficients to the full solve's (relative to that voxel's norm: mean and
max), and the process's CPU seconds with their ratio to the full solve's. The row
``round-off`` is the full solve from a start perturbed by 1e-7 relative (float32's
rounding): how far round-off alone moves the result.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_active_set --size 40 --thresholds 0 1e-3 3e-3
    OMP_NUM_THREADS=1 python -m benchmarks.bench_active_set --brain --thresholds 0 3e-3
"""

import argparse
import time

import numpy as np
import torch

from esdmri.reconst.refine import refine_coefficients

from .bench_preconditioner import add_scan_arguments, chosen_scan, refinement_inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scan_arguments(parser)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 1e-3, 3e-3])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--roundoff", action="store_true",
                        help="also the full solve from a start perturbed by 1e-7 relative")
    args = parser.parse_args()
    name, phantom = chosen_scan(args)
    inputs, options, n_masked = refinement_inputs(phantom)
    del phantom
    options["normalize"] = False
    mask = inputs[2]
    print(f"{name}: {n_masked} masked voxels, torch threads {torch.get_num_threads()}",
          flush=True)
    # Numba's kernels loaded and the caches warm before the first timed run.
    refine_coefficients(*inputs, **dict(options, steps=3))
    runs = [(threshold, inputs) for threshold in dict.fromkeys([0.0] + args.thresholds)]
    if args.roundoff:
        start = inputs[0] * (1 + 1e-7 * np.random.default_rng(0).standard_normal(
            inputs[0].shape)).astype(np.float32)
        runs.append(("round-off", (start,) + inputs[1:]))
    results, seconds = {}, {}
    for repeat in range(args.repeats):
        for label, arguments in (runs if repeat % 2 == 0 else runs[::-1]):
            clock = time.process_time()
            refined, history = refine_coefficients(
                *arguments, **dict(options, active_set=0.0 if label == "round-off" else label))
            seconds.setdefault(label, []).append(time.process_time() - clock)
            results[label] = refined[mask], history
            print(f"{label}: {history.evaluations} evaluations, {history.full_evaluations:.1f} "
                  f"full, {history.steps} steps, objective {history[-1]:.10g}, "
                  f"{seconds[label][-1]:.1f} CPU s; active {history.active_sizes}", flush=True)
    reference, _ = results[0.0]
    scale = np.maximum(np.linalg.norm(reference, axis=1), 1e-12)
    base = np.mean(seconds[0.0])
    print("\n| active_set | evaluations | equivalent full evaluations | steps | objective per "
          "voxel | distance to the full solve (mean / max relative) | CPU s | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (refined, history) in results.items():
        distance = np.linalg.norm(refined - reference, axis=1) / scale
        print(f"| {label:g} | " if label != "round-off" else "| round-off | ", end="")
        print(f"{history.evaluations} | {history.full_evaluations:.1f} | {history.steps} | "
              f"{history[-1]:.10g} | {distance.mean():.2e} / {distance.max():.2e} | "
              f"{np.mean(seconds[label]):.1f} | {np.mean(seconds[label]) / base:.2f} |")


if __name__ == "__main__":
    main()
