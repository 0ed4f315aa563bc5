"""Where the accuracy of the deconvolution models comes from: an ablation.

On the default offline phantom (SNR 30) one model is built and scored at
four stages, all against DIPY's CSD with the ground-truth response:

1. the linear prior alone (the untrained network: a Tikhonov least-squares
   deconvolution of the grid signal);
2. the trained network (``refine_steps=0``);
3. the trained network refined on the loss, coupled between neighbours (the default);
4. the linear prior refined the same way, with no training at all.

Each row is scored by :func:`esdmri.metrics.threshold_sweep` at the
threshold with the best success rate and at 0.5, like
``benchmarks/accuracy.py``.

Usage::

    python -m benchmarks.refinement                  # 40^3, RT-ESD, writes docs
    python -m benchmarks.refinement --size 20 --model esd --no-write
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .accuracy import write_docs_section
from .methods import TRAINED, fit_csd

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
MARKERS = ("<!-- refinement:start -->", "<!-- refinement:end -->")
THRESHOLDS = np.round(np.arange(1, 10) * 0.1, 1)


def score(phantom, shm_coeff, fractions=None):
    """Best-threshold and 0.5 scores of one fODF volume on the fibre voxels."""
    from esdmri.metrics import evaluate_fractions, threshold_sweep

    mask = phantom.mask & (phantom.n_fibres >= 1)
    sweep = threshold_sweep(np.where(mask[..., None], shm_coeff, 0), phantom.fibre_dirs, mask,
                            THRESHOLDS)
    default = int(np.flatnonzero(np.isclose(sweep["thresholds"], 0.5))[0])
    rows = {}
    for label, index in ((f"best {sweep['best_threshold']:.1f}", sweep["best_index"]),
                         ("0.5", default)):
        result = sweep["results"][index]
        rows[label] = dict(ae=result["all"]["angular_error"],
                           ae_crossing=result["crossing"]["angular_error"],
                           success=result["all"]["success_rate"],
                           success_crossing=result["crossing"]["success_rate"])
    mae = None
    if fractions is not None:
        mae = evaluate_fractions(fractions, phantom.tissue_fractions, mask)["mae"]
    return rows, mae


def fractions_of_coefficients(coefficients, n_wm_coeffs):
    from esdmri.reconst.inference import fractions_of

    fractions = fractions_of(coefficients, n_wm_coeffs)
    total = fractions.sum(-1, keepdims=True)
    return np.divide(fractions, total, out=np.zeros_like(fractions), where=total > 0)


def run(size, model_name, refine_steps):
    import torch

    from esdmri.reconst.models import MODEL_CLASSES
    from esdmri.shm import n_coeffs
    from esdmri.sims import make_phantom

    phantom = make_phantom(shape=(size,) * 3, snr=30)
    fibres = phantom.mask & (phantom.n_fibres >= 1)
    table = []

    start = time.perf_counter()
    csd = fit_csd(phantom, fibres)
    table.append(("DIPY CSD (b 3000 shell, true response)", time.perf_counter() - start,
                  *score(phantom, csd.shm_coeff)))

    torch.manual_seed(0)
    model = MODEL_CLASSES[model_name](phantom.gtab, phantom.response, verbose=False,
                                      refine_steps=refine_steps, **TRAINED)
    n_wm = n_coeffs(model.config.network.sh_order_max)
    # The model's own steps (those of model.fit), called one by one so each
    # can be scored.
    scan = model.prepare(phantom.data, mask=phantom.mask)

    def stage(label, produce):
        start = time.perf_counter()
        coefficients = produce()
        seconds = time.perf_counter() - start
        table.append((label, seconds, *score(phantom, coefficients[..., :n_wm],
                                             fractions_of_coefficients(coefficients, n_wm))))
        print(table[-1][0], f"{seconds:.1f} s", table[-1][2], flush=True)
        return coefficients

    prior = stage("linear prior alone (untrained network)",
                  lambda: model.prior_coefficients(scan))
    stage(f"linear prior + refinement ({refine_steps} steps), no training",
          lambda: model.refine(prior, scan)[0])

    def train_and_infer():
        model.train(scan, max_steps=model.config.training.train_windows)
        return model.network_coefficients(scan)

    network = stage(f"{model_name} network alone (refine_steps=0; training + inference)",
                    train_and_infer)
    stage(f"{model_name} network + refinement ({refine_steps} steps; default)",
          lambda: model.refine(network, scan)[0])
    return table, int(fibres.sum())


def format_table(table):
    lines = ["| stage | time | threshold | AE all | AE crossing | success | success crossing | "
             "fraction MAE |", "|---|---|---|---|---|---|---|---|"]
    for label, seconds, rows, mae in table:
        for threshold, row in rows.items():
            lines.append(f"| {label} | {seconds:.1f} s | {threshold} | {row['ae']:.1f} | "
                         f"{row['ae_crossing']:.1f} | {row['success']:.3f} | "
                         f"{row['success_crossing']:.3f} | "
                         f"{'-' if mae is None else f'{mae:.3f}'} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=40, help="phantom edge (voxels)")
    parser.add_argument("--model", default="rtesd", choices=("esd", "rtesd", "cesd"))
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOCS.name}")
    args = parser.parse_args(argv)
    table, n_voxels = run(args.size, args.model, args.refine_steps)
    lines = format_table(table)
    print("\n".join(lines))
    if args.no_write:
        return
    command = " ".join(["python -m benchmarks.refinement",
                        *(sys.argv[1:] if argv is None else argv)])
    section = "\n".join([
        MARKERS[0], "## Where the accuracy comes from: network and refinement", "",
        f"`{command}`: default phantom ({args.size}^3, 3 shells, SNR 30), {n_voxels} fibre",
        "voxels, default settings, ground-truth responses. Each stage of one model is scored",
        "at the threshold with the best success rate and at 0.5; times are each stage's own",
        "on this 2-core machine (a refined row adds its refinement to the row above it):",
        "", *lines, "", MARKERS[1]])
    write_docs_section(section, DOCS, MARKERS)


if __name__ == "__main__":
    main()
