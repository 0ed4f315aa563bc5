"""Peak memory of a deconvolution model fit on a clinical-size scan.

Issue 5 asks that a 96 x 96 x 60 scan of 100 volumes fits (training and
inference) within 8 GB of RAM on CPU. This script builds such a scan with
:func:`esdmri.sims.make_phantom` (4 b0 + 2 shells of 48 directions), fits a
model in a fresh process and reports the process's peak resident memory
(``ru_maxrss``) after loading the data, after training and after inference,
with the wall time of each step.

Usage::

    python benchmarks/bench_memory.py                 # RT-ESD, default settings
    python benchmarks/bench_memory.py --model esd --epochs 2
"""

import argparse
import gc
import time
from pathlib import Path

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges

SHAPE = (96, 96, 60)
N_B0 = 4
SHELLS = (1000.0, 2500.0)
DIRECTIONS_PER_SHELL = 48


def clinical_gtab(seed=0):
    """4 b0 + 2 shells x 48 directions (100 volumes), repulsion-spread directions."""
    rng = np.random.default_rng(seed)
    bvecs, bvals = [np.zeros((N_B0, 3))], [np.zeros(N_B0)]
    for bval in SHELLS:
        start = rng.normal(size=(DIRECTIONS_PER_SHELL, 3))
        start /= np.linalg.norm(start, axis=1, keepdims=True)
        hemisphere, _ = disperse_charges(HemiSphere(xyz=start), 500)
        bvecs.append(hemisphere.vertices)
        bvals.append(np.full(DIRECTIONS_PER_SHELL, bval))
    return gradient_table(np.concatenate(bvals), bvecs=np.concatenate(bvecs))


def reset_peak():
    """Restart the resident high-water mark at the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_gib():
    """Peak resident memory since the last :func:`reset_peak`, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("esd", "rtesd", "cesd"), default="rtesd")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the model's default)")
    args = parser.parse_args()

    from esdmri.reconst.models import MODEL_CLASSES
    from esdmri.shm import n_coeffs
    from esdmri.sims import make_phantom

    rows = []
    start = time.perf_counter()
    gtab = clinical_gtab()
    phantom = make_phantom(shape=SHAPE, gtab=gtab, snr=30)
    data, mask = phantom.data, phantom.mask
    response = phantom.response
    del phantom  # keep only what a user would hold: the scan and a mask
    gc.collect()
    rows.append(("scan built", time.perf_counter() - start, peak_gib()))

    options = {} if args.epochs is None else dict(epochs=args.epochs)
    model = MODEL_CLASSES[args.model](gtab, response, verbose=False, **options)
    epochs = model.config.training.epochs
    reset_peak()
    start = time.perf_counter()
    fit = model.fit(data, mask=mask)
    trained = len(model.training_history)
    rows.append((f"fit: train {trained}/{epochs} epoch(s) + infer + refine",
                 time.perf_counter() - start,
                 peak_gib()))
    reset_peak()
    start = time.perf_counter()
    fit = model.fit(data, mask=mask, retrain=False)
    rows.append(("infer again (trained model)", time.perf_counter() - start, peak_gib()))
    order = model.config.network.sh_order_max
    assert fit.shm_coeff.shape == SHAPE + (n_coeffs(order),)

    print(f"{args.model}: {SHAPE} x {data.shape[-1]} volumes, {int(mask.sum())} masked voxels, "
          f"SH order {order}")
    print(f"{'step':<36} {'seconds':>8} {'peak RSS (GiB)':>15}")
    # The scan build's peak includes the phantom's ground truth and temporaries.
    for name, seconds, gib in rows:
        print(f"{name:<36} {seconds:8.1f} {gib:15.2f}")


if __name__ == "__main__":
    main()
