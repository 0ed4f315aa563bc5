"""The pretrained correction's cost: the folded pass against the layered one (issues 27, 28).

:func:`esdmri.reconst.pretrained.apply_correction` runs the shipped network
folded by default (:mod:`esdmri.reconst.folded`); ``folded=False`` runs its
layers slab by slab, as before. Both run in this one process, interleaved
(A, B, B, A, ...), on one torch thread (or each count of ``--num_threads``),
timed in CPU seconds (``time.process_time``), so that a machine shared with
other jobs slows both alike, and in wall seconds (what a second thread
buys); the table gives the median of each and their ratios, with the largest
difference between the two outputs relative to the largest correction.

Scans:

- ``40^3``: the dev phantom of ``benchmarks/bench_stages.py`` (SNR 20, its
  estimated response), the real linear prior of the default model;
- ``brain``: the masked-voxel count of the clinical-size scan of
  ``benchmarks/bench_memory.py`` (96 x 96 x 60) with synthetic prior-like
  coefficients (the network's cost does not depend on the values).

``--fits`` adds, on the 40^3 phantom, whole default fits with either pass
and the network-free fit (``pretrained=False``), interleaved: the fit's CPU
time, the refinement's evaluations and the crossing-voxel accuracy
(``bench_stages.crossing_scores``), which shows what the cheaper pass does to
issue 27's "takes no longer" goal.

Usage::

    python -m benchmarks.bench_correction                 # 40^3 and brain, 3 repeats
    python -m benchmarks.bench_correction --fits --repeats 3
    python -m benchmarks.bench_correction --kinds e3so3-stem spherical concat --no-brain
    python -m benchmarks.bench_correction --num_threads 1 2   # one and two torch threads
"""

import argparse
import functools
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from esdmri import RTESDModel
from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.reconst import models, pretrained
from esdmri.response import estimate_response
from esdmri.shm import n_coeffs
from esdmri.sims import make_phantom

from .bench_memory import SHAPE as BRAIN_SHAPE
from .bench_memory import clinical_gtab
from .bench_stages import DEV_GEOMETRY, crossing_scores


def cpu_seconds(function, *args, **kwargs):
    """CPU seconds of one call and its result."""
    start = time.process_time()
    result = function(*args, **kwargs)
    return time.process_time() - start, result


def cpu_and_wall_seconds(function, *args, **kwargs):
    """CPU and wall-clock seconds of one call, and its result."""
    wall = time.perf_counter()
    elapsed, result = cpu_seconds(function, *args, **kwargs)
    return (elapsed, time.perf_counter() - wall), result


def dev_phantom(side):
    return make_heldout_phantom((side,) * 3, snr=20, seed=1, geometry_seed=DEV_GEOMETRY)


def dev_prior(phantom):
    """The default model's linear prior of a phantom, its mask and tissues."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        response = estimate_response(phantom.gtab, phantom.data, phantom.mask)
        model = RTESDModel(phantom.gtab, response, verbose=False)
        scan = model.prepare(phantom.data, mask=phantom.mask)
    return model.prior_coefficients(scan), scan.mask, tuple(scan.response.tissues)


def brain_prior(seed=0):
    """Prior-like coefficients (SH order 8, GM and CSF) on the clinical scan's mask."""
    mask = make_phantom(shape=BRAIN_SHAPE, gtab=clinical_gtab(), snr=30).mask
    rng = np.random.default_rng(seed)
    tissues = ("wm", "gm", "csf")
    coefficients = np.zeros(mask.shape + (n_coeffs(8) + 2,), dtype=np.float32)
    count = int(mask.sum())
    inside = rng.normal(0, 0.05, (count, coefficients.shape[-1]))
    inside[:, 0] = rng.uniform(0.1, 0.3, count)
    inside[:, -2:] = rng.uniform(0, 0.3, (count, 2))
    coefficients[mask] = inside
    return coefficients, mask, tissues


def compare_passes(correction, coefficients, mask, tissues, repeats):
    """Median (CPU, wall) seconds of the layered and folded passes, and their outputs'
    difference."""
    seconds = {False: [], True: []}
    outputs = {}
    for repeat in range(repeats):
        for folded in ((False, True) if repeat % 2 == 0 else (True, False)):
            elapsed, outputs[folded] = cpu_and_wall_seconds(
                pretrained.apply_correction, correction, coefficients, mask, tissues,
                folded=folded)
            seconds[folded].append(elapsed)
    scale = np.abs(outputs[False] - coefficients).max()
    difference = np.abs(outputs[True] - outputs[False]).max()
    medians = [tuple(statistics.median(run[i] for run in seconds[folded]) for i in (0, 1))
               for folded in (False, True)]
    return medians[0], medians[1], difference, scale


