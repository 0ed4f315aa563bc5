"""Where the default fit's refinement spends its time: ATen operations by self time.

The default fit's refinement inputs are prepared once (``bench_preconditioner``'s
``refinement_inputs``: response estimated, linear prior, shipped pretrained
correction) on the 40^3 dev phantom of ``bench_stages.py`` or, with ``--brain``, the
clinical-size scan of ``bench_memory.py``; then :func:`refine_coefficients` runs
``--steps`` L-BFGS steps (no tolerance) under ``torch.profiler``, after one unprofiled
step that warms the allocator. Printed: the CPU seconds of the profiled run per
evaluation and per voxel and evaluation, and the operations that take the most self
time with their share (the profiler's clock is the wall clock, so on a loaded machine
its milliseconds exceed the CPU seconds, and the run's setup, such as gathering the
masked voxels, is included), so each change of the objective or the solver can be
measured where it acts (``docs/benchmarks.md``, "Refinement solver and stage
profile"). CPU time of the process, not wall time: on a shared machine it is the
less disturbed number, but absolute times still need an idle machine.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_refine_profile --size 40 --steps 10
    OMP_NUM_THREADS=1 python -m benchmarks.bench_refine_profile --brain --steps 5
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from esdmri.reconst.refine import refine_coefficients

from .bench_preconditioner import add_scan_arguments, chosen_scan, refinement_inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scan_arguments(parser)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15, help="operations listed")
    args = parser.parse_args()
    name, phantom = chosen_scan(args)
    inputs, options, n_masked = refinement_inputs(phantom)
    del phantom
    options.update(tolerance=0.0, normalize=False)
    refine_coefficients(*inputs, **dict(options, steps=1))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        clock = time.process_time()
        _, history = refine_coefficients(*inputs, **dict(options, steps=args.steps))
        seconds = time.process_time() - clock
    evaluations = history.evaluations
    print(f"{name}: {n_masked} masked voxels, SH order {inputs[6]}, torch threads "
          f"{torch.get_num_threads()}; {args.steps} steps, {evaluations} evaluations, "
          f"{seconds:.1f} CPU s (profiled): {seconds / evaluations * 1e3:.0f} ms per "
          f"evaluation, {seconds / evaluations / n_masked * 1e6:.2f} us per voxel and "
          f"evaluation\n")
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total,
                    reverse=True)
    # The profiler's self_cpu_time is the wall time spent in the operation itself.
    total = sum(event.self_cpu_time_total for event in events)
    print("| operation | calls per evaluation | self ms per evaluation (wall) | share |")
    print("|---|---|---|---|")
    for event in events[:args.rows]:
        print(f"| `{event.key}` | {event.count / evaluations:.1f} | "
              f"{event.self_cpu_time_total / 1e3 / evaluations:.1f} | "
              f"{100 * event.self_cpu_time_total / total:.1f} % |")


if __name__ == "__main__":
    main()
