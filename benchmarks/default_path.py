"""Time of the default fit with and without the idle network, on a 40^3 scan.

With ``epochs=0`` and no loaded network the fit computes the linear prior
directly; before, it built the U-Net, probed its receptive radius and ran it
over every block only to add a zero-initialised correction. Both paths are
timed here in one process, interleaved (a model given an untrained network
by ``build_network`` takes the old path), on the held-out family's dev
geometry 1003 at SNR 20 (3 shells x 64 directions), responses estimated
once::

    python -m benchmarks.default_path --repeats 2
    python -m benchmarks.default_path --steps-only --repeats 3
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
    parser.add_argument("--steps-only", action="store_true",
                        help="time the prior and network steps, not the whole fits")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    phantom = make_heldout_phantom((args.size,) * 3, snr=20, seed=20, geometry_seed=1003)
    response = estimate_response(phantom.gtab, phantom.data, phantom.mask)
    model = RTESDModel(phantom.gtab, response, verbose=False)
    print(f"phantom and response: {time.perf_counter() - start:.0f} s; "
          f"{int(phantom.mask.sum())} mask voxels, sh_order_max "
          f"{model.config.network.sh_order_max}", flush=True)
    print("| repeat | step | seconds |")
    print("|---|---|---|", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = model.prepare(phantom.data, mask=phantom.mask)
        for repeat in range(args.repeats):
            rows = []
            prior, seconds = timed(lambda: model.prior_coefficients(scan))
            rows.append(("prior step (new)", seconds))
            network, seconds = timed(
                lambda: model.with_options().build_network().network_coefficients(scan))
            rows.append(("network step: build + probe + run (old)", seconds))
            if not args.steps_only:
                new, seconds = timed(lambda: model.fit(phantom.data, mask=phantom.mask))
                rows.append(("whole fit, no network (new default)", seconds))
                old, seconds = timed(lambda: model.with_options().build_network().fit(
                    phantom.data, mask=phantom.mask))
                rows.append(("whole fit, untrained network (old default)", seconds))
            for label, seconds in rows:
                print(f"| {repeat} | {label} | {seconds:.1f} |", flush=True)
            print(f"largest |prior - network| coefficient difference "
                  f"{float(np.abs(prior - network).max()):.2g}", flush=True)
            if not args.steps_only:
                print(f"largest |new - old| fODF coefficient difference "
                      f"{float(np.abs(new.shm_coeff - old.shm_coeff).max()):.2g}", flush=True)


if __name__ == "__main__":
    main()
