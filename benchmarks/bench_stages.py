"""Where the default fit's time goes, and the refinement's two solvers side by side (issue 28).

Every row is one default fit (``RTESDModel``, no training on the scan: the
linear prior, corrected by the shipped pretrained network, refined by the
spatially coupled descent of the loss; ``--network-free``: without the
correction, ``pretrained=False``) profiled with
:mod:`cProfile`, whose cumulative times split it into stages:

- response: :func:`esdmri.response.estimate_response` (once per scan, timed
  alone; the fits are given the estimate, as a user fitting twice would);
- checks: the input checks and the b0 normalisation;
- interpolation: building the shell interpolator and resampling the
  signal onto the network's grid;
- prior / network: the linear prior (or a trained network's pass), without
  the resampling;
- pretrained correction: the shipped network's pass over the prior
  (:mod:`esdmri.reconst.pretrained`);
- refinement: :func:`esdmri.reconst.refine.refine_coefficients`;
- writing: ``shm_coeff`` and the volume fractions saved as NIfTI (timed
  after the fit).

For each scan and SH order the refinement's solvers run in one process, their
order alternating between repeats (``refine_method="adam"``: the fixed-rate
Adam of up to 300 steps, the default before issue 28; ``"lbfgs"``: the
projected L-BFGS). The objective per voxel at the stop, the stop reason and the
crossing-voxel accuracy (held-out phantoms: angular error and success at the
relative peak threshold 0.10 the dev phantoms chose for the defaults) show that
the faster solver keeps the minimiser. Peak memory is the process's resident
high-water mark, reset before each fit (Linux). With ``--brain`` the
clinical-size scan of ``benchmarks/bench_memory.py`` (96 x 96 x 60, 100 volumes)
is added, with DIPY's CSD fitted on the same scan in the same process for the
time ratio the issue asks for (``--brain-shape``: another shape of that
acquisition). CSD's time includes its response, so the ratio counts the default
fit's response estimation too (the user's ``RTESDModel(gtab).fit`` estimates
it; until 2026-12-07 the ratio left those 4 s out). On a shared machine compare
ratios within one run; absolute times need a quiet machine.

Usage::

    python -m benchmarks.bench_stages --quick     # 20^3, SNR 20, the resolved SH order
    python -m benchmarks.bench_stages             # 20^3 and 40^3, SNR 20 and 10, orders 8, 12
    python -m benchmarks.bench_stages --brain --methods lbfgs   # adds the clinical-size scan
    python -m benchmarks.bench_stages --sizes 40 --shell 2500 64 --methods lbfgs \
        --options '{"sh_order_max": 10, "sparsity": 1e-4}'     # a former single-shell default
"""

import argparse
import cProfile
import gc
import json
import pstats
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from .bench_memory import SHAPE as BRAIN_SHAPE
from .bench_memory import clinical_gtab, peak_gib, reset_peak
from dipy.core.gradients import gradient_table
from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel, auto_response_ssst

from esdmri import RTESDModel
from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.metrics import threshold_sweep
from esdmri.response import estimate_response
from esdmri.shm import group_shells
from esdmri.sims import make_phantom

from .devset import shell_gtab

# Dev geometry of benchmarks/heldout.py and the relative peak threshold its
# dev phantoms chose for the defaults.
DEV_GEOMETRY = 101
PEAK_THRESHOLD = 0.10
# Stage -> names of the functions whose cumulative time it is; later stages'
# time is taken out of the earlier ones that call them.
STAGES = {
    "checks": ("inputs.check_scan", "inputs.normalize_by_b0"),
    "interpolation": ("shm.ShellInterpolator", "subjects.read"),
    "prior / network": ("models.prior_coefficients", "models.network_coefficients"),
    "pretrained correction": ("models.corrected_prior",),
    "refinement": ("refine.refine_coefficients",),
}


def function_times(profile):
    """Cumulative seconds per ``module.function`` (summed over same-named functions).

    Class constructors are reported under the class's name.
    """
    totals = {}
    package = str(Path(__file__).resolve().parents[1] / "esdmri")
    for (filename, line, name), statistics in pstats.Stats(profile).stats.items():
        if not filename.startswith(package):
            continue
        if name in ("__init__", "__call__"):
            name = _class_at(filename, line) + ("" if name == "__init__" else ".__call__")
        key = f"{Path(filename).stem}.{name}"
        totals[key] = totals.get(key, 0.0) + statistics[3]
    return totals


