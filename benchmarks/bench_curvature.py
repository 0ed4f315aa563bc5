"""The refinement's L-BFGS with one curvature model for the field or one per voxel.

The default fit's refinement inputs are captured once (``bench_preconditioner``'s
``refinement_inputs``: response estimated, linear prior, shipped pretrained
correction) on the 40^3 dev phantom of ``bench_stages.py`` (``--scan dev``) or on a
``make_phantom`` scan of ``bench_memory.py``'s clinical acquisition (``--scan
clinical``, ``--shape``, SNR 30). Then, for each variant (``curvature[:memory]``,
e.g. ``global voxel voxel:10``), in one process:

- the default fit's refinement to its stop (the model's options), repeated with the
  variants' order alternating: evaluations, steps, the objective per voxel at the
  stop and the process's CPU milliseconds per evaluation (one thread; the ratios of
  the interleaved runs are the numbers on a shared machine, not the absolute times);
- once, the same refinement without a stop rule for ``--budget`` steps, the objective
  recorded after every step: the evaluations each variant needs to reach the first
  variant's objective at its stop, and the objective each variant has after as many
  evaluations as the first one made to its stop.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_curvature --scan dev --variants global voxel
    OMP_NUM_THREADS=1 python -m benchmarks.bench_curvature --scan clinical --shape 64 64 40
"""

import argparse
import time

import torch

from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.reconst.refine import refine_coefficients
from esdmri.sims import make_phantom

from .bench_memory import clinical_gtab
from .bench_preconditioner import refinement_inputs
from .bench_stages import DEV_GEOMETRY


def variant_options(text):
    """``curvature[:memory]`` as :func:`refine_coefficients` options."""
    curvature, _, memory = text.partition(":")
    options = {"curvature": curvature}
    if memory:
        options["memory"] = int(memory)
    return options


def evaluations_to_reach(history, target):
    """Evaluations made when the recorded objective first fell to ``target`` (None: never)."""
    for value, evaluations in zip(history, history.evaluations_at):
        if value <= target:
            return evaluations
    return None


def objective_after(history, evaluations):
    """The recorded objective after at most ``evaluations`` evaluations."""
    values = [value for value, made in zip(history, history.evaluations_at)
              if made <= evaluations]
    return values[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", choices=("dev", "clinical"), default="dev")
    parser.add_argument("--size", type=int, default=40, help="side of the dev phantom")
    parser.add_argument("--snr", type=float, default=20.0, help="SNR of the dev phantom")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 40),
                        help="shape of the clinical scan")
    parser.add_argument("--variants", nargs="+", default=["global", "voxel"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget", type=int, default=200,
                        help="steps of the trajectory runs (0: none)")
    args = parser.parse_args()
    if args.scan == "dev":
        name = f"{args.size}^3 dev SNR {args.snr:g}"
        phantom = make_heldout_phantom((args.size,) * 3, snr=args.snr, seed=1,
                                       geometry_seed=DEV_GEOMETRY)
    else:
        name = "x".join(map(str, args.shape)) + " clinical SNR 30"
        phantom = make_phantom(shape=tuple(args.shape), gtab=clinical_gtab(), snr=30)
    inputs, options, n_masked = refinement_inputs(phantom)
    del phantom
    print(f"{name}: {n_masked} masked voxels, SH order {inputs[6]}, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    rows = ["| variant | run | evaluations | steps | objective per voxel | CPU ms per evaluation |",
            "|---|---|---|---|---|---|"]
    stops = {}
    for repeat in range(args.repeats):
        for variant in (args.variants if repeat % 2 == 0 else args.variants[::-1]):
            clock = time.process_time()
            _, history = refine_coefficients(*inputs, **dict(options,
                                                             **variant_options(variant)))
            seconds = time.process_time() - clock
            stops.setdefault(variant, (history.evaluations, history[-1]))
            rows.append(f"| {variant} | {repeat + 1} | {history.evaluations} | {history.steps} | "
                        f"{history[-1]:.10g} | {seconds / history.evaluations * 1e3:.0f} |")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows), flush=True)
    if not args.budget:
        return
    reference_evaluations, target = stops[args.variants[0]]
    rows = [f"| variant | evaluations to {target:.10g} | objective after "
            f"{reference_evaluations} evaluations | objective after {args.budget} steps "
            "(evaluations) |", "|---|---|---|---|"]
    for variant in args.variants:
        _, history = refine_coefficients(*inputs, **dict(
            options, **variant_options(variant), steps=args.budget, tolerance=0.0,
            likelihood_tolerance=0.0, check_every=1))
        reached = evaluations_to_reach(history, target)
        rows.append(f"| {variant} | {reached if reached is not None else 'not reached'} | "
                    f"{objective_after(history, reference_evaluations):.10g} | "
                    f"{history[-1]:.10g} ({history.evaluations}) |")
        print(rows[-1], flush=True)
        trace = ", ".join(f"{made}: {value:.8g}" for value, made
                          in list(zip(history, history.evaluations_at))[::10])
        print(f"  {variant} every 10 steps (evaluations: objective): {trace}", flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
