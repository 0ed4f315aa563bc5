"""Fit time and memory of RT-ESD's defaults on a 40^3 scan, at the resolved SH order and at 8.

The issue-15 goal is a 40^3 fit in at most 5 minutes on 2 cores. The phantom
is the held-out family's dev geometry 1003 at SNR 20 (3 shells x 64
directions, so the default SH order resolves to 12), responses estimated::

    python benchmarks/fit_time.py
"""

import resource
import time
import warnings

from esdmri import RTESDModel
from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.response import estimate_response


def main():
    phantom = make_heldout_phantom((40, 40, 40), snr=20, seed=20, geometry_seed=1003)
    response = estimate_response(phantom.gtab, phantom.data, phantom.mask)
    print("| sh_order_max | resolved | mask voxels | fit (s) | peak RSS so far (GiB) |")
    print("|---|---|---|---|---|")
    for order in (None, 8):
        model = RTESDModel(phantom.gtab, response, verbose=False, sh_order_max=order)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(phantom.data, phantom.mask)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"| {order} | {model.config.network.sh_order_max} | {int(phantom.mask.sum())} | "
              f"{time.perf_counter() - start:.0f} | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
