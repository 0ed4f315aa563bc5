"""Does the network learn? Its eval loss per epoch against the prior and the per-voxel minimum.

Issue 25: every per-scan training measured before ended at the linear prior's
fit, because training never brought its loss below the prior's and the
keep-best check then returned the starting weights. This script trains RT-ESD
on one dev phantom (:func:`esdmri.heldout_phantom.make_heldout_phantom`, the
dev geometry of ``benchmarks/heldout.py``) and shows

* the evaluation-mode loss on the masked voxels after every epoch
  (``training_history[i]["eval_total"]``, each voxel scored once with its
  whole receptive field) and the training-mode mean while the weights moved;
* two reference lines of the same loss on the same voxels: the linear
  prior's (the untrained network, the curve's start) and the per-voxel
  minimum (:func:`esdmri.reconst.refine.refine_coefficients` without total
  variation, run until it stalls), before and after the tissue fractions
  are scaled to sum to 1 as the network's output is;
* whether training fell back to the starting weights
  (``model.training_summary``);
* the crossing-voxel angular error and success rate of the network alone
  (``refine_steps=0``), the prior alone (same grid and order) and DIPY's CSD,
  each at the relative peak threshold that is best for it on this phantom
  (dev data: the thresholds are chosen here, nothing is a test score).

Usage::

    python -m benchmarks.training_curve --snr 20 --sh-order 8 --nside 4 --epochs 20
    python -m benchmarks.training_curve --snr 10 --sh-order 12 --nside 8 --epochs 20 \\
        --figure docs/figures/training_curve_snr10_order12.png

Absolute times depend on the machine's load; the losses and errors do not
(fixed seeds, deterministic CPU training).
"""

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from esdmri import RTESDModel
from esdmri.atomic import staged_output
from esdmri.metrics import threshold_sweep
from esdmri.reconst.network import build_fodf_sampler, build_forward_model
from esdmri.reconst.refine import refine_coefficients, voxel_loss_gradient
from esdmri.shm import n_coeffs
from esdmri.viz import save_figure

from .heldout import (FAMILIES, MATCH_ANGLE, THRESHOLDS, Fitter, build_phantom, scan_of,
                      scored_voxels)

DEV_GEOMETRY_SEED = 101


def voxel_losses(model, coefficients, normalized, mask):
    """Mean over masked voxels of the loss of some coefficients (the network's loss)."""
    order = model.config.network.sh_order_max
    forward = build_forward_model(model.response, model.gtab, order).matrix
    c = torch.as_tensor(coefficients[mask], dtype=torch.float32)
    measured = torch.as_tensor(normalized[mask], dtype=torch.float32)
    _, loss = voxel_loss_gradient(c, measured, forward, build_fodf_sampler(order),
                                  n_coeffs(order), model.config.training.loss_weights,
                                  return_loss=True)
    return float(loss.mean())


def per_voxel_minimum(model, start, normalized, mask, steps):
    """The refinement without total variation from ``start``, run until it stalls.

    Returns the per-voxel minimum's loss before and after the tissue
    fractions are scaled to sum to 1, and the steps it took.
    """
    order = model.config.network.sh_order_max
    refined, history = refine_coefficients(
        start, normalized, mask, build_forward_model(model.response, model.gtab, order).matrix,
        build_fodf_sampler(order), n_coeffs(order), order, model.config.training.loss_weights,
        steps=steps, lr=model.config.refinement.refine_lr, total_variation=0.0,
        tolerance=1e-5, normalize=model.normalizes)
    return history[-1], voxel_losses(model, refined, normalized, mask), 10 * (len(history) - 1)


def crossing_scores(shm_coeff, phantom, mask):
    """Crossing-voxel error and success at the threshold best for this fit (dev choice)."""
    sweep = threshold_sweep(shm_coeff, phantom.fibre_dirs, mask, THRESHOLDS,
                            threshold_deg=MATCH_ANGLE)
    best = sweep["best_index"]
    result = sweep["results"][best]
    return {"threshold": float(THRESHOLDS[best]),
            "crossing_error": result["crossing"]["angular_error"],
            "crossing_success": result["crossing"]["success_rate"],
            "all_error": result["all"]["angular_error"],
            "all_success": result["all"]["success_rate"]}


