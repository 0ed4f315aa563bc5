"""Time of the default fit with and without the idle network, on a 40^3 scan.

With ``epochs=0`` and no loaded network the fit computes the linear prior
directly; before, it built the U-Net, probed its receptive radius and ran it
over every block only to add a zero-initialised correction. Both paths are
timed here in one process, interleaved (a model given an untrained network
by ``build_network`` takes the old path), on the held-out family's dev
geometry 1003 at SNR 20 (3 shells x 64 directions), responses estimated
once::

    python -m benchmarks.default_path --repeats 2
"""

import argparse
import time
import warnings

import numpy as np

from esdmri import RTESDModel
from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.response import estimate_response


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    phantom = make_heldout_phantom((args.size,) * 3, snr=20, seed=20, geometry_seed=1003)
    response = estimate_response(phantom.gtab, phantom.data, phantom.mask)
    model = RTESDModel(phantom.gtab, response, verbose=False)
    rows = {"prior step": [], "network step (build + probe + run)": [],
            "whole fit, no network (new default)": [],
            "whole fit, untrained network (old default)": []}
    largest = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = model.prepare(phantom.data, mask=phantom.mask)
        for _ in range(args.repeats):
            prior, seconds = timed(lambda: model.prior_coefficients(scan))
            rows["prior step"].append(seconds)
            network, seconds = timed(
                lambda: model.with_options().build_network().network_coefficients(scan))
            rows["network step (build + probe + run)"].append(seconds)
            largest = max(largest, float(np.abs(prior - network).max()))
            new, seconds = timed(lambda: model.fit(phantom.data, mask=phantom.mask))
            rows["whole fit, no network (new default)"].append(seconds)
            old, seconds = timed(lambda: model.with_options().build_network().fit(
                phantom.data, mask=phantom.mask))
            rows["whole fit, untrained network (old default)"].append(seconds)
            largest_fit = float(np.abs(new.shm_coeff - old.shm_coeff).max())
    print(f"{int(phantom.mask.sum())} mask voxels, sh_order_max "
          f"{model.config.network.sh_order_max}; largest |prior - network| coefficient "
          f"difference {largest:.2g}, of the whole fits {largest_fit:.2g}")
    print("| step | times (s) | median (s) |")
    print("|---|---|---|")
    for label, times in rows.items():
        print(f"| {label} | {', '.join(f'{t:.1f}' for t in times)} | "
              f"{np.median(times):.1f} |", flush=True)


if __name__ == "__main__":
    main()
