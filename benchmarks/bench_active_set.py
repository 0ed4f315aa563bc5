"""The default fit with and without the refinement's active set (``refine_active_set``).

The 40^3 dev phantom of ``bench_stages.py`` or, with ``--brain``, the clinical-size scan
of ``bench_memory.py`` is fitted by the default model (response estimated once, linear
prior, shipped pretrained correction, refinement) for each ``refine_active_set``
threshold (0: every voxel every step, main's solver), in one process, the order
alternating between repeats (A, B, B, A ...), after a warm-up fit that loads numba's
kernels. Printed per threshold: evaluations; equivalent full evaluations (each
evaluation weighted by the share of the voxels it evaluated); steps; the objective per
voxel at the stop; each voxel's distance to the full solve's fODF (relative to its
norm: mean and max; and the whole field's relative distance) and, with
``--reference``, to a long run's (300 steps, no stop rule, every voxel every step: the
minimiser's stand-in); the crossing voxels' angular error and success
(``bench_stages``' scores); the refinement's and the fit's CPU seconds, with the
refinement's ratio to the full solve's.
``--roundoff`` adds the full solve of a signal perturbed by 1e-7 relative (float32's
rounding), every voxel every step: how far round-off alone moves the full solve.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_active_set --size 40 --thresholds 0 1e-3 3e-3
    OMP_NUM_THREADS=1 python -m benchmarks.bench_active_set --brain --thresholds 0 1e-3
"""

import argparse
import time
import warnings

import numpy as np
import torch

from esdmri import RTESDModel
from esdmri.response import estimate_response

from .bench_preconditioner import add_scan_arguments, chosen_scan
from .bench_stages import crossing_scores

# The long run standing in for the minimiser (--reference).
REFERENCE = dict(refine_steps=300, refine_tolerance=0.0, refine_likelihood_tolerance=0.0,
                 refine_active_set=0.0)


def relative_distances(coefficients, reference):
    """Each voxel's distance to ``reference`` over the reference's norm, and the whole
    field's (less swayed by voxels with almost no white matter)."""
    difference = np.linalg.norm(coefficients - reference, axis=1)
    return (difference / np.maximum(np.linalg.norm(reference, axis=1), 1e-12),
            np.linalg.norm(difference) / np.linalg.norm(reference))


def timed_fit(model, data, mask):
    """The fit, and the CPU seconds of the fit and of its refinement."""
    spent = []
    refine = model.refine

    def timed_refine(*arguments):
        clock = time.process_time()
        result = refine(*arguments)
        spent.append(time.process_time() - clock)
        return result

    model.refine = timed_refine
    clock = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = model.fit(data, mask=mask)
    return fit, time.process_time() - clock, sum(spent)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scan_arguments(parser)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 1e-3, 3e-3])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference", action="store_true",
                        help="also a 300-step run with no stop rule, the minimiser's stand-in")
    parser.add_argument("--roundoff", action="store_true",
                        help="also the full solve of a signal perturbed by 1e-7 relative")
    args = parser.parse_args()
    name, phantom = chosen_scan(args)
    mask = phantom.mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        response = estimate_response(phantom.gtab, phantom.data, mask)
    print(f"{name}: {int(mask.sum())} masked voxels, torch threads {torch.get_num_threads()}",
          flush=True)
    timed_fit(RTESDModel(phantom.gtab, response, verbose=False, refine_steps=3), phantom.data,
              mask)
    runs = {f"{t:g}": (dict(refine_active_set=t), phantom.data)
            for t in dict.fromkeys([0.0] + args.thresholds)}
    if args.roundoff:
        noise = np.random.default_rng(0).standard_normal(phantom.data.shape)
        perturbed = (phantom.data * (1 + 1e-7 * noise)).astype(phantom.data.dtype)
        runs["round-off"] = (dict(refine_active_set=0.0), perturbed)
    results, seconds = {}, {}
    for repeat in range(args.repeats):
        for label in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
            options, data = runs[label]
            fit, fit_seconds, refine_seconds = timed_fit(
                RTESDModel(phantom.gtab, response, verbose=False, **options), data, mask)
            seconds.setdefault(label, []).append((refine_seconds, fit_seconds))
            history = fit.refine_history
            results[label] = (fit.shm_coeff_descoteaux07[mask], history,
                              crossing_scores(phantom, fit))
            print(f"{label}: {history.evaluations} evaluations, {history.full_evaluations:.1f} "
                  f"full, {history.steps} steps, objective {history[-1]:.10g}, refinement "
                  f"{refine_seconds:.1f} CPU s; active voxels (evaluations, voxels) "
                  f"{history.active_sizes}", flush=True)
    if args.reference:
        fit, _, _ = timed_fit(RTESDModel(phantom.gtab, response, verbose=False, **REFERENCE),
                              phantom.data, mask)
        results["reference"] = (fit.shm_coeff_descoteaux07[mask], fit.refine_history,
                                crossing_scores(phantom, fit))
    full = results["0"][0]
    base = np.mean([refine for refine, _ in seconds["0"]])
    print("\n| active_set | evaluations | equivalent full evaluations | steps | objective per "
          "voxel | to the full solve (voxels' mean / max relative, field) | to the reference "
          "(voxels' mean, field) | "
          "crossing AE (deg) / success | refinement CPU s (ratio) | fit CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, (coefficients, history, (angular_error, success)) in results.items():
        distance, field_distance = relative_distances(coefficients, full)
        to_reference = "-"
        if "reference" in results:
            voxels, whole = relative_distances(coefficients, results["reference"][0])
            to_reference = f"{voxels.mean():.2e} / {whole:.2e}"
        timing = "-"
        if label in seconds:
            refine, fit_seconds = np.mean(seconds[label], axis=0)
            timing = f"{refine:.1f} ({refine / base:.2f}) | {fit_seconds:.1f}"
        print(f"| {label} | {history.evaluations} | {history.full_evaluations:.1f} | "
              f"{history.steps} | {history[-1]:.10g} | {distance.mean():.2e} / "
              f"{distance.max():.2e} / {field_distance:.2e} | {to_reference} | "
              f"{angular_error:.2f} / {success:.3f} | "
              f"{timing} |" + (" - |" if label not in seconds else ""))


if __name__ == "__main__":
    main()
