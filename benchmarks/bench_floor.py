"""The refinement's evaluation against the machine's floor, part by part (issue 28).

How far the default fit's refinement is from what this CPU could do, and why. The
default fit's refinement inputs of the clinical-size scan (``bench_memory.py``'s
96 x 96 x 60, 100 volumes, SNR 30; ``--shape`` for another ``make_phantom`` scan of
that acquisition) are prepared once (``bench_preconditioner``'s ``refinement_inputs``),
then each part of one evaluation and of one solver step is timed on the whole masked
field with the refinement's own objects, at 1 and 2 torch threads, the thread counts
alternating between repeats:

- machine: a large single-precision matrix product (``--square``, its FLOP rate) and
  two streaming passes over coefficient fields of the scan's size (``torch.add`` into a
  third field: 3 fields moved; ``torch.vdot``: 2 read), the memory bandwidth;
- products: the evaluation's two matrix products, block by block as
  :class:`~esdmri.reconst.refine.CoupledObjective` makes them (blocks of 512 voxels
  per thread times ``C`` coefficients against the ``C x (k + V)`` stacked operator and
  back), with their FLOPs;
- voxel terms: one :class:`~esdmri.reconst.refine.VoxelLoss` pass over the blocks
  with the loss (as the L-BFGS asks for it); its elementwise passes are this minus the
  products;
- TV: the total variation's value and gradient over the neighbour pairs (sparse
  difference operators), as the objective adds it;
- solver: :func:`~esdmri.reconst.refine._lbfgs_descent` itself (memory 5, the
  preconditioner, a fixed number of steps) on a quadratic objective of the same field
  whose own time is measured inside it and taken out;
- fused: the voxel terms, the TV and the whole objective again with the fused CPU
  kernels (:mod:`esdmri.reconst.fused_objective`, what the refinement runs on a CPU),
  each timed in turns with torch's (:func:`paired`), and their ratios to torch's.

Each part's floor: the products' FLOPs at the large product's rate; the elementwise
passes at one ``log`` and one division per fODF sample in cache (what a fused kernel
must still compute: the samples, ``V`` per voxel, stay in cache between the products);
the TV at 3 field passes (read the field, read and write the gradient) at the
streaming bandwidth; the solver at the passes of a fused two-loop recursion (``8 m +
12`` fields per step for ``m`` pairs: each loop reads every pair once with the
direction read and written alongside, the line search 4, the new pair 6) at the
streaming bandwidth. The table gives microseconds per voxel and evaluation (the solver
per step; the brain's default run takes about 1.11 evaluations per step), then the
brain's refinement at ``--evaluations`` (178, the quiet rerun's) with each part as
measured and at its floor, and the evaluation count that would bring the fit to DIPY
CSD's time (``--csd-seconds`` minus ``--other-seconds``, the quiet rerun's 68.4 s and
the fit's 6.8 s outside the refinement, as arguments: this script does not run CSD).
Times are the best of ``--repeats``: one thread's CPU time, two threads' wall time
(:func:`clock`); on a shared machine the 2-thread numbers and the bandwidth are those
of the load left to them (printed), and absolute times need an idle machine.

Usage::

    python -m benchmarks.bench_floor                      # the clinical-size scan
    python -m benchmarks.bench_floor --shape 40 40 40 --repeats 2   # a quick look
"""

import argparse
import os
import time

import numpy as np
import torch

from esdmri.reconst import fused_objective
from esdmri.reconst.losses import difference_operators, neighbour_pairs, total_variation
from esdmri.reconst.refine import (_CPU_BLOCK, _DAMPING, _PRECONDITIONER_TOLERANCE,
                                   CoupledObjective, Preconditioner, RefinementHistory,
                                   _lbfgs_descent, coefficient_degrees, signal_preconditioner)
from esdmri.sims import make_phantom
from esdmri.threads import sync_numba_threads

from .bench_memory import SHAPE as BRAIN_SHAPE
from .bench_memory import clinical_gtab
from .bench_preconditioner import refinement_inputs

THREADS = (1, 2)
MEMORY = 5
# Masked voxels of the clinical-size scan: the per-voxel costs of any --shape scale to it.
BRAIN_VOXELS = 225416


