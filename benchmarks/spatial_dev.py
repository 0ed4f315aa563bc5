"""Dev-phantom trials of spatial coupling in RT-ESD (issue 15).

Settings of the spatially coupled refinement (``refine_tv`` and friends) are
chosen here, on dev phantoms only; the held-out test phantoms of
``benchmarks/heldout.py`` are not looked at.

The dev phantoms are not the deconvolution model with its own responses:
by default :func:`esdmri.heldout_phantom.make_heldout_phantom` with dev
geometry seeds (1000 + ``--seed``; the held-out benchmark's test seeds are
never used); with ``--phantom blend``, two noise-free
:func:`esdmri.sims.make_phantom` volumes with different WM
diffusivities are blended by a smooth spatial field (axial 1.5 to 2.0e-3,
radial 0.4 to 0.25e-3 mm^2/s), then Rician noise is added at the given SNR,
and every method gets responses estimated from the noisy data
(:func:`esdmri.response.estimate_response`). Peaks: relative threshold
0.25, 20 degrees apart, matched within 25 degrees (the held-out protocol).

The network is trained once per phantom; each refinement variant then starts
from the linear prior and from the trained network. Variants: ``voxel``
(``refine_tv=0``, 100 steps) or ``tv<weight>[s][x<steps>][d<smoothing>][l<lr>]
[t<tolerance>]`` (``s``: similarity weights).

Usage (the runs recorded in docs/benchmarks.md)::

    nice -n 5 python benchmarks/spatial_dev.py --seed 2 --epochs 5 --csd \
        --variants voxel tv10x300 tv20x300 tv40x300 tv20sx300 tv20x500t1e-3 tv20x500t3e-4
    nice -n 5 python benchmarks/spatial_dev.py --phantom blend --epochs 3 --csd \
        --starts prior --variants voxel tv5x300 tv10x300 tv20x300 tv40x300 tv20sx300
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

WM_EVALS = ((1.5e-3, 0.4e-3, 0.4e-3), (2.0e-3, 0.25e-3, 0.25e-3))
PEAK_THRESHOLD = 0.25
SEPARATION = 20


def heldout_dev_phantom(size, snr, seed):
    """A held-out-family phantom of a dev geometry (seeds 1000 + seed, never a test's)."""
    from esdmri.heldout_phantom import make_heldout_phantom

    phantom = make_heldout_phantom((size,) * 3, snr=snr, seed=1000 + seed,
                                   geometry_seed=1000 + seed)
    return phantom, phantom.data.astype(np.float32)


def dev_phantom(size, snr, seed):
    """Blend of two diffusivities' phantoms, Rician noise; returns (phantom, data)."""
    from esdmri.sims import make_phantom

    a, b = (make_phantom((size,) * 3, snr=None, wm_evals=evals, seed=seed)
            for evals in WM_EVALS)
    x, y, z = np.meshgrid(*(np.linspace(0, 1, size),) * 3, indexing="ij")
    blend = (0.5 + 0.35 * np.sin(2.5 * x + 1.3 * y + seed) * np.cos(1.7 * z - seed))[..., None]
    clean = blend * a.data + (1 - blend) * b.data
    rng = np.random.default_rng(1000 + seed)
    sigma = 100.0 / snr
    noisy = np.hypot(clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape))
    return a, noisy.astype(np.float32)


def score(phantom, shm_coeff):
    from esdmri.metrics import threshold_sweep

    fibres = phantom.mask & (phantom.n_fibres >= 1)
    result = threshold_sweep(np.where(fibres[..., None], shm_coeff, 0), phantom.fibre_dirs,
                             fibres, thresholds=[PEAK_THRESHOLD],
                             min_separation_angle=SEPARATION)["results"][0]
    return dict(ae=result["all"]["angular_error"], ae_x=result["crossing"]["angular_error"],
                success=result["all"]["success_rate"],
                success_x=result["crossing"]["success_rate"],
                fp=result["all"]["fp_rate"], fn=result["all"]["fn_rate"])


def fit_rumba_tv(phantom, data):
    """DIPY RUMBA-SD with total variation, WM tensor from DIPY's auto_response_ssst."""
    from dipy.core.gradients import gradient_table
    from dipy.data import get_sphere
    from dipy.reconst.csdeconv import auto_response_ssst
    from dipy.reconst.rumba import RumbaSDModel
    from dipy.reconst.shm import sf_to_sh

    from esdmri.shm import legacy_to_descoteaux

    gtab = phantom.gtab
    b1000 = (gtab.bvals < 50) | (np.abs(gtab.bvals - 1000) < 100)
    sub = gradient_table(gtab.bvals[b1000], bvecs=gtab.bvecs[b1000])
    inside = np.where(phantom.mask[..., None], data[..., b1000], 0)
    (evals, _), _ = auto_response_ssst(sub, inside, roi_radii=10, fa_thr=0.7)
    sphere = get_sphere(name="repulsion724")
    model = RumbaSDModel(gtab, wm_response=np.asarray(evals), voxelwise=False, use_tv=True,
                         sphere=sphere)
    fit = model.fit(data.astype(float), mask=phantom.mask)
    odf = fit.odf(sphere)
    coeff = sf_to_sh(odf, sphere, sh_order_max=8, basis_type="descoteaux07")
    return np.where(phantom.mask[..., None], legacy_to_descoteaux(coeff, 8), 0)


