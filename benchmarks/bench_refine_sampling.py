"""The refinement's sparsity terms on fewer directions: evaluations, time and objective (issue 28).

The default fit's refinement inputs are prepared once (``bench_preconditioner``'s
``refinement_inputs``: response estimated, linear prior, shipped pretrained
correction) on the 40^3 dev phantom of ``bench_stages.py``, on the clinical-size scan
(``--brain``) or on a ``make_phantom`` scan of the clinical acquisition of another shape
(``--shape``, e.g. 64 64 40 at SNR 30); then :func:`refine_coefficients` runs with the
model's refinement options once per sampling hemisphere (``--nsides``: HEALPix nside
of :func:`esdmri.reconst.network.sampling_vertices`, ``6 nside**2`` directions; 8 is
the default sampler), the order alternating between repeats. Printed per nside:
evaluations and steps to the stop, the process's CPU seconds per evaluation (one
thread is the comparable setting; on a shared machine compare the ratio to nside 8
within one run, absolute times need an idle machine), the objective per voxel at the
stop on the candidate's own sampling, and the same coefficients' objective on the
default's 384 directions (the objective the default minimises; lower is better, and
comparable across rows). The coefficients are not rescaled to unit tissue fractions
(``normalize=False``), so both objectives are those of the point where the solver
stopped.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_refine_sampling --size 40 --nsides 8 6 5 4
    OMP_NUM_THREADS=1 python -m benchmarks.bench_refine_sampling --shape 64 64 40 --nsides 8 6
"""

import argparse
import time

import torch

from esdmri.reconst.network import SAMPLING_NSIDE, build_fodf_sampler
from esdmri.reconst.refine import refine_coefficients
from esdmri.sims import make_phantom

from .bench_memory import clinical_gtab
from .bench_preconditioner import add_scan_arguments, chosen_scan, refinement_inputs

# Where the sampler sits in refinement_inputs' positional arguments.
_SAMPLER = 4


def default_objective(result, inputs, options):
    """Objective per voxel of ``result`` on the default sampler (no step taken)."""
    _, history = refine_coefficients(result, *inputs[1:], **dict(options, steps=0))
    return history[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scan_arguments(parser)
    parser.add_argument("--shape", type=int, nargs=3, default=None,
                        help="a make_phantom scan of the clinical acquisition (SNR 30)")
    parser.add_argument("--nsides", type=int, nargs="+", default=[SAMPLING_NSIDE, 6])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.shape:
        name = f"{'x'.join(map(str, args.shape))} clinical SNR 30"
        phantom = make_phantom(shape=tuple(args.shape), gtab=clinical_gtab(), snr=30)
    else:
        name, phantom = chosen_scan(args)
    inputs, options, n_masked = refinement_inputs(phantom)
    del phantom
    options.update(normalize=False)
    order, device = inputs[6], inputs[_SAMPLER].device
    print(f"{name}, {n_masked} masked voxels, SH order {order}, torch threads "
          f"{torch.get_num_threads()}; machine load when started: "
          f"{open('/proc/loadavg').read().split()[0]}", flush=True)
    samplers = {nside: build_fodf_sampler(order, device, nside) for nside in args.nsides}
    results = {nside: [] for nside in args.nsides}
    for repeat in range(args.repeats):
        for nside in (args.nsides if repeat % 2 == 0 else args.nsides[::-1]):
            candidate = list(inputs)
            candidate[_SAMPLER] = samplers[nside]
            clock = time.process_time()
            refined, history = refine_coefficients(*candidate, **options)
            seconds = time.process_time() - clock
            results[nside].append((seconds, history, refined))
            print(f"nside {nside}: {history.evaluations} evaluations, {seconds:.1f} CPU s",
                  flush=True)
    base_ms = (min(seconds / history.evaluations for seconds, history, _ in
                   results[SAMPLING_NSIDE]) * 1e3 if SAMPLING_NSIDE in results else None)
    rows = ["| nside (directions) | steps / evaluations | CPU ms per evaluation (runs) | "
            "ratio to nside 8 | objective per voxel, own sampling | on the default's 384 |",
            "|---|---|---|---|---|---|"]
    for nside, runs in results.items():
        per_evaluation = [seconds / history.evaluations * 1e3 for seconds, history, _ in runs]
        _, history, refined = runs[0]
        ratio = f"{min(per_evaluation) / base_ms:.2f}" if base_ms else "-"
        rows.append(f"| {nside} ({len(samplers[nside])}) | {history.steps} / "
                    f"{history.evaluations} | "
                    f"{', '.join(f'{ms:.1f}' for ms in per_evaluation)} | {ratio} | "
                    f"{history[-1]:.10g} | "
                    f"{default_objective(refined, inputs, options):.10g} |")
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
