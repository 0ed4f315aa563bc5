"""Pretrain the acquisition-agnostic correction of the linear prior (issue 27).

Builds a cohort of simulated scans (fixed seed), computes each scan's linear
prior once with responses estimated from the scan (the package's default path,
``RTESDModel(gtab).prepare`` then ``prior_coefficients``), and trains
:class:`esdmri.reconst.pretrained.PriorCorrection` on windows of (prior
coefficients -> target), one scan per step. Prints the evaluation loss of the
network against the prior's on held-aside cohort scans, and writes the weights
atomically.

Cohort (none of its seeds is a dev or test seed of ``benchmarks/devset.py``
(geometry 1 / 101 dev, 7 / 107 test) or ``benchmarks/heldout.py`` (geometry 0
test, 101 dev)):

- ``dispersed``: :func:`esdmri.heldout_phantom.make_heldout_phantom`, geometry
  seeds 200 and up, Watson concentrations of the default range or a sharper one;
- ``straight``: ``benchmarks/straight_phantom.py``'s undispersed straight
  crossings, geometry seeds 300 and up, crossing angles 35-90 degrees,
  single-fibre FA 0.5-0.85;
- ``curved``: :func:`esdmri.sims.make_phantom` (its fixed layout), tensor
  eigenvalues of FA 0.5-0.85;

acquisitions cycled through single-shell b 1000 with 30 directions, DIPY's
``get_3shell_gtab``, :func:`esdmri.sims.default_gtab` and two shells (b 1000 and
2000, 45 directions each); SNR drawn from 5-40.

The loss is supervised (:func:`esdmri.reconst.pretrained.fibre_target`): the
squared distance of the corrected WM degrees 0-8 to the true fibres as
apodised deltas carrying the true WM fraction of the prior's tissue total (the
WM l = 0 term is not corrected), per voxel divided by that total
tissue fraction, weighted by 0.2 + the true WM fraction.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.pretrain --minutes 30 \\
        --out esdmri/data/pretrained_rtesd.pt
    # score weights on the dev phantoms of benchmarks/devset.py (dev split only)
    python -m benchmarks.pretrain --dev WEIGHTS --dev-out out/pretrain-dev
"""

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from dipy.core.gradients import generate_bvecs, gradient_table
from dipy.data import get_3shell_gtab

from esdmri.atomic import staged_output
from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.reconst.models import RTESDModel
from esdmri.reconst.network import SQRT_4PI, volume_fractions_from_coefficients
from esdmri.reconst.pretrained import (ARCHITECTURE, PriorCorrection, fibre_target,
                                       save_correction, sha256_of)
from esdmri.shm import n_coeffs
from esdmri.sims import default_gtab, make_phantom

from .heldout import markdown
from .straight_phantom import make_straight_phantom, radial_for_fa

SNRS = (5, 10, 15, 20, 30, 40)
FAMILIES = ("dispersed", "straight", "curved")


def _shells(bvals, n_directions, n_b0, seed):
    rng = np.random.default_rng(seed)
    bvecs = [np.zeros((n_b0, 3))]
    for _ in bvals:
        directions = generate_bvecs(n_directions, iters=2000, rng=rng)
        bvecs.append(directions)
    all_bvals = np.concatenate([np.zeros(n_b0), np.repeat(bvals, n_directions)])
    return gradient_table(all_bvals, bvecs=np.concatenate(bvecs))


ACQUISITIONS = {
    "b1000x30": lambda: _shells([1000.0], 30, 2, seed=11),
    "dipy-3shell": get_3shell_gtab,
    "heldout-default": default_gtab,
    "b1000+b2000x45": lambda: _shells([1000.0, 2000.0], 45, 3, seed=12),
}


