"""The sampler's parity split against the single stacked product: an interleaved A/B.

The default fit's refinement inputs are prepared once (``bench_preconditioner``'s
``refinement_inputs``) on the 40^3 dev phantom or, with ``--brain``, the
clinical-size scan. Then, alternating in one process (A B B A ...), with the fused
CPU kernels both ways:

- ``single``: the refinement's objective with one stacked product each way
  (:mod:`esdmri.reconst.sampler_parity` turned off);
- ``split``: the same objective on the coefficients in parity-class order
  (:func:`~esdmri.reconst.sampler_parity.parity_order`), its products split by
  class, the butterfly inside the voxel-terms kernel.

Each is timed as the voxel loss alone (:class:`~esdmri.reconst.refine.VoxelLoss`
over the blocks, with the loss) and as the whole objective
(:class:`~esdmri.reconst.refine.CoupledObjective` with the total variation), and,
unless ``--refine-repeats 0``, :func:`refine_coefficients` is run to its stop.
Printed: microseconds per voxel and evaluation (one thread: the process's CPU time;
more: wall time), the refinement's CPU seconds per evaluation, evaluations and
objective at the stop, the loss's and the refinement's largest differences.
Absolute times need an idle machine; the ratios are the numbers on a loaded one.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_sampler_parity --size 40 --repeats 6
    python -m benchmarks.bench_sampler_parity --brain --threads 2 --refine-repeats 0
"""

import argparse
import time
from unittest import mock

import numpy as np
import torch

from esdmri.reconst import refine, sampler_parity
from esdmri.reconst.losses import neighbour_pairs

from .bench_preconditioner import add_scan_arguments, chosen_scan, refinement_inputs

VARIANTS = ("single", "split")


def _variant(name):
    """Context in which objectives and refinements use the split (``split``) or not."""
    return mock.patch.object(sampler_parity, "ENABLED", name == "split")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scan_arguments(parser)
    parser.add_argument("--repeats", type=int, default=4, help="A/B pairs (order alternates)")
    parser.add_argument("--passes", type=int, default=3, help="evaluations per timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refine-repeats", type=int, default=None,
                        help="of the repeats, how many also run the refinement (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    name, phantom = chosen_scan(args)
    inputs, options, n_masked = refinement_inputs(phantom)
    del phantom
    start, signal, mask, matrix, sampler, n_wm, _, weights = inputs
    rows = np.flatnonzero(mask)
    c = torch.as_tensor(start.reshape(-1, start.shape[-1])[rows], dtype=sampler.dtype)
    measured = torch.as_tensor(signal.reshape(-1, signal.shape[-1])[rows], dtype=sampler.dtype)
    first, second = neighbour_pairs(torch.as_tensor(mask))
    pair_weights = torch.full((len(first),), 1e-4, dtype=sampler.dtype)
    order = sampler_parity.parity_order(sampler, c.shape[1])
    objectives, fields = {}, {}
    for variant in VARIANTS:
        permuted = variant == "split"
        arguments = (matrix[order] if permuted else matrix,
                     sampler[:, order[:n_wm]] if permuted else sampler)
        with _variant(variant):
            objectives[variant] = refine.CoupledObjective(
                measured, *arguments, n_wm, weights, first, second, pair_weights, 1e-3,
                refine._CPU_BLOCK * args.threads)
        assert (objectives[variant].voxel_loss.split is None) != permuted
        fields[variant] = c[:, order].contiguous() if permuted else c
    gradients = {v: objectives[v](fields[v]) for v in VARIANTS}
    inverse = torch.argsort(order)
    single_gradient, split_gradient = gradients["single"][1], gradients["split"][1][:, inverse]
    print(f"{name}: {n_masked} masked voxels, {args.threads} thread(s); objective "
          f"{gradients['single'][0]:.10g} (single) {gradients['split'][0]:.10g} (split); "
          f"largest gradient difference {float((single_gradient - split_gradient).abs().max()):.2g}"
          f" (largest gradient {float(single_gradient.abs().max()):.2g})\n")
    print("| run | variant | loss: us per voxel and evaluation | objective: us per voxel and "
          "evaluation | refinement: CPU s | evaluations | CPU ms per evaluation | "
          "objective per voxel at the stop |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    options = dict(options, normalize=False)
    refine_repeats = args.repeats if args.refine_repeats is None else args.refine_repeats
    timings = {v: ([], []) for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in (VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]):
            objective, field = objectives[variant], fields[variant]
            loss, gradient = objective.voxel_loss, torch.empty_like(field)
            started = clock()
            for _ in range(args.passes):
                for part in objective.chunks:
                    loss(field[part], objective.projected[part], objective.constant[part],
                         out=gradient[part], return_loss=True)
            loss_us = (clock() - started) / args.passes / n_masked * 1e6
            started = clock()
            for _ in range(args.passes):
                objective(field, out=gradient)
            objective_us = (clock() - started) / args.passes / n_masked * 1e6
            timings[variant][0].append(loss_us)
            timings[variant][1].append(objective_us)
            row = f"| {repeat + 1} | {variant} | {loss_us:.3f} | {objective_us:.3f} |"
            if repeat >= refine_repeats:
                print(row + " - | - | - | - |", flush=True)
                continue
            with _variant(variant):
                started = time.process_time()
                refined, history = refine.refine_coefficients(*inputs, **options)
                seconds = time.process_time() - started
            results[variant] = refined
            print(row + f" {seconds:.1f} | {history.evaluations} | "
                  f"{seconds / history.evaluations * 1e3:.0f} | {history[-1]:.10g} |", flush=True)
    for index, part in enumerate(("loss", "objective")):
        ratios = [s / f for s, f in zip(timings["split"][index], timings["single"][index])]
        print(f"\n{part}: split / single, median of the pairs {np.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}); medians "
              f"{np.median(timings['single'][index]):.3f} / "
              f"{np.median(timings['split'][index]):.3f} us")
    if len(results) == 2:
        print(f"\nlargest coefficient difference between the refinements: "
              f"{float(np.abs(results['single'] - results['split']).max()):.2g}")


if __name__ == "__main__":
    main()
