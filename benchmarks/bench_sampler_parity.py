"""The sampler's parity blocks against the one stacked product: an interleaved A/B.

The default fit's refinement inputs are prepared once (``bench_preconditioner``'s
``refinement_inputs``) on the 40^3 dev phantom or, with ``--brain``, the clinical
scan; then, alternating in one process, the refinement's per-voxel loss
(:class:`esdmri.reconst.refine.VoxelLoss`) with its parity blocks
(:func:`esdmri.reconst.refine.sampler_parity`) and without (the function patched to
find none: the single stacked product) is evaluated on the start's blocks, and
:func:`refine_coefficients` is run to its stop both ways. Printed: CPU microseconds
per voxel and evaluation of the loss, the refinement's CPU seconds per evaluation,
evaluations and objective at the stop, and the largest coefficient difference. CPU
time of one process: absolute times still need an idle machine.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_sampler_parity --size 40 --repeats 2
"""

import argparse
import time
from unittest import mock

import numpy as np
import torch

import esdmri.reconst.refine as refine

from .bench_preconditioner import add_scan_arguments, chosen_scan, refinement_inputs


def _variant(name):
    """Context in which VoxelLoss is built with (``blocks``) or without parity blocks."""
    if name == "blocks":
        return mock.patch.object(refine, "sampler_parity", refine.sampler_parity)
    return mock.patch.object(refine, "sampler_parity", return_value=None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scan_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="A/B pairs (order alternates)")
    parser.add_argument("--loss-passes", type=int, default=5)
    parser.add_argument("--refine-repeats", type=int, default=None,
                        help="of the repeats, how many also run the refinement (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    name, phantom = chosen_scan(args)
    inputs, options, n_masked = refinement_inputs(phantom)
    del phantom
    start, signal, mask, matrix, sampler, n_wm, _, weights = inputs
    coefficients = torch.as_tensor(start[mask], dtype=sampler.dtype)
    measured = torch.as_tensor(signal[mask], dtype=sampler.dtype)
    block = refine._CPU_BLOCK
    rows = [slice(i, i + block) for i in range(0, n_masked, block)]
    losses, outputs = {}, {}
    for variant in ("single", "blocks"):
        with _variant(variant):
            loss = refine.VoxelLoss(matrix, sampler, n_wm, weights)
        losses[variant] = (loss, loss.project(measured))
        outputs[variant] = loss(coefficients, *losses[variant][1], return_loss=True)
    (single, single_loss), (blocks, blocks_loss) = outputs["single"], outputs["blocks"]
    print(f"{name}: {n_masked} masked voxels; the loss's largest gradient difference "
          f"{float((single - blocks).abs().max()):.2g} (largest gradient "
          f"{float(single.abs().max()):.2g}), largest relative loss difference "
          f"{float(((single_loss - blocks_loss).abs() / single_loss).max()):.2g}\n")
    print("| run | variant | loss: CPU us per voxel and evaluation | refinement: CPU s | "
          "evaluations | CPU ms per evaluation | objective per voxel at the stop |")
    print("|---|---|---|---|---|---|---|")
    gradient = torch.empty_like(coefficients)
    results = {}
    options = dict(options, normalize=False)
    refine_repeats = args.repeats if args.refine_repeats is None else args.refine_repeats
    for repeat in range(args.repeats):
        order = ("single", "blocks") if repeat % 2 == 0 else ("blocks", "single")
        for variant in order:
            loss, (projected, constant) = losses[variant]
            clock = time.process_time()
            for _ in range(args.loss_passes):
                for part in rows:
                    loss(coefficients[part], projected[part], constant[part],
                         out=gradient[part], return_loss=True)
            per_voxel = (time.process_time() - clock) / args.loss_passes / n_masked * 1e6
            if repeat >= refine_repeats:
                print(f"| {repeat + 1} | {variant} | {per_voxel:.3f} | - | - | - | - |")
                continue
            with _variant(variant):
                clock = time.process_time()
                refined, history = refine.refine_coefficients(*inputs, **options)
                seconds = time.process_time() - clock
            results[variant] = refined
            print(f"| {repeat + 1} | {variant} | {per_voxel:.3f} | {seconds:.1f} | "
                  f"{history.evaluations} | {seconds / history.evaluations * 1e3:.0f} | "
                  f"{history[-1]:.10g} |")
    if not results:
        return
    print(f"\nlargest coefficient difference between the variants' refinements: "
          f"{float(np.abs(results['single'] - results['blocks']).max()):.2g}")


if __name__ == "__main__":
    main()
