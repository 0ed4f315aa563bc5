"""The L-BFGS solver's passes over memory: numba's fused kernels against torch's (issue 28).

:func:`~esdmri.reconst.refine._lbfgs_descent` (memory 5, the clinical
acquisition's order-12 preconditioner, damping 10) runs ``--warm`` + ``--steps`` steps on
a quadratic objective (:class:`CurvedQuadratic`, whose own time is measured
inside it and taken out) over a random field of ``--voxels`` rows
and 93 columns (float32; the two isotropic columns at their bound 0 in about
half the voxels, so the held-bound masking works). The two implementations of
its passes (:mod:`esdmri.reconst.fused_solver`: the numba kernels, and the
torch expressions that every device other than a CPU runs) alternate in one
process, A B B A, ``--pairs`` times, on each of ``--threads`` (one thread:
CPU time; more: wall time, :func:`benchmarks.bench_floor.clock`). Only the
steps after the first ``--warm`` are timed (:class:`StepClock`). Printed: the
solver's microseconds per voxel and step for each run, the ratio fused /
torch of each pair, their median and range, and the fields per step that
each moves at the streaming bandwidth measured beside it (``torch.add`` over
three fields, ``torch.vdot`` over two: the best of both), against the ``8 m +
12`` = 52 of a fully fused recursion. The objective at the last step and the
steps taken show that both ran the same iterates (to round-off).

With ``--passes`` each of :mod:`esdmri.reconst.fused_solver`'s passes is timed
alone instead, against the torch expressions it replaces (best of ``2 --pairs``
calls each, the two alternating).

With ``--refine SIZE`` the whole refinement of the SIZE^3 dev phantom (SNR 20,
the default fit's inputs and options, ``bench_preconditioner``'s
``refinement_inputs``) runs to its stop instead (``--clinical``: the
clinical-size scan of ``bench_memory.py``, 96 x 96 x 60, SNR 30;
``--refine-steps N``: N steps without the stop rules), the two implementations
alternating the same way: milliseconds per evaluation (:func:`clock` of torch's
thread count: one thread under ``OMP_NUM_THREADS=1``, CPU time), evaluations,
steps, the objective at the stop and the largest difference of the refined
coefficients between the two; each step's time splits into the objective's
calls (:class:`ObjectiveClock`) and the rest, the solver's passes and products in
the real loop.

Usage::

    python -m benchmarks.bench_solver_passes                         # 40^3's and the brain's field
    python -m benchmarks.bench_solver_passes --voxels 25912 --pairs 2   # a quick look
    python -m benchmarks.bench_solver_passes --passes --voxels 225416
    OMP_NUM_THREADS=1 python -m benchmarks.bench_solver_passes --refine 40 --pairs 2
    OMP_NUM_THREADS=1 python -m benchmarks.bench_solver_passes --clinical --refine-steps 12
"""

import argparse
import os
import statistics

import numba
import numpy as np
import torch

from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.reconst import fused_solver
from esdmri.reconst.refine import (_DAMPING, _PRECONDITIONER_TOLERANCE, CoupledObjective,
                                   Preconditioner, RefinementHistory, _lbfgs_descent,
                                   coefficient_degrees, refine_coefficients,
                                   signal_preconditioner)
from esdmri.sims import make_phantom

from .bench_floor import MEMORY, Quadratic, clock
from .bench_memory import SHAPE as BRAIN_SHAPE
from .bench_memory import clinical_gtab
from .bench_preconditioner import refinement_inputs
from .bench_stages import DEV_GEOMETRY

COLUMNS, N_WM = 93, 91
# Masked voxels of the 40^3 dev phantom and of the clinical-size scan.
SIZES = (25912, 225416)


