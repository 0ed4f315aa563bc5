"""Build time and ground-truth make-up of the synthetic phantom.

Prints one table row per configuration: the best wall time of ``make_phantom``
over ``--repeats`` builds, the voxels in the mask, the voxels with 1, 2 and 3
fibres, and the crossing voxels (2 or 3 fibres) per 15-degree bin of the
smallest crossing angle.

Usage: python benchmarks/bench_phantom.py [--repeats 3]
"""

import argparse
import time

import numpy as np

from esdmri.sims import default_gtab, make_phantom

CONFIGS = [
    # shape, max_fibres, snr
    ((20, 20, 20), 3, 30),
    ((40, 40, 40), 2, 30),
    ((40, 40, 40), 3, 30),
    ((40, 40, 40), 3, None),
]
ANGLE_BINS = np.array([30, 45, 60, 75, 90])


def best_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    # The default gradient table is built once per process (charge repulsion).
    start = time.perf_counter()
    gtab = default_gtab()
    print(f"default_gtab (first call): {time.perf_counter() - start:.2f} s, "
          f"{len(gtab.bvals)} volumes\n")

    bin_names = [f"{low}-{high}" for low, high in zip(ANGLE_BINS[:-1], ANGLE_BINS[1:])]
    header = (f"{'shape':>10} {'fibres':>6} {'snr':>5} {'time_s':>7} {'mask':>6} "
              f"{'n=1':>6} {'n=2':>6} {'n=3':>6} " + " ".join(f"{b:>7}" for b in bin_names))
    print(header)
    print("-" * len(header))
    for shape, max_fibres, snr in CONFIGS:
        seconds, phantom = best_time(
            lambda: make_phantom(shape, gtab=gtab, snr=snr, max_fibres=max_fibres),
            args.repeats)
        counts = [np.count_nonzero(phantom.n_fibres == n) for n in (1, 2, 3)]
        crossing = phantom.crossing_angle[phantom.n_fibres >= 2]
        bins = np.histogram(crossing, ANGLE_BINS)[0]  # last bin includes 90
        print(f"{'x'.join(map(str, shape)):>10} {max_fibres:>6} {str(snr):>5} {seconds:>7.2f} "
              f"{phantom.mask.sum():>6} " + " ".join(f"{c:>6}" for c in counts) + " "
              + " ".join(f"{b:>7}" for b in bins))


if __name__ == "__main__":
    main()
