"""Pretraining on simulated scans, then the dev scans fitted with it (issue 15's last route).

Issue 15 lists pretraining among the routes by which RT-ESD's network could
earn its place: train once on simulated scans spanning SNRs and tissue
mixtures, then fit each scan starting from those weights. This script
measures it on the held-out benchmark's dev phantoms only (geometry seed 101,
SNR 20 and 10, 20^3; the test phantoms are not built):

- the cohort: ``--subjects`` phantoms of the held-out family with their own
  geometries (seeds 300, 301, ...; neither dev nor test), SNR cycling through
  10, 20 and 30, the dev phantoms' gradient table, each with the responses
  ``estimate_response`` finds in it; written as NIfTI files and trained on
  with :func:`esdmri.reconst.group.train_group` (the unsupervised loss, or
  its masked, J-invariant variant with ``--mask-fraction``);
- on each dev scan, with that scan's own estimated responses in the loss and
  the refinement: the pretrained network alone; refined as the defaults
  refine; fine-tuned on the scan (``--finetune-epochs``, 100-window budget)
  and refined; against the defaults (no training) and the voxel-wise fit.

The table (the SH-order study's layout: one peak threshold per row, the best
mean success over both SNRs) is printed; results go to ``--out``::

    python -m benchmarks.pretrain_dev --subjects 8 --epochs 20
    python -m benchmarks.pretrain_dev --subjects 8 --epochs 20 --mask-fraction 0.5
"""

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


from esdmri import RTESDModel
from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.metrics import threshold_sweep
from esdmri.reconst.config import option_defaults
from esdmri.reconst.group import train_group
from esdmri.reconst.subjects import Subject
from esdmri.response import estimate_response

from . import heldout
from . import sh_order_dev

COHORT_GEOMETRY = 300
COHORT_NOISE = 5000
COHORT_SNRS = (10, 20, 30)


def write_cohort(root, n_subjects, shape):
    """Simulated scans on disk, each with its own estimated responses."""
    subjects = []
    for index in range(n_subjects):
        snr = COHORT_SNRS[index % len(COHORT_SNRS)]
        # Noise seeds of their own too: the dev phantoms' are their SNRs.
        phantom = make_heldout_phantom(shape, snr=snr, seed=COHORT_NOISE + index,
                                       geometry_seed=COHORT_GEOMETRY + index)
        folder = Path(root) / f"sub-{index:02d}"
        phantom.save(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            response = estimate_response(phantom.gtab, phantom.data, phantom.mask)
        subjects.append(Subject(folder / "dwi.nii.gz", gtab=phantom.gtab,
                                mask=folder / "mask.nii.gz", response=response))
    return subjects


def score(results, row, snr, phantom, mask, shm_coeff, seconds):
    sweep = threshold_sweep(np.where(mask[..., None], shm_coeff, 0), phantom.fibre_dirs, mask,
                            heldout.THRESHOLDS, threshold_deg=heldout.MATCH_ANGLE)
    results.setdefault(row, []).append(
        {"snr": snr, "seconds": seconds, "epochs": 0,
         "sweep": [{"all": heldout.summary(r["all"]), "crossing": heldout.summary(r["crossing"])}
                   for r in sweep["results"]]})
    print(f"SNR {snr} {row}: {seconds:.0f} s", flush=True)


def run(args):
    results = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        subjects = write_cohort(root, args.subjects, sh_order_dev.SHAPE)
        print(f"cohort of {len(subjects)} written in {time.perf_counter() - start:.0f} s",
              flush=True)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pretrained = train_group(subjects, model="rtesd", device=args.device,
                                     epochs=args.epochs, mask_fraction=args.mask_fraction,
                                     verbose=False)
    pretrain_seconds = time.perf_counter() - start
    history = pretrained.training_history
    print(f"pretrained {len(history)} epochs in {pretrain_seconds:.0f} s; loss "
          f"{history[0]['total']:.5f} -> {history[-1]['total']:.5f}", flush=True)
    refine_steps = option_defaults()["refine_steps"]
    for snr in sh_order_dev.DEV_SNRS:
        phantom = heldout.build_phantom(sh_order_dev.SHAPE, sh_order_dev.DEV_GEOMETRY, snr,
                                        "dev")
        scan = heldout.scan_of(phantom)
        mask = heldout.scored_voxels(phantom)

        def fit(model, **kwargs):
            begin = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = model.fit(scan.data, mask=scan.mask, **kwargs)
            return result.shm_coeff_descoteaux07, time.perf_counter() - begin

        for row, options in (("defaults (no training)", {}),
                             ("voxel-wise fit (epochs=0, refine_tv=0)", {"refine_tv": 0.0})):
            model = RTESDModel(scan.gtab, scan.response, verbose=False, device=args.device,
                               **options)
            score(results, row, snr, phantom, mask, *fit(model))
        # The pretrained network on this scan, its own responses in the loss.
        alone = pretrained.with_options(refine_steps=0).with_response(scan.response)
        score(results, "pretrained network alone", snr, phantom, mask, *fit(alone))
        refined = pretrained.with_options(refine_steps=refine_steps).with_response(
            scan.response)
        score(results, "pretrained + refinement", snr, phantom, mask, *fit(refined))
        if args.finetune_epochs:
            tuned = copy.deepcopy(pretrained).with_options(
                refine_steps=refine_steps, epochs=args.finetune_epochs,
                mask_fraction=args.mask_fraction, batch_size=1).with_response(scan.response)
            score(results, f"pretrained + {args.finetune_epochs} epochs on the scan + "
                  "refinement", snr, phantom, mask, *fit(tuned, retrain=True))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.out.with_suffix(".tmp")
        temporary.write_text(json.dumps({"pretrain_seconds": pretrain_seconds,
                                         "history": history, "results": results},
                                        default=float))
        temporary.replace(args.out)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs")
    parser.add_argument("--mask-fraction", type=float, default=0.0)
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("out/pretrain_dev.json"))
    parser.add_argument("--from-results", type=Path, metavar="JSON",
                        help="only print the table of a saved run")
    args = parser.parse_args(argv)
    if args.from_results:
        results = json.loads(args.from_results.read_text())["results"]
    else:
        results = run(args)
    print(sh_order_dev.table(results))


if __name__ == "__main__":
    main()