def _class_at(filename, line):
    """Name of the class whose method starts at ``line`` of ``filename``."""
    lines = Path(filename).read_text().splitlines()[:line]
    for text in reversed(lines):
        if text.startswith("class "):
            return text[6:].split("(")[0].split(":")[0]
    return "__init__"


def stage_seconds(profile):
    """Seconds per stage of :data:`STAGES`, from a profile of one fit."""
    times = function_times(profile)
    seconds = {stage: sum(times.get(name, 0.0) for name in names)
               for stage, names in STAGES.items()}
    # The resampling of each block runs inside the network pass.
    seconds["prior / network"] -= times.get("subjects.read", 0.0)
    return seconds


def crossing_scores(phantom, fit):
    """Angular error (degrees) and success rate on crossing voxels at PEAK_THRESHOLD."""
    crossing = phantom.mask & (phantom.n_fibres >= 2)
    if not crossing.any():
        return float("nan"), float("nan")
    sweep = threshold_sweep(fit.shm_coeff_descoteaux07, phantom.fibre_dirs, crossing,
                            thresholds=[PEAK_THRESHOLD])
    result = sweep["results"][0]["all"]
    return result["angular_error"], result["success_rate"]


def write_seconds(fit):
    """Seconds to save ``shm_coeff`` and the volume fractions as NIfTI."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        nib.save(nib.Nifti1Image(fit.shm_coeff.astype(np.float32), np.eye(4)),
                 Path(folder) / "fodf.nii.gz")
        fractions = np.stack(list(fit.volume_fractions.values()), axis=-1)
        nib.save(nib.Nifti1Image(fractions.astype(np.float32), np.eye(4)),
                 Path(folder) / "fractions.nii.gz")
    return time.perf_counter() - start


def profiled_fit(phantom, response, order, method, pretrained=None, options=None):
    """One default fit (``pretrained=False``: the network-free fit), profiled: its row.

    ``options``: further model keyword options (e.g. a former default).
    """
    options = {"sh_order_max": order, **(options or {})}
    model = RTESDModel(phantom.gtab, response, verbose=False, refine_method=method,
                       pretrained=pretrained, **options)
    gc.collect()
    reset_peak()
    profile = cProfile.Profile()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        profile.enable()
        fit = model.fit(phantom.data, mask=phantom.mask)
        profile.disable()
    seconds = time.perf_counter() - start
    peak = peak_gib()
    history = fit.refine_history
    angular_error, success = crossing_scores(phantom, fit)
    stages = stage_seconds(profile)
    # Microseconds per voxel and evaluation: the objective and the solver around it.
    per_evaluation = 1e6 / max(int(phantom.mask.sum()) * history.evaluations, 1)
    objective_seconds = function_times(profile).get("refine.CoupledObjective.__call__", 0.0)
    return dict(method=method, order=model.config.network.sh_order_max, fit=seconds,
                peak=peak, stages={**stages, "writing": write_seconds(fit)},
                evaluation=objective_seconds * per_evaluation,
                solver=(stages["refinement"] - objective_seconds) * per_evaluation,
                objective=history[-1], steps=history.steps, evaluations=history.evaluations,
                stop=history.stop_reason, angular_error=angular_error, success=success)


def csd_seconds(phantom):
    """Seconds of DIPY's CSD (SH order 8) on b0 + the highest shell, response included."""
    shell_bvals, shell_index = group_shells(phantom.gtab)
    keep = (shell_index == 0) | (shell_index == len(shell_bvals) - 1)
    gtab = gradient_table(phantom.gtab.bvals[keep], bvecs=phantom.gtab.bvecs[keep],
                          b0_threshold=phantom.gtab.b0_threshold)
    data = phantom.data[..., keep]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        response, _ = auto_response_ssst(gtab, data, roi_radii=10, fa_thr=0.7)
        ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=8).fit(data,
                                                                           mask=phantom.mask)
    return time.perf_counter() - start