def cohort_settings(n_scans, seed):
    """The (family, acquisition, snr, seeds, options) of every cohort scan."""
    rng = np.random.default_rng(seed)
    acquisitions = list(ACQUISITIONS)
    settings = []
    for i in range(n_scans):
        family = FAMILIES[i % len(FAMILIES)]
        settings.append({
            "family": family,  # Every (family, acquisition) pair once in 12 scans.
            "acquisition": acquisitions[(i % len(FAMILIES) + i // len(FAMILIES))
                                        % len(acquisitions)],
            "snr": float(rng.choice(SNRS)), "fa": float(rng.uniform(0.5, 0.85)),
            "geometry_seed": (200 if family == "dispersed" else 300) + i,
            "noise_seed": 5000 + i, "sharp": bool(rng.random() < 0.5),
            "angles": (float(rng.uniform(35, 60)), float(rng.uniform(60, 90)))})
    return settings


def build_phantom(setting, side):
    gtab = ACQUISITIONS[setting["acquisition"]]()
    shape = (side,) * 3
    if setting["family"] == "dispersed":
        kappa = (16.0, 64.0) if setting["sharp"] else (4.0, 24.0)
        return make_heldout_phantom(shape, gtab, snr=setting["snr"], seed=setting["noise_seed"],
                                    geometry_seed=setting["geometry_seed"], kappa_range=kappa)
    if setting["family"] == "straight":
        return make_straight_phantom(gtab, shape, setting["snr"], angles=setting["angles"],
                                     fa=setting["fa"], geometry_seed=setting["geometry_seed"],
                                     seed=setting["noise_seed"])
    axial = 1.7e-3
    radial = radial_for_fa(axial, setting["fa"])
    return make_phantom(shape, gtab, snr=setting["snr"], seed=setting["noise_seed"],
                        wm_evals=(axial, radial, radial))


def fibre_weights(phantom):
    """Each true fibre's share of its voxel's WM, shape (X, Y, Z, K)."""
    weights = getattr(phantom, "fibre_fractions", None)
    present = np.all(np.isfinite(phantom.fibre_dirs), axis=-1)
    if weights is None:  # straight bundles: equal shares
        weights = present / np.maximum(present.sum(-1, keepdims=True), 1)
    weights = np.where(present, np.nan_to_num(weights), 0)
    total = weights.sum(-1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def prepare_scan(setting, side):
    """One cohort scan: its prior (estimated responses), target and weights."""
    phantom = build_phantom(setting, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = RTESDModel(phantom.gtab, verbose=False)
        scan = model.prepare(phantom.data, mask=phantom.mask)
        prior = model.prior_coefficients(scan)
    # The true WM in the fit's units: its fraction of the prior's tissue total.
    # (Anchoring the lobes to the prior's own WM amount instead flipped them
    # where that amount is negative: the linear prior shares the WM's
    # isotropic part with GM and CSF.)
    n_wm = n_coeffs(model.config.network.sh_order_max)
    total = volume_fractions_from_coefficients(prior, n_wm).sum(-1)
    amount = total * phantom.tissue_fractions[..., 0] / SQRT_4PI
    target = fibre_target(phantom.fibre_dirs, fibre_weights(phantom), amount)
    target[..., 0] = prior[..., 0]  # the WM amount is the prior's, not corrected
    weight = np.where(scan.mask, 0.2 + phantom.tissue_fractions[..., 0], 0).astype(np.float32)
    return {"prior": prior, "target": target, "weight": weight,
            "tissues": tuple(scan.response.tissues), "setting": setting,
            "order": model.config.network.sh_order_max}


def scan_loss(correction, item, corrected=None):
    """Weighted target distance of a window or volume ``[1, C, X, Y, Z]`` tensors."""
    prior, target, weight = item["prior"], item["target"], item["weight"]
    if corrected is None:
        corrected = prior
    n = min(target.shape[1], corrected.shape[1] - (len(item["tissues"]) - 1))
    _, scale = correction.inputs(prior, item["tissues"])
    error = ((corrected[:, :n] - target[:, :n]) / scale).pow(2).sum(1)
    return (error * weight).sum() / weight.sum().clamp_min(1e-6)


def as_tensors(item):
    def volume(array):
        return torch.as_tensor(array).permute(3, 0, 1, 2)[None].contiguous()
    return {"prior": volume(item["prior"]), "target": volume(item["target"]),
            "weight": torch.as_tensor(item["weight"])[None], "tissues": item["tissues"]}


def random_window(item, size, rng):
    """A window of ``size`` voxels whose inner part holds a weighted voxel."""
    weight = item["weight"][0]
    inside = np.argwhere(weight.numpy() > 0)
    centre = inside[rng.integers(len(inside))]
    shape = np.array(weight.shape)
    start = np.clip(centre - size // 2, 0, np.maximum(shape - size, 0))
    region = tuple(slice(s, s + size) for s in start)
    window = {"prior": item["prior"][(..., *region)], "target": item["target"][(..., *region)],
              "weight": item["weight"][(..., *region)].clone(), "tissues": item["tissues"]}
    # The border voxels lack neighbours the whole volume gives them: not scored.
    inner = torch.zeros_like(window["weight"])
    inner[:, 1:-1, 1:-1, 1:-1] = 1
    window["weight"] = window["weight"] * inner
    return window


@torch.no_grad()
def evaluate(correction, items):
    """Mean loss of the corrected prior and of the prior over whole held-aside scans."""
    correction.eval()
    network, prior = [], []
    for item in items:
        network.append(float(scan_loss(correction, item, correction(item["prior"],
                                                                     item["tissues"]))))
        prior.append(float(scan_loss(correction, item)))
    correction.train()
    return float(np.mean(network)), float(np.mean(prior))


def train(items, held, *, minutes, seed, lr, window, every, log, checkpoint=None):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    correction = PriorCorrection().zero_head()
    optimizer = torch.optim.Adam(correction.parameters(), lr=lr)
    best_loss, prior_loss = evaluate(correction, held)
    best = {k: v.clone() for k, v in correction.state_dict().items()}
    log(f"start: held-aside loss {best_loss:.5f} (prior {prior_loss:.5f})")
    start, step, history = time.process_time(), 0, [(0, best_loss, prior_loss)]
    deadline = time.monotonic() + 60 * minutes
    while (left := deadline - time.monotonic()) > 0:
        # Cosine decay of the learning rate over the time budget.
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * (1 - left / (60 * minutes))))
        item = items[rng.integers(len(items))]
        batch = random_window(item, window, rng)
        loss = scan_loss(correction, batch, correction(batch["prior"], batch["tissues"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % every == 0:
            held_loss, _ = evaluate(correction, held)
            history.append((step, held_loss, prior_loss))
            marker = ""
            if held_loss < best_loss:
                best_loss, marker = held_loss, " (best)"
                best = {k: v.clone() for k, v in correction.state_dict().items()}
                if checkpoint is not None:
                    checkpoint(correction, {"steps": step, "best_loss": best_loss})
            log(f"step {step}: train {loss.item():.5f}, held-aside {held_loss:.5f} "
                f"(prior {prior_loss:.5f}){marker}")
    correction.load_state_dict(best)
    return correction.eval(), {"steps": step, "cpu_seconds": time.process_time() - start,
                               "best_loss": best_loss, "prior_loss": prior_loss,
                               "history": history}


def settings_of(args):
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()}


DEV_ROWS = ("esdmri network-free (pretrained=False)", "esdmri linear prior alone",
            "esdmri pretrained alone", "esdmri default (pretrained + refinement)", "DIPY CSD")


def score_on_dev(weights, out, side, refine_steps=None):
    """``benchmarks/devset.py``'s dev split with the pretrained rows using ``weights``
    (and ``refine_steps`` for the refined row, default: the models' default)."""
    from . import devset, methods

    methods.PRETRAINED["pretrained"] = str(weights)
    if refine_steps is not None:
        methods.PRETRAINED["refine_steps"] = refine_steps
    devset.main(["--split", "dev", "--side", str(side), "--out", str(out),
                 "--rows", *DEV_ROWS])
    devset.main(["--report", str(out / "results-dev.json")])


def time_on_dev(weights, side, repeats):
    """Fit seconds and refinement steps of the network-free default and the pretrained
    path on the dev phantoms, interleaved in one process (their ratio is what counts
    on a shared machine)."""
    from .devset import FAMILIES, SNRS, make_family

    rows = []
    for family in FAMILIES:
        for snr in SNRS:
            phantom = make_family(family, side, snr, "dev")
            seconds = {False: [], True: []}
            steps = {}
            for _ in range(repeats):
                for weights_option in (False, str(weights)):
                    start = time.perf_counter()
                    fit = quiet_fit(phantom, pretrained=weights_option)
                    seconds[weights_option is not False].append(time.perf_counter() - start)
                    steps[weights_option is not False] = fit.refine_history.steps
            free, net = np.median(seconds[False]), np.median(seconds[True])
            rows.append([family, f"{snr:g}", f"{free:.1f}", f"{net:.1f}", f"{net / free:.2f}",
                         str(steps[False]), str(steps[True])])
    print(markdown(["family", "SNR", "network-free fit (s)", "pretrained fit (s)", "ratio",
                    "refinement steps: network-free", "pretrained"], rows))


def quiet_fit(phantom, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RTESDModel(phantom.gtab, verbose=False, **options).fit(phantom.data,
                                                                      mask=phantom.mask)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=24, help="cohort scans (training)")
    parser.add_argument("--held", type=int, default=3, help="held-aside cohort scans")
    parser.add_argument("--side", type=int, default=14, help="phantom edge (voxels)")
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall time")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--every", type=int, default=200,
                        help="steps between evaluations on the held-aside scans")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="weights file to write")
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    parser.add_argument("--dev", type=Path, metavar="WEIGHTS",
                        help="only score these weights on the dev phantoms")
    parser.add_argument("--dev-out", type=Path, default=Path("out/pretrain-dev"))
    parser.add_argument("--refine-steps", type=int,
                        help="with --dev: the refined row's step budget (default: the "
                             "models' default)")
    parser.add_argument("--timing", type=Path, metavar="WEIGHTS",
                        help="only time the fits of the dev phantoms with and without them")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    if args.dev:
        score_on_dev(args.dev, args.dev_out, args.side, args.refine_steps)
        return
    if args.timing:
        time_on_dev(args.timing, args.side, args.repeats)
        return
    if args.out is None:
        parser.error("--out is required to pretrain")
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists: give --force to overwrite it")

    def log(message):
        print(message, flush=True)

    cpu_start = time.process_time()
    settings = cohort_settings(args.scans + args.held, args.seed)
    items, rows = [], []
    for setting in settings:
        item = prepare_scan(setting, args.side)
        items.append(as_tensors(item))
        rows.append([setting["family"], setting["acquisition"], f"{setting['snr']:g}",
                     f"{setting['fa']:.2f}", str(item["order"]), ",".join(item["tissues"])])
        log(f"scan {len(items)}/{len(settings)}: {' '.join(rows[-1])}")
    cohort_cpu = time.process_time() - cpu_start
    print(markdown(["family", "acquisition", "SNR", "FA", "SH order", "tissues"], rows))
    def checkpoint(correction, progress):
        with staged_output(args.out) as temporary:
            save_correction(correction, temporary, {"settings": settings_of(args),
                                                    "cohort": settings, **progress})

    correction, summary = train(items[:args.scans], items[args.scans:], minutes=args.minutes,
                                seed=args.seed, lr=args.lr, window=args.window, every=args.every,
                                log=log, checkpoint=checkpoint)
    metadata = {"settings": settings_of(args), "cohort": settings,
                "architecture": ARCHITECTURE, "cohort_cpu_seconds": cohort_cpu,
                **{k: v for k, v in summary.items()}}
    with staged_output(args.out) as temporary:
        save_correction(correction, temporary, metadata)
    print(markdown(["cohort scans", "held-aside", "steps", "cohort CPU (s)", "training CPU (s)",
                    "held-aside loss: prior", "network"],
                   [[str(args.scans), str(args.held), str(summary["steps"]),
                     f"{cohort_cpu:.0f}", f"{summary['cpu_seconds']:.0f}",
                     f"{summary['prior_loss']:.5f}", f"{summary['best_loss']:.5f}"]]))
    print(f"wrote {args.out}, sha256 {sha256_of(args.out)}")


if __name__ == "__main__":
    main()