class CurvedQuadratic(Quadratic):
    """``(c - t) H (c - t) / 2`` with one ``C x C`` Hessian for every voxel.

    ``H`` has eigenvalues from 1e-2 to 1 on random axes, so that L-BFGS keeps
    taking full steps for tens of iterations (about one evaluation per step,
    as in the refinement) where ``bench_floor``'s ``|c - t|^2 / 2`` is solved in
    a few steps and then backtracks on round-off.
    """

    def __init__(self, target, now, hessian):
        super().__init__(target, now)
        self.hessian = hessian
        self.difference = torch.empty_like(target)

    def __call__(self, coefficients, with_value=True, out=None):
        start = self.now()
        self.evaluations += 1
        difference = torch.sub(coefficients, self.target, out=self.difference)
        gradient = torch.mm(difference, self.hessian, out=out)
        value = 0.5 * float(torch.vdot(difference.flatten(), gradient.flatten()))
        self.seconds += self.now() - start
        return value, gradient


def curved_hessian(generator):
    """A random ``C x C`` Hessian with eigenvalues spaced logarithmically from 1e-2 to 1."""
    axes, _ = torch.linalg.qr(torch.randn(COLUMNS, COLUMNS, generator=generator,
                                          dtype=torch.float64))
    return (axes * torch.logspace(-2, 0, COLUMNS, dtype=torch.float64) @ axes.T).float()


class StepClock:
    """The solver's progress bar: starts the clock after ``warm`` steps.

    The first steps fill the ``2 m`` pair buffers (fresh fields, whose page
    faults cost more than a pass); the steps after them are the refinement's
    steady state, hundreds of steps long.
    """

    def __init__(self, objective, warm):
        self.objective, self.warm = objective, warm
        self.steps, self.start = 0, None

    def update(self, steps):
        self.steps += steps
        if self.steps == self.warm:
            self.start = self.objective.now()
            self.objective.seconds = 0.0
            self.evaluations = self.objective.evaluations

    def set_postfix(self, **kwargs):
        pass


def run(c, target, hessian, preconditioner, steps, warm, threads, fused):
    """Seconds per step after ``warm`` steps, outside the objective (:func:`clock`),
    evaluations per step, the steps taken and the objective per voxel at the end."""
    fused_solver.ENABLED = fused
    torch.set_num_threads(threads)
    objective = CurvedQuadratic(target, clock(threads), hessian)
    history, bar = RefinementHistory(), StepClock(objective, warm)
    _, taken, _ = _lbfgs_descent(c.clone(), objective, N_WM, steps=warm + steps, lr=1e-3,
                                 memory=MEMORY, tolerance=0.0, least_fall=0.0,
                                 check_every=warm + steps, history=history, bar=bar,
                                 preconditioner=preconditioner)
    fused_solver.ENABLED = True
    seconds = objective.now() - bar.start - objective.seconds
    return (seconds / (taken - warm), (objective.evaluations - bar.evaluations) / (taken - warm),
            taken, history[-1])


def bandwidth(c, threads):
    """Bytes per second of the best of ``torch.add`` (3 fields) and ``torch.vdot`` (2)."""
    torch.set_num_threads(threads)
    now = clock(threads)
    other, out = torch.randn_like(c), torch.empty_like(c)
    best = 0.0
    for _ in range(4):
        start = now()
        torch.add(c, other, out=out)
        best = max(best, 3 * c.nbytes / (now() - start))
        start = now()
        torch.vdot(c.flatten(), other.flatten())
        best = max(best, 2 * c.nbytes / (now() - start))
    return best


