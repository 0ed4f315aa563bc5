"""The refinement's L-BFGS with and without its preconditioner, on one default fit's inputs.

The dev phantom of ``benchmarks/bench_stages.py`` (held-out family, geometry 101,
noise seed 1) is prepared as the default fit prepares it (response estimated,
linear prior, shipped pretrained correction), then
:func:`esdmri.reconst.refine.refine_coefficients` runs from that start with the
model's refinement options for each ``damping`` (``none``: the plain L-BFGS) and
each ``preconditioner_tolerance`` (``--tolerances``; 0: the whole ``C x C``
matrix, else :class:`esdmri.reconst.refine.Preconditioner`'s directions kept), in
one process, the order alternating between repeats. Printed per setting: the
preconditioner's rank, evaluations (and full-field equivalents under the active
set), steps, the objective per voxel at the stop and the process's CPU seconds
(less sensitive than wall time to other jobs on a shared machine, but still not
a quiet-machine number).

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_preconditioner --size 40 --dampings none 3 10 30
    OMP_NUM_THREADS=1 python -m benchmarks.bench_preconditioner --brain --tolerances 0 1e-2
"""

import argparse
import time
import warnings

import torch

from esdmri import RTESDModel
from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.reconst.network import build_fodf_sampler, build_forward_model
from esdmri.reconst.refine import (Preconditioner, coefficient_degrees, refine_coefficients,
                                   signal_preconditioner)
from esdmri.shm import n_coeffs
from esdmri.sims import make_phantom

from .bench_memory import SHAPE as BRAIN_SHAPE
from .bench_memory import clinical_gtab
from .bench_stages import DEV_GEOMETRY


def damping_value(text):
    return None if text.lower() == "none" else float(text)


def add_scan_arguments(parser):
    """``--size``, ``--snr`` (the dev phantom) and ``--brain`` (the clinical-size scan)."""
    parser.add_argument("--size", type=int, default=40)
    parser.add_argument("--snr", type=float, default=20.0)
    parser.add_argument("--brain", action="store_true",
                        help="the clinical-size scan (96x96x60, SNR 30) instead of the phantom")


def chosen_scan(args):
    """The scan :func:`add_scan_arguments`' options name, and its name in a table.

    Returns
    -------
    name : str
    phantom : Phantom
    """
    if args.brain:
        return ("clinical 96x96x60 SNR 30",
                make_phantom(shape=BRAIN_SHAPE, gtab=clinical_gtab(), snr=30))
    return (f"{args.size}^3 dev SNR {args.snr:g}",
            make_heldout_phantom((args.size,) * 3, snr=args.snr, seed=1,
                                 geometry_seed=DEV_GEOMETRY))


def refinement_inputs(phantom, sh_order_max=None):
    """The default fit's refinement inputs and options for a phantom.

    The scan is prepared as the default fit prepares it (response estimated,
    linear prior, shipped pretrained correction), at ``sh_order_max`` (None:
    the order the model resolves from the gradient table).

    Returns
    -------
    inputs : tuple
        The positional arguments of :func:`refine_coefficients`.
    options : dict
        The model's refinement options.
    n_masked : int
    """
    model = RTESDModel(phantom.gtab, verbose=False, sh_order_max=sh_order_max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = model.prepare(phantom.data, mask=phantom.mask)
        start = model.corrected_prior(model.prior_coefficients(scan), scan)
    order, config = model.config.network.sh_order_max, model.config.refinement
    inputs = (start, scan.normalized, scan.mask,
              build_forward_model(scan.response, model.gtab, order, model.device).matrix,
              build_fodf_sampler(order, model.device), n_coeffs(order), order,
              model.config.training.loss_weights)
    options = dict(config.solver_options(), normalize=model.normalizes_with(scan.response))
    return inputs, options, int(scan.mask.sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_scan_arguments(parser)
    parser.add_argument("--dampings", type=damping_value, nargs="+", default=[None, 10.0])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    name, phantom = chosen_scan(args)
    inputs, options, n_masked = refinement_inputs(phantom)
    print(f"{name}, {n_masked} masked voxels, SH order {inputs[6]}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    rows = ["| damping | tolerance | rank | evaluations | full-field equivalents | steps "
            "| objective per voxel | CPU (s) |", "|---|---|---|---|---|---|---|---|"]
    settings = [(d, t) for d in args.dampings for t in args.tolerances]
    for repeat in range(args.repeats):
        for damping, tolerance in (settings if repeat % 2 == 0 else settings[::-1]):
            rank = "-" if damping is None else Preconditioner(
                signal_preconditioner(inputs[3], inputs[7], damping), tolerance,
                coefficient_degrees(inputs[5], inputs[0].shape[-1])).rank
            clock = time.process_time()
            _, history = refine_coefficients(*inputs, **{**options, "damping": damping,
                                                         "preconditioner_tolerance": tolerance})
            seconds = time.process_time() - clock
            rows.append(f"| {damping if damping is not None else 'none (plain L-BFGS)'} | "
                        f"{tolerance:g} | {'C (dense)' if rank is None else rank} | "
                        f"{history.evaluations} | {history.full_evaluations:.1f} | "
                        f"{history.steps} | {history[-1]:.10g} | {seconds:.1f} |")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