def network_stages(phantom, data, response, epochs, model_name, seed, device="cpu",
                   **model_options):
    """Linear prior and trained network coefficients (unrefined), with train time."""
    import torch

    from esdmri.reconst.models import MODEL_CLASSES

    torch.manual_seed(seed)
    model = MODEL_CLASSES[model_name](phantom.gtab, response, epochs=max(epochs, 1),
                                      refine_steps=0, verbose=False, seed=seed,
                                      device=device, **model_options)
    scan = model.prepare(data, mask=phantom.mask)
    prior = model.prior_coefficients(scan)
    start = time.perf_counter()
    model.train(scan, max_steps=model.config.training.train_windows)
    trained = model.network_coefficients(scan)
    seconds = time.perf_counter() - start
    return model, scan.normalized, scan.mask, prior, trained, seconds


VARIANTS = {
    # name: refine_coefficients keyword arguments
    "voxel": dict(steps=100),
    "voxel300": dict(steps=300),
}


def parse_variant(name):
    """A named variant, or ``tv<weight>[s][x<steps>][d<smoothing>][l<lr>][t<tolerance>]``."""
    if name in VARIANTS:
        return VARIANTS[name]
    import re
    pattern = (r"tv([0-9.e-]+?)(s?)(?:x(\d+))?(?:d([0-9.e-]+?))?(?:l([0-9.e-]+?))?"
               r"(?:t([0-9.e-]+))?")
    match = re.fullmatch(pattern, name)
    if not match:
        raise ValueError(f"unknown variant {name}")
    weight, sim, steps, smooth, lr, tolerance = match.groups()
    kwargs = dict(steps=int(steps or 100), total_variation=float(weight), similarity=bool(sim))
    if smooth:
        kwargs["smoothing"] = float(smooth)
    if lr:
        kwargs["lr"] = float(lr)
    if tolerance:
        kwargs["tolerance"] = float(tolerance)
    return kwargs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--snr", type=float, nargs="+", default=[10, 20])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", default="rtesd")
    parser.add_argument("--variants", nargs="+", default=["voxel", "tv3e-4", "tv1e-3"])
    parser.add_argument("--starts", nargs="+", default=["prior", "network"])
    parser.add_argument("--rumba", action="store_true")
    parser.add_argument("--csd", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-tv", type=float, default=0.0,
                        help="total_variation weight of the training loss")
    parser.add_argument("--spatial-layers", type=int, default=1)
    parser.add_argument("--phantom", choices=("heldout", "blend"), default="heldout")
    args = parser.parse_args()

    import torch

    from esdmri.baselines import fit_csd
    from esdmri.reconst.network import build_fodf_sampler, build_forward_model
    from esdmri.response import estimate_response
    from esdmri.reconst.refine import refine_coefficients
    from esdmri.shm import n_coeffs

    rows = []

    def report(snr, label, seconds, shm, steps=None):
        row = dict(steps=steps, snr=snr, seed=args.seed, size=args.size, method=label,
                   seconds=round(seconds, 1), **score(phantom, shm))
        rows.append(row)
        print(f"SNR {snr:g} | {label:40s} | {seconds:6.1f} s | AE {row['ae']:.1f} | "
              f"AE x {row['ae_x']:.1f} | succ {row['success']:.2f} | succ x "
              f"{row['success_x']:.2f} | FP {row['fp']:.2f} | FN {row['fn']:.2f}"
              + (f" | {steps} steps" if steps is not None else ""), flush=True)

    for snr in args.snr:
        make = heldout_dev_phantom if args.phantom == "heldout" else dev_phantom
        phantom, data = make(args.size, snr, args.seed)
        response = estimate_response(phantom.gtab, data, phantom.mask)
        if args.csd:
            start = time.perf_counter()
            shm = fit_csd(phantom.gtab, data, response, mask=phantom.mask, bval=2000)
            report(snr, "DIPY CSD (b 2000)", time.perf_counter() - start, shm)
        if args.rumba:
            start = time.perf_counter()
            shm = fit_rumba_tv(phantom, data)
            report(snr, "DIPY RUMBA-SD TV", time.perf_counter() - start, shm)
        model, normalized, inside, prior, trained, seconds = network_stages(
            phantom, data, response, args.epochs, args.model, args.seed, args.device,
            train_tv=args.train_tv, spatial_layers=args.spatial_layers)
        n_wm = n_coeffs(model.config.network.sh_order_max)
        starts = {"prior": prior, "network": trained}
        for start_name in args.starts:
            report(snr, f"{start_name} alone", seconds if start_name == "network" else 0,
                   starts[start_name][..., :n_wm])
            for variant in args.variants:
                kwargs = parse_variant(variant)
                begin = time.perf_counter()
                with torch.no_grad():
                    refined, history = refine_coefficients(
                        starts[start_name], normalized, inside,
                        build_forward_model(model.response, model.gtab,
                                            model.config.network.sh_order_max).matrix,
                        build_fodf_sampler(model.config.network.sh_order_max), n_wm,
                        model.config.network.sh_order_max,
                        model.config.training.loss_weights, **kwargs)
                check_every = kwargs.get("check_every", 10)
                report(snr, f"{start_name} + {variant}", time.perf_counter() - begin,
                       refined[..., :n_wm], steps=min((len(history) - 1) * check_every,
                                                      kwargs["steps"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