def passes(voxels, threads, repeats):
    """Each fused pass alone against its torch expressions, best of ``repeats`` each,
    the two alternating; milliseconds (:func:`clock`)."""
    torch.set_num_threads(threads)
    now = clock(threads)
    generator = torch.Generator().manual_seed(1)
    c, g, d, x, u, t, s = (torch.randn(voxels, COLUMNS, generator=generator) for _ in range(7))
    c[:, N_WM:].clamp_(min=0)
    work = {
        "start_direction (d = held-masked g; s.d)": lambda: fused_solver.start_direction(
            d, g, c, N_WM, u),
        "axpy_dot (d += a x; u.d)": lambda: fused_solver.axpy_dot(d, 1e-3, x, u),
        "finish_direction (d += a x, held-masked; g.d)": lambda: fused_solver.finish_direction(
            d, g, c, N_WM, 1e-3, x),
        "trial_point (trial, s, g.s)": lambda: fused_solver.trial_point(t, s, c, d, 0.5, g,
                                                                        N_WM),
        "pair_difference (y = g' - g; s.y, y.y)": lambda: fused_solver.pair_difference(
            t, g, x, u),
    }
    print(f"\n{voxels} voxels x {COLUMNS}, {threads} thread(s), best of {repeats}; load "
          f"{os.getloadavg()[0]:.2f}")
    print("| pass | torch (ms) | numba fused (ms) | fused / torch |")
    print("|---|---|---|---|")
    for name, call in work.items():
        best = {}
        for repeat in range(2 * repeats + 2):  # the first of each is a warm-up
            fused = repeat % 2 == 0
            fused_solver.ENABLED = fused
            start = now()
            call()
            seconds = now() - start
            if repeat > 1:
                best[fused] = min(best.get(fused, np.inf), seconds)
        fused_solver.ENABLED = True
        print(f"| {name} | {best[False] * 1e3:.2f} | {best[True] * 1e3:.2f} | "
              f"{best[True] / best[False]:.2f} |", flush=True)


class ObjectiveClock:
    """Times :class:`~esdmri.reconst.refine.CoupledObjective`'s calls within the block
    (its ``__call__`` wrapped), so that a refinement splits into the objective and the
    rest (the solver's passes and products)."""

    def __init__(self, now):
        self.now, self.seconds = now, 0.0

    def __enter__(self):
        original = self.original = CoupledObjective.__call__

        def timed(objective, *args, **kwargs):
            start = self.now()
            result = original(objective, *args, **kwargs)
            self.seconds += self.now() - start
            return result

        CoupledObjective.__call__ = timed
        return self

    def __exit__(self, *exc):
        CoupledObjective.__call__ = self.original