def run(args, log=print):
    phantom = build_phantom((args.size,) * 3, DEV_GEOMETRY_SEED, args.snr, "dev")
    scan = scan_of(phantom)
    mask = scored_voxels(phantom)
    options = dict(sh_order_max=args.sh_order, nside=args.nside, refine_steps=0,
                   seed=args.seed, verbose=args.verbose)
    network = dict(norm=args.norm, linear_prior=not args.no_prior, pretrained=False)
    recipe = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  warmup_steps=args.warmup_steps, train_windows=10**9)
    if args.train_tv:
        recipe.update(train_tv=args.train_tv, train_tv_form=args.train_tv_form)
    log(f"phantom {args.size}^3 SNR {args.snr}, {int(mask.sum())} voxels; sh_order_max "
        f"{args.sh_order}, nside {args.nside}; {recipe}; {network}")
    prior = RTESDModel(scan.gtab, scan.response, epochs=0, **options)
    prior_fit = prior.fit(scan.data, mask=mask)
    prepared = prior.prepare(scan.data, mask=mask)
    normalized, prior_coefficients = prepared.normalized, prior.prior_coefficients(prepared)
    prior_loss = voxel_losses(prior, prior_coefficients, normalized, mask)
    start = time.perf_counter()
    minimum, minimum_normalized, minimum_steps = per_voxel_minimum(
        prior, prior_coefficients, normalized, mask, args.minimum_steps)
    log(f"prior loss {prior_loss:.5g}; per-voxel minimum {minimum:.5g} "
        f"({minimum_normalized:.5g} with fractions summing to 1) after {minimum_steps} steps "
        f"({time.perf_counter() - start:.0f} s)")

    model = RTESDModel(scan.gtab, scan.response, **recipe, **network, **options)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = model.fit(scan.data, mask=mask)
    train_seconds = time.perf_counter() - start
    for warning in caught:
        log(f"warning: {warning.message}")
    history, summary = model.training_history, model.training_summary
    for record in history:
        log(f"epoch {record['epoch']:3d}: train {record['total']:.5g}, eval "
            f"{record['eval_total']:.5g}, lr {record['lr']:.3g}")
    network_loss = voxel_losses(model, model.network_coefficients(prepared), normalized, mask)
    log(f"summary {summary}; {summary['steps']} steps in {train_seconds:.0f} s; loss of the "
        f"kept network on every masked voxel {network_loss:.5g}")

    scores = {"network alone": crossing_scores(fit.shm_coeff_descoteaux07, phantom, mask),
              "prior alone": crossing_scores(prior_fit.shm_coeff_descoteaux07, phantom, mask)}
    fitter = Fitter(scan, mask)
    # The Fitter gives each method's MethodResult (and its time).
    csd = [crossing_scores(fitter(name)[0].shm_coeff, phantom, mask)
           for name in FAMILIES["DIPY CSD"]]
    scores["DIPY CSD"] = min(csd, key=lambda s: (-s["all_success"], s["all_error"]))
    result = {"size": args.size, "snr": args.snr, "sh_order_max": args.sh_order,
              "nside": args.nside, "recipe": recipe, "network": network, "seed": args.seed,
              "voxels": int(mask.sum()), "prior_loss": prior_loss,
              "per_voxel_minimum": minimum, "per_voxel_minimum_normalized": minimum_normalized,
              "minimum_steps": minimum_steps, "history": history, "summary": summary,
              "network_loss": network_loss, "train_seconds": train_seconds,
              "scores": scores}
    log(table(result))
    return result


def table(result):
    lines = [f"{'':>14} {'crossing err':>12} {'success':>8} {'all err':>8} {'thr':>5}"]
    for name, score in result["scores"].items():
        lines.append(f"{name:>14} {score['crossing_error']:12.1f} "
                     f"{score['crossing_success']:8.2f} {score['all_error']:8.1f} "
                     f"{score['threshold']:5.2f}")
    gap = result["prior_loss"] - result["per_voxel_minimum"]
    won = result["prior_loss"] - result["network_loss"]
    lines.append(f"loss: prior {result['prior_loss']:.5g}, network {result['network_loss']:.5g}, "
                 f"per-voxel minimum {result['per_voxel_minimum']:.5g} "
                 f"({result['per_voxel_minimum_normalized']:.5g} normalised): the network won "
                 f"{100 * won / gap:.1f} % of the prior-to-minimum gap")
    return "\n".join(lines)


def figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, result in zip(axes[0], results):
        epochs = [r["epoch"] + 1 for r in result["history"]]
        ax.plot([0] + epochs, [result["summary"]["start_loss"]]
                + [r["eval_total"] for r in result["history"]], "o-", label="eval loss")
        ax.plot(epochs, [r["total"] for r in result["history"]], ".--", alpha=0.6,
                label="training-mode mean")
        ax.axhline(result["prior_loss"], color="k", ls=":", label="linear prior")
        ax.axhline(result["per_voxel_minimum"], color="g", ls="-.",
                   label="per-voxel minimum")
        ax.axhline(result["per_voxel_minimum_normalized"], color="g", ls=":",
                   label="per-voxel min., fractions sum to 1")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        recipe = result["recipe"]
        ax.set_title(f"SNR {result['snr']:g}, order {result['sh_order_max']}, nside "
                     f"{result['nside']}: batch {recipe['batch_size']}, lr {recipe['lr']:g}, "
                     f"warm-up {recipe['warmup_steps']},\n"
                     f"{result.get('network', {}).get('norm', 'batch')} norm", fontsize=9)
    axes[0][0].set_ylabel("loss (mean over masked voxels)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, force=True, dpi=110)  # a rerun regenerates its own figure


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=12, help="phantom edge (voxels)")
    parser.add_argument("--snr", type=float, nargs="+", default=[20])
    parser.add_argument("--sh-order", type=int, default=8)
    parser.add_argument("--nside", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1.7e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--norm", choices=("batch", "voxel"), default="batch")
    parser.add_argument("--no-prior", action="store_true",
                        help="train from scratch (linear_prior=False, Softplus head)")
    parser.add_argument("--train-tv", type=float, default=0.0,
                        help="weight of the total variation in the training loss")
    parser.add_argument("--train-tv-form", default="normalized_fodf",
                        choices=("coefficients", "normalized_fodf"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minimum-steps", type=int, default=5000)
    parser.add_argument("--figure", default=None, help="png of the curves")
    parser.add_argument("--out", default=None, help="json of the results")
    parser.add_argument("--replot", nargs="+", default=None, metavar="JSON",
                        help="only draw --figure from the results of earlier runs")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # The trainer logs every epoch's training and evaluation loss as it goes.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("esdmri.reconst.training").setLevel(logging.INFO)
    if args.replot:
        results = [one for path in args.replot for one in json.loads(Path(path).read_text())]
        for result in results:
            print(table(result))
        figure(results, args.figure)
        return results
    results = []
    for snr in args.snr:
        one = argparse.Namespace(**{**vars(args), "snr": snr})
        results.append(run(one))
        if args.out:
            with staged_output(args.out) as temporary:
                temporary.write_text(json.dumps(results, indent=1, default=float))
    if args.figure:
        figure(results, args.figure)
    return results


if __name__ == "__main__":
    main()
