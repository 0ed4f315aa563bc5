"""Where each stop rule would end the default fit's refinement, read off one long run.

The default fit's refinement inputs are prepared once (``bench_preconditioner``'s
``refinement_inputs``: response estimated, linear prior, shipped pretrained
correction) on the 40^3 dev phantom of ``bench_stages.py`` or, with ``--brain``, the
clinical-size scan of ``bench_memory.py``; then :func:`refine_coefficients` runs
``--steps`` L-BFGS steps with no stop rule, recording the objective every 10 steps
and the evaluations made. A stop rule only ends the run (the path up to its stop is
the same: ``tests/test_refine_stop.py``), so each rule's stop step, evaluations and
distance to the long run's objective (in nats of Gaussian log-likelihood per voxel,
``2 w_i sigma^2 / N``, the unit of ``refine_likelihood_tolerance``) are read off the
one run. Evaluation counts are load-free; the CPU seconds are one thread's.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_stop_rule --size 40
    OMP_NUM_THREADS=1 python -m benchmarks.bench_stop_rule --brain   # 15-20 min loaded
"""

import argparse
import time

import torch

from esdmri.reconst.refine import (_stalled, coupling_scale, neighbour_pairs, noise_variance,
                                   pair_distances, refine_coefficients)

from .bench_preconditioner import add_scan_arguments, chosen_scan, refinement_inputs

CHECK = 10
# (relative tolerance, likelihood tolerance in nats per voxel) of the rules compared.
RULES = ((1e-4, 0.0), (1e-4, 0.01), (1e-4, 0.02), (1e-4, 0.03), (1e-4, 0.05), (1e-3, 0.0))


def nat_per_voxel(signal, mask, weights):
    """The objective's change per voxel for one nat of log-likelihood per voxel."""
    measured = torch.as_tensor(signal[mask], dtype=torch.float32)
    first, second = neighbour_pairs(torch.as_tensor(mask))
    variance = noise_variance(pair_distances(measured, first, second))
    return weights.intensity * coupling_scale(variance, measured.shape[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scan_arguments(parser)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    name, phantom = chosen_scan(args)
    inputs, options, n_masked = refinement_inputs(phantom)
    del phantom
    nat = nat_per_voxel(inputs[1], inputs[2], inputs[7])
    options.update(tolerance=0.0, likelihood_tolerance=0.0, check_every=CHECK)
    clock = time.process_time()
    _, history = refine_coefficients(*inputs, **dict(options, steps=args.steps))
    seconds = time.process_time() - clock
    values, last = list(history), history[-1]
    print(f"{name}: {n_masked} masked voxels, {args.steps} steps, {history.evaluations} "
          f"evaluations, {seconds:.0f} CPU s ({seconds / history.evaluations:.2f} s each, "
          f"torch threads {torch.get_num_threads()}); start / last objective "
          f"{values[0] / last:.2f}; 1 nat per voxel = {nat:.4g}")
    falls = [(values[k - 1] - values[k]) / nat for k in range(1, len(values))]
    print("falls per window of 10 steps (nats per voxel): "
          + ", ".join(f"{fall:.3g}" for fall in falls) + "\n")
    print(f"| stop rule | stop step | evaluations | above the {args.steps} steps' objective "
          "(nats per voxel) |")
    print("|---|---|---|---|")
    for relative, nats in RULES:
        # Checks are at steps 0, 10, ...; the last one may be the step budget's.
        k = next((k for k in range(2, len(values) + 1)
                  if _stalled(values[:k], relative, nats * nat)), len(values))
        print(f"| relative {relative:g}, {nats:g} nats | {min(CHECK * (k - 1), args.steps)} | "
              f"{history.evaluations_at[k - 1]} | {(values[k - 1] - last) / nat:.4f} |")


if __name__ == "__main__":
    main()