def scans(args):
    """(name, phantom) of each scan the run fits."""
    for size in args.sizes:
        for snr in args.snrs:
            gtab = None if args.shell is None else shell_gtab([args.shell], seed=33)
            yield (f"{size}^3 dev SNR {snr:g}" + (
                "" if gtab is None else f", one shell b {args.shell[0]:g} x {args.shell[1]:g}"),
                   make_heldout_phantom((size,) * 3, gtab=gtab, snr=snr, seed=1,
                                        geometry_seed=DEV_GEOMETRY))
    if args.brain:
        shape = tuple(args.brain_shape)
        yield (f"clinical {'x'.join(map(str, shape))} SNR 30",
               make_phantom(shape=shape, gtab=clinical_gtab(), snr=30))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="20^3 at SNR 20, the resolved SH order, one repeat")
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help="sides of the dev phantoms (default: 20 40; --quick: 20; "
                        "none with --brain alone)")
    parser.add_argument("--snrs", type=float, nargs="+", default=None)
    parser.add_argument("--orders", type=int, nargs="+", default=None,
                        help="SH orders (default: 8 and 12; --quick: the resolved order)")
    parser.add_argument("--methods", nargs="+", default=["adam", "lbfgs"],
                        choices=["adam", "lbfgs"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--brain", action="store_true",
                        help="add the clinical-size scan and DIPY CSD's time on it")
    parser.add_argument("--brain-shape", type=int, nargs=3, default=list(BRAIN_SHAPE),
                        help="the clinical scan's shape with --brain (default: the brain's)")
    parser.add_argument("--shell", type=float, nargs=2, metavar=("BVAL", "DIRECTIONS"),
                        help="the dev phantoms on one shell of DIRECTIONS at b = BVAL "
                        "(default: their three shells)")
    parser.add_argument("--options", default="{}",
                        help="further model keyword options as JSON, e.g. a former default: "
                        "'{\"sh_order_max\": 10, \"sparsity\": 1e-4}'")
    parser.add_argument("--network-free", action="store_true",
                        help="fit without the shipped pretrained correction (pretrained=False)")
    args = parser.parse_args()
    if args.sizes is None:
        args.sizes = [20] if args.quick else [20, 40]
    args.snrs = args.snrs or ([20.0] if args.quick else [20.0, 10.0])
    args.orders = args.orders or ([None] if args.quick else [8, 12])

    print(f"{'network-free fit' if args.network_free else 'default fit'}; "
          f"torch threads: {torch.get_num_threads()}; machine load when started: "
          f"{Path('/proc/loadavg').read_text().split()[0]}", flush=True)
    header = ("| scan | masked voxels | SH order | solver | fit (s) | "
              + " | ".join(f"{stage} (s)" for stage in (*STAGES, "writing"))
              + " | response (s) | steps / evaluations | objective / solver (us per voxel "
              "and evaluation) | stop | objective per voxel | "
              "crossing AE (deg) | crossing success | peak RSS (GiB) |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    ratios = []
    for name, phantom in scans(args):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            response = estimate_response(phantom.gtab, phantom.data, phantom.mask)
        response_time = time.perf_counter() - start
        voxels = int(phantom.mask.sum())
        for order in args.orders:
            fits = {method: [] for method in args.methods}
            for repeat in range(args.repeats):
                order_of_methods = args.methods if repeat % 2 == 0 else args.methods[::-1]
                for method in order_of_methods:
                    fits[method].append(profiled_fit(phantom, response, order, method,
                                                     False if args.network_free else None,
                                                     json.loads(args.options)))
            for method, results in fits.items():
                best = min(results, key=lambda r: r["fit"])
                line = (f"| {name} | {voxels} | {best['order']} | {method} | {best['fit']:.1f} | "
                        + " | ".join(f"{best['stages'][s]:.1f}" for s in (*STAGES, "writing"))
                        + f" | {response_time:.1f} | {best['steps']} / {best['evaluations']} | "
                        f"{best['evaluation']:.2f} / {best['solver']:.2f} | {best['stop']} | "
                        f"{best['objective']:.6g} | "
                        f"{best['angular_error']:.2f} | {best['success']:.3f} | "
                        f"{best['peak']:.2f} |")
                rows.append(line)
                print(line, flush=True)
            if len(fits) == 2:
                old, new = (min(r["fit"] for r in fits[m]) for m in ("adam", "lbfgs"))
                ratios.append(f"{name}, SH order {best['order']}: adam / lbfgs fit time "
                              f"{old / new:.2f}x")
        if args.brain and name.startswith("clinical"):
            csd = csd_seconds(phantom)
            new = min(r["fit"] for r in fits.get("lbfgs", fits[args.methods[0]]))
            # CSD's seconds include its response; the default fit estimates its own
            # (RTESDModel(gtab) without a response), which this table times apart.
            ratios.append(f"{name}: DIPY CSD {csd:.1f} s (response included); default fit "
                          f"{new:.1f} s + response {response_time:.1f} s = "
                          f"{new + response_time:.1f} s; / CSD {(new + response_time) / csd:.2f} "
                          f"(fit alone {new / csd:.2f})")
        del phantom
        gc.collect()
    print()
    print("\n".join(rows))
    print()
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