def timed_fit(phantom, response, variant):
    """One quiet default fit: ``variant`` "layered", "folded" or "network-free"."""
    pretrained_option = False if variant == "network-free" else None
    model = RTESDModel(phantom.gtab, response, verbose=False, pretrained=pretrained_option)
    original = models.apply_correction
    if variant == "layered":
        models.apply_correction = functools.partial(original, folded=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elapsed, fit = cpu_seconds(model.fit, phantom.data, mask=phantom.mask)
    finally:
        models.apply_correction = original
    return elapsed, fit


def compare_fits(side, repeats):
    """Rows of the default fit with each pass and the network-free fit, interleaved."""
    phantom = dev_phantom(side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        response = estimate_response(phantom.gtab, phantom.data, phantom.mask)
    variants = ["layered", "folded", "network-free"]
    seconds = {variant: [] for variant in variants}
    fits = {}
    for repeat in range(repeats):
        for variant in (variants if repeat % 2 == 0 else variants[::-1]):
            elapsed, fits[variant] = timed_fit(phantom, response, variant)
            seconds[variant].append(elapsed)
    rows = []
    for variant in variants:
        fit = fits[variant]
        error, success = crossing_scores(phantom, fit)
        difference = np.abs(fit.shm_coeff - fits["layered"].shm_coeff).max()
        rows.append((variant, statistics.median(seconds[variant]),
                     fit.refine_history.evaluations, error, success, difference))
    scale = np.abs(fits["layered"].shm_coeff).max()
    return rows, scale


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["e3so3-stem"],
                        choices=sorted(pretrained.ARCHITECTURES),
                        help="architectures (the shipped weights of each)")
    parser.add_argument("--side", type=int, default=40, help="edge of the dev phantom")
    parser.add_argument("--no-brain", dest="brain", action="store_false",
                        help="skip the clinical-size voxel count")
    parser.add_argument("--fits", action="store_true",
                        help="add whole default and network-free fits of the dev phantom")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_threads", type=int, nargs="+", default=[1],
                        help="torch thread counts, each a table row (the folded pass runs "
                             "one chunk per thread)")
    args = parser.parse_args()
    print(f"machine load when started: {Path('/proc/loadavg').read_text().split()[0]}; "
          f"CPU and wall seconds, median of {args.repeats} interleaved", flush=True)
    scans = [(f"{args.side}^3 dev phantom, real prior", dev_prior(dev_phantom(args.side)))]
    if args.brain:
        scans.append(("clinical 96x96x60 mask, synthetic prior", brain_prior()))
    rows = ["| scan | architecture | masked voxels | torch threads | layered CPU (s) | "
            "folded CPU (s) | layered / folded (CPU) | layered wall (s) | folded wall (s) | "
            "layered / folded (wall) | folded CPU (us per voxel) | "
            "max difference / max correction |", "|---" * 12 + "|"]
    for name, (coefficients, mask, tissues) in scans:
        voxels = int(mask.sum())
        for kind in args.kinds:
            correction = pretrained.load_correction(True, kind=kind)
            for threads in args.num_threads:
                torch.set_num_threads(threads)
                layered, fast, difference, scale = compare_passes(
                    correction, coefficients, mask, tissues, args.repeats)
                rows.append(f"| {name} | {kind} | {voxels} | {threads} | {layered[0]:.2f} | "
                            f"{fast[0]:.2f} | {layered[0] / fast[0]:.2f} | {layered[1]:.2f} | "
                            f"{fast[1]:.2f} | {layered[1] / fast[1]:.2f} | "
                            f"{1e6 * fast[0] / voxels:.1f} | {difference / scale:.1e} |")
                print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    torch.set_num_threads(args.num_threads[0])
    if args.fits:
        fit_rows, scale = compare_fits(args.side, args.repeats)
        network_free = fit_rows[-1][1]
        print(f"\n{args.side}^3 dev phantom, SNR 20: whole fits (default model, RT-ESD "
              "correction), CPU seconds, median of interleaved repeats\n")
        print("| fit | CPU (s) | / network-free | refinement evaluations | crossing AE (deg) | "
              "crossing success | max shm difference to layered / max shm |")
        print("|---|---|---|---|---|---|---|")
        for variant, seconds, evaluations, error, success, difference in fit_rows:
            label = {"layered": "default, layered correction",
                     "folded": "default, folded correction",
                     "network-free": "network-free (pretrained=False)"}[variant]
            print(f"| {label} | {seconds:.1f} | {seconds / network_free:.2f} | {evaluations} | "
                  f"{error:.2f} | {success:.3f} | {difference / scale:.1e} |")


if __name__ == "__main__":
    main()