def refine(phantom, label, pairs, steps=None):
    """A phantom's whole refinement, torch's passes and the kernels alternating.

    ``steps``: that many steps without the stop rules (None: the fit's own).
    """
    inputs, options, n = refinement_inputs(phantom)
    del phantom
    if steps is not None:
        options.update(steps=steps, tolerance=0.0, likelihood_tolerance=0.0)
    threads = torch.get_num_threads()
    now = clock(threads)
    print(f"{label}, {n} masked voxels, torch threads {threads}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"| pair | path | {'CPU' if threads == 1 else 'wall'} ms per evaluation | per step: "
          "all | objective | the rest (solver) | evaluations | steps | objective at the stop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fused in (True, False):  # warm: the kernels' cache, the allocator
        fused_solver.ENABLED = fused
        refine_coefficients(*inputs, **dict(options, steps=1))
    refined, ratios = {}, {"evaluation": [], "step": [], "step's objective": [],
                           "step's rest (solver)": []}
    for pair in range(pairs):
        seconds = {}
        for fused in (False, True) if pair % 2 == 0 else (True, False):
            fused_solver.ENABLED = fused
            with ObjectiveClock(now) as objective:
                start = now()
                refined[fused], history = refine_coefficients(*inputs, **options)
                elapsed = now() - start
            fused_solver.ENABLED = True
            seconds[fused] = (elapsed / history.evaluations, elapsed / history.steps,
                              objective.seconds / history.steps,
                              (elapsed - objective.seconds) / history.steps)
            print(f"| {pair} | {'numba fused' if fused else 'torch passes'} | "
                  + " | ".join(f"{value * 1e3:.1f}" for value in seconds[fused])
                  + f" | {history.evaluations} | {history.steps} | {history[-1]:.10g} |",
                  flush=True)
        for index, unit in enumerate(ratios):
            ratios[unit].append(seconds[True][index] / seconds[False][index])
    for unit, values in ratios.items():
        print(f"fused / torch per {unit}, per pair: {', '.join(f'{r:.3f}' for r in values)}; "
              f"median {statistics.median(values):.3f}")
    print(f"largest coefficient difference {abs(refined[True] - refined[False]).max():.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voxels", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--steps", type=int, default=10, help="steps timed")
    parser.add_argument("--warm", type=int, default=8, help="steps before the clock starts")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--refine", type=int, default=None, metavar="SIZE",
                        help="the SIZE^3 dev phantom's whole refinement instead")
    parser.add_argument("--clinical", action="store_true",
                        help="the clinical-size scan's refinement instead")
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="steps of the refinement without its stop rules")
    parser.add_argument("--passes", action="store_true",
                        help="each fused pass alone against its torch expressions instead")
    args = parser.parse_args()
    if args.passes:
        for voxels in args.voxels:
            for threads in args.threads:
                passes(voxels, threads, 2 * args.pairs)
        return
    if args.refine:
        phantom = make_heldout_phantom((args.refine,) * 3, snr=20, seed=1,
                                       geometry_seed=DEV_GEOMETRY)
        refine(phantom, f"{args.refine}^3 dev SNR 20", args.pairs, args.refine_steps)
        return
    if args.clinical:
        phantom = make_phantom(shape=BRAIN_SHAPE, gtab=clinical_gtab(), snr=30)
        refine(phantom, "clinical 96x96x60 SNR 30", args.pairs, args.refine_steps)
        return
    # The preconditioner of the clinical acquisition at order 12 (a small phantom of it).
    inputs, _, _ = refinement_inputs(make_phantom(shape=(8, 8, 8), gtab=clinical_gtab(),
                                                  snr=30))
    preconditioner = Preconditioner(signal_preconditioner(inputs[3], inputs[7], _DAMPING),
                                    _PRECONDITIONER_TOLERANCE,
                                    coefficient_degrees(inputs[5], inputs[0].shape[-1]),
                                    dtype=torch.float32)
    print(f"machine load when started: {os.getloadavg()[0]:.2f}; numba threading layer "
          f"after the first kernel: ", end="", flush=True)
    generator = torch.Generator().manual_seed(0)
    hessian = curved_hessian(generator)
    for voxels in args.voxels:
        c = torch.randn(voxels, COLUMNS, generator=generator)
        c[:, N_WM:].clamp_(min=0)
        target = torch.randn(voxels, COLUMNS, generator=generator)
        for threads in args.threads:
            for fused in (True, False):  # warm: the kernels' cache, the allocator
                run(c, target, hessian, preconditioner, 1, 1, threads, fused)
            if voxels == args.voxels[0] and threads == args.threads[0]:
                print(numba.threading_layer(), flush=True)
            fields = bandwidth(c, threads) / c.nbytes
            times = {True: [], False: []}
            ends = {}
            for pair in range(args.pairs):
                for fused in (False, True) if pair % 2 == 0 else (True, False):
                    seconds, per_step, taken, end = run(c, target, hessian, preconditioner,
                                                        args.steps, args.warm, threads, fused)
                    times[fused].append(seconds / voxels * 1e6)
                    ends[fused] = (taken, per_step, end)
            ratios = [a / b for a, b in zip(times[True], times[False])]
            print(f"\n{voxels} voxels x {COLUMNS}, {threads} thread(s), {args.steps} steps "
                  f"timed after {args.warm}; "
                  f"streaming {fields * c.nbytes / 1e9:.1f} GB/s; load "
                  f"{os.getloadavg()[0]:.2f}")
            print("| path | us per voxel and step, per run | fields per step (median) | "
                  "steps, evaluations per timed step, objective per voxel at the end |")
            print("|---|---|---|---|")
            for fused, name in ((False, "torch passes"), (True, "numba fused")):
                median = statistics.median(times[fused])
                print(f"| {name} | {', '.join(f'{t:.3f}' for t in times[fused])} | "
                      f"{median * 1e-6 * voxels * fields:.0f} | {ends[fused][0]}, "
                      f"{ends[fused][1]:.2f}, {ends[fused][2]:.10g} |")
            print(f"fused / torch per pair: {', '.join(f'{r:.2f}' for r in ratios)}; median "
                  f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                  flush=True)


if __name__ == "__main__":
    main()