def clock(threads):
    """The clock of a run on ``threads`` threads: one thread's CPU time, else wall time.

    One thread's CPU time leaves out the time other processes hold its core; two
    threads' CPU time would count the time one waits for the other.
    """
    return time.process_time if threads == 1 else time.perf_counter


def timed(work, repeats, threads):
    """Best seconds of ``work()`` over ``repeats`` calls (:func:`clock`)."""
    torch.set_num_threads(threads)
    sync_numba_threads()
    now = clock(threads)
    work()  # warm: caches, the allocator, page faults of fresh buffers
    seconds = []
    for _ in range(repeats):
        start = now()
        work()
        seconds.append(now() - start)
    return min(seconds)


def paired(first, second, repeats, threads):
    """Best seconds of ``first()`` and of ``second()``, called in turns (A B B A ...).

    Side by side, the two see the same load on a shared machine: their ratio
    is steadier than either time.
    """
    torch.set_num_threads(threads)
    sync_numba_threads()
    now = clock(threads)
    first(), second()  # warm
    seconds = ([], [])
    for repeat in range(repeats):
        for index in ((0, 1) if repeat % 2 == 0 else (1, 0)):
            start = now()
            (first, second)[index]()
            seconds[index].append(now() - start)
    return min(seconds[0]), min(seconds[1])


class Quadratic:
    """``|c - t|^2 / 2`` with the refinement objective's call signature, timing itself."""

    def __init__(self, target, now):
        self.target = target
        self.now = now
        self.evaluations = 0
        self.seconds = 0.0

    def __call__(self, coefficients, with_value=True, out=None):
        start = self.now()
        self.evaluations += 1
        gradient = torch.sub(coefficients, self.target, out=out)
        value = 0.5 * float(torch.vdot(gradient.flatten(), gradient.flatten()))
        self.seconds += self.now() - start
        return value, gradient


class _Bar:
    """The progress bar the solver updates, silent."""

    def update(self, steps):
        pass

    def set_postfix(self, **kwargs):
        pass


