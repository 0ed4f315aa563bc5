"""The scan's noise level against the generator's, per phantom family (issue 26).

``noise_floor_variance`` (what ``noise_floor="power"``, ``"rician_mean"`` and
``"model"`` use) measures ``sigma`` on the b0 volumes. Beside it the estimate it
replaced: half the median over face-neighbour pairs of the mean squared difference
of all their measurements (:func:`esdmri.reconst.refine.noise_variance`, still the
refinement's coupling scale), and the same statistic on the noise-free phantom (the
part of it that is signal, not noise). The phantoms are ``benchmarks/devset.py``'s;
the true ``sigma`` is ``s0 / SNR``. Prints a markdown table.

Usage::

    python -m benchmarks.bench_noise_sigma --split dev
"""

import argparse
import warnings

import numpy as np
import torch

from esdmri.reconst.inputs import noise_floor_variance
from esdmri.reconst.losses import neighbour_pairs
from esdmri.reconst.refine import noise_variance, pair_distances

from .devset import FAMILIES, SPLITS, make_family


def neighbour_sigma(data, mask, first, second):
    """``sigma`` from all measurements' face-neighbour differences (the former estimate)."""
    measured = torch.as_tensor(np.asarray(data, dtype=np.float64)[mask])
    return float(np.sqrt(noise_variance(pair_distances(measured, first, second))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="dev")
    parser.add_argument("--side", type=int, default=14, help="phantom edge (voxels)")
    parser.add_argument("--snrs", type=float, nargs="+", default=[10, 20, 30])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| family | b0 volumes | SNR | true sigma | all-measurement pairs (former) "
          "| signal part of the former (noise-free phantom) | b0 volumes (current) |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families:
        for snr in args.snrs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                phantom = make_family(family, args.side, snr, args.split)
                clean = make_family(family, args.side, np.inf, args.split)
            first, second = neighbour_pairs(torch.as_tensor(phantom.mask))
            former = neighbour_sigma(phantom.data, phantom.mask, first, second)
            signal_part = neighbour_sigma(clean.data, phantom.mask, first, second)
            current = np.sqrt(noise_floor_variance(phantom.data, phantom.gtab, phantom.mask))
            true = getattr(phantom, "s0", 100.0) / snr
            print(f"| {family} | {int(phantom.gtab.b0s_mask.sum())} | {snr:g} | {true:.2f} "
                  f"| {former:.2f} | {signal_part:.2f} | {current:.2f} |", flush=True)


if __name__ == "__main__":
    main()