def solver_seconds(c, forward_matrix, weights, n_wm, steps, threads):
    """Seconds (:func:`clock`) of ``steps`` L-BFGS steps outside the objective, the steps
    taken and the objective's evaluations."""
    torch.set_num_threads(threads)
    now = clock(threads)
    objective = Quadratic(torch.randn_like(c), now)
    preconditioner = Preconditioner(signal_preconditioner(forward_matrix, weights, _DAMPING),
                                    _PRECONDITIONER_TOLERANCE,
                                    coefficient_degrees(n_wm, c.shape[1]), dtype=c.dtype)
    start = now()
    _, taken, _ = _lbfgs_descent(c.clone(), objective, n_wm, steps=steps, lr=1e-3,
                                 memory=MEMORY, tolerance=0.0, least_fall=0.0,
                                 check_every=10, history=RefinementHistory(), bar=_Bar(),
                                 preconditioner=preconditioner)
    return now() - start - objective.seconds, taken, objective.evaluations


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=list(BRAIN_SHAPE))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--square", type=int, default=2048, help="edge of the large product")
    parser.add_argument("--solver-steps", type=int, default=10)
    parser.add_argument("--evaluations", type=int, default=178)
    parser.add_argument("--steps-per-evaluation", type=float, default=160 / 178)
    parser.add_argument("--csd-seconds", type=float, default=68.4)
    parser.add_argument("--other-seconds", type=float, default=6.8)
    args = parser.parse_args()
    phantom = make_phantom(shape=tuple(args.shape), gtab=clinical_gtab(), snr=30)
    inputs, options, n = refinement_inputs(phantom)
    del phantom
    start, signal, mask, forward_matrix, sampler, n_wm, order, weights = inputs
    rows = np.flatnonzero(mask)
    c = torch.as_tensor(start.reshape(-1, start.shape[-1])[rows])
    measured = torch.as_tensor(signal.reshape(-1, signal.shape[-1])[rows])
    first, second = neighbour_pairs(torch.as_tensor(mask))
    pair_weights = torch.full((len(first),), 1e-4)
    operators = difference_operators(first, second, n)
    pair_buffer = torch.empty((len(first), c.shape[1]))
    print(f"{'x'.join(map(str, args.shape))} clinical SNR 30: {n} masked voxels, "
          f"{len(first)} neighbour pairs, SH order {order}; machine load when started: "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    measurements = {}
    for repeat in range(2):
        for threads in (THREADS if repeat % 2 == 0 else THREADS[::-1]):
            arguments = (measured, forward_matrix, sampler, n_wm, weights, first, second,
                         pair_weights, 1e-3, _CPU_BLOCK * threads)
            fused = CoupledObjective(*arguments)
            fused_objective.ENABLED = False  # torch's code: the parts and the floors
            objective = CoupledObjective(*arguments)
            fused_objective.ENABLED = True
            loss = objective.voxel_loss
            chunks = objective.chunks
            gradient, other = torch.empty_like(c), torch.randn_like(c)
            block = torch.randn(chunks[0].stop - chunks[0].start, loss.n_samples).abs_()
            block_out = torch.empty_like(block)
            square = torch.randn(args.square, args.square)

            def products():
                for part in chunks:
                    torch.mm(c[part] @ loss.operator, loss.operator_t, out=gradient[part])

            def voxel_terms(objective=objective):
                for part in chunks:
                    objective.voxel_loss(c[part], objective.projected[part],
                                         objective.constant[part], out=gradient[part],
                                         return_loss=True)

            def fused_tv():
                for part in chunks:
                    fused.stencil.add_gradient(c, gradient, part)

            def log_and_divide():
                torch.log(block, out=block_out)
                torch.div(block, block_out, out=block_out)

            parts = {
                "sgemm": lambda: torch.mm(square, square),
                "add": lambda: torch.add(c, other, out=gradient),
                "vdot": lambda: torch.vdot(c.flatten(), other.flatten()),
                "products": products,
                "voxel terms": voxel_terms,
                "log+div in cache": lambda: [log_and_divide() for _ in chunks],
                "TV": lambda: total_variation(c, first, second, pair_weights, 1e-3,
                                              gradient=True, operators=operators,
                                              differences=pair_buffer, add_to=gradient),
                "objective": lambda: objective(c, out=gradient),
            }
            fused_parts = {"voxel terms": lambda: voxel_terms(fused), "TV": fused_tv,
                           "objective": lambda: fused(c, out=gradient)}
            for name, work in fused_parts.items():
                pair = paired(parts.pop(name), work, 2 * args.repeats, threads)
                for key, seconds in zip((name, f"fused {name}"), pair):
                    measurements[key, threads] = min(measurements.get((key, threads), np.inf),
                                                     seconds)
            for name, work in parts.items():
                measurements[name, threads] = min(measurements.get((name, threads), np.inf),
                                                  timed(work, args.repeats, threads))
            seconds, taken, evaluations = solver_seconds(c, forward_matrix, weights, n_wm,
                                                         args.solver_steps, threads)
            best = measurements.get(("solver", threads), (np.inf, taken, evaluations))
            measurements["solver", threads] = min(best, (seconds, taken, evaluations))
            print(f"repeat {repeat}, {threads} thread(s): done", flush=True)

    field_bytes = c.numel() * c.element_size()
    columns = loss.rank + loss.n_samples
    product_flops = 2 * 2 * c.shape[1] * columns  # per voxel: forward and back
    fused_passes = 8 * MEMORY + 12
    per_voxel = 1e6 / n  # seconds of the whole field -> microseconds per voxel
    table = {}
    for threads in THREADS:
        wall = {name: measurements[name, threads] for name, t in measurements if t == threads}
        sgemm_rate = 2 * args.square**3 / wall["sgemm"]
        bandwidth = max(3 * field_bytes / wall["add"], 2 * field_bytes / wall["vdot"])
        solver, taken, evaluations = measurements["solver", threads]
        table[threads] = dict(
            sgemm_rate=sgemm_rate, bandwidth=bandwidth,
            products=(wall["products"] * per_voxel, product_flops / sgemm_rate * 1e6),
            elementwise=((wall["voxel terms"] - wall["products"]) * per_voxel,
                         wall["log+div in cache"] * per_voxel),
            tv=(wall["TV"] * per_voxel, 3 * field_bytes / bandwidth * per_voxel),
            rest=((wall["objective"] - wall["voxel terms"] - wall["TV"]) * per_voxel, 0.0),
            solver=(solver / taken * per_voxel,
                    fused_passes * field_bytes / bandwidth * per_voxel),
            product_rate=product_flops / (wall["products"] * per_voxel) / 1e3,
            solver_passes=solver / taken * bandwidth / field_bytes)

    print(f"\nper voxel: products {product_flops} FLOP ({c.shape[1]} coefficients x "
          f"{columns} columns, forward and back); a field {field_bytes / 1e6:.0f} MB; "
          f"solver steps measured {args.solver_steps} ({measurements['solver', 1][2]} "
          f"evaluations of the quadratic)")
    for threads in THREADS:
        entry = table[threads]
        print(f"{threads} thread(s): large sgemm {entry['sgemm_rate'] / 1e9:.0f} GFLOP/s, "
              f"streaming {entry['bandwidth'] / 1e9:.1f} GB/s; the products run at "
              f"{entry['product_rate']:.0f} GFLOP/s; the solver moves the equivalent of "
              f"{entry['solver_passes']:.0f} fields per step at that bandwidth (fused floor "
              f"{fused_passes})")
    print("\n| part (us per voxel and evaluation) | 1 thread: measured (CPU time) | "
          "1 thread: floor | 2 threads: measured (wall) | 2 threads: floor |")
    print("|---|---|---|---|---|")
    names = {"products": "products (2 matrix products)", "elementwise": "elementwise passes "
             "of the voxel terms", "tv": "TV value and gradient", "rest": "objective's rest "
             "(sums, thread check)", "solver": "solver, per step"}
    totals = {threads: [0.0, 0.0] for threads in THREADS}
    for key, label in names.items():
        cells = []
        for threads in THREADS:
            measured_us, floor_us = table[threads][key]
            weight = args.steps_per_evaluation if key == "solver" else 1.0
            totals[threads][0] += measured_us * weight
            totals[threads][1] += floor_us * weight
            cells += [f"{measured_us:.2f}", f"{floor_us:.2f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for threads in THREADS:
        cells += [f"**{totals[threads][0]:.2f}**", f"**{totals[threads][1]:.2f}**"]
    print(f"| per evaluation (solver at {args.steps_per_evaluation:.2f} steps per "
          f"evaluation) | " + " | ".join(cells) + " |")

    print("\nthe fused CPU kernels beside torch's passes (us per voxel and evaluation; each "
          "pair timed side by side):")
    print("| part | 1 thread: torch | fused | fused / torch | 2 threads: torch | fused | "
          "fused / torch |")
    print("|---|---|---|---|---|---|---|")
    solver_weight = args.steps_per_evaluation
    rows = {"elementwise passes of the voxel terms": ("voxel terms", "products"),
            "voxel terms (products included)": ("voxel terms", None),
            "TV value and gradient": ("TV", None),
            "objective (one evaluation)": ("objective", None),
            f"evaluation with the solver ({solver_weight:.2f} steps)": ("objective", "solver")}
    for label, (name, other) in rows.items():
        cells = []
        for threads in THREADS:
            pair = [measurements[name, threads], measurements[f"fused {name}", threads]]
            if other == "products":
                pair = [value - measurements["products", threads] for value in pair]
            elif other == "solver":
                solver, taken, _ = measurements["solver", threads]
                pair = [value + solver / taken * solver_weight for value in pair]
            cells += [f"{pair[0] * per_voxel:.2f}", f"{pair[1] * per_voxel:.2f}",
                      f"{pair[1] / pair[0]:.2f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")

    brain = BRAIN_VOXELS
    budget = args.csd_seconds - args.other_seconds
    print(f"\nthe clinical scan's refinement ({brain} voxels, {args.evaluations} evaluations); "
          f"CSD {args.csd_seconds} s, the fit outside the refinement {args.other_seconds} s:")
    print("| threads | measured here (s) | at the floor (s) | fit / CSD at the floor | "
          "evaluations for fit = CSD, as measured | at the floor |")
    print("|---|---|---|---|---|---|")
    for threads in THREADS:
        measured_us, floor_us = totals[threads]
        measured_s = measured_us * brain * args.evaluations / 1e6
        floor_s = floor_us * brain * args.evaluations / 1e6
        print(f"| {threads} | {measured_s:.0f} | {floor_s:.0f} | "
              f"{(floor_s + args.other_seconds) / args.csd_seconds:.2f} | "
              f"{budget / (measured_us * brain / 1e6):.0f} | "
              f"{budget / (floor_us * brain / 1e6):.0f} |")


if __name__ == "__main__":
    main()
