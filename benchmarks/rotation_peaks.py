"""How far a fit's main peaks are from rotating with q-space, in degrees.

A held-out phantom (:func:`esdmri.heldout_phantom.make_heldout_phantom`, SNR 20) is
fitted twice: with its gradient table, and with the gradient directions turned by a
random rotation ``R`` (the data unchanged, so the true fODFs turn by ``R``). Each
voxel's main peak of the first fit, turned by ``R``, is compared with the second
fit's: the angle is the fit's non-equivariance plus the peak search's. Rows: the
network-free and the pretrained fit, each alone (``refine_steps=0``) and refined
(the default), peaks at DIPY's vertices and refined between them
(:func:`esdmri.peaks.subvertex_directions`). "swaps": voxels whose two nearly equal
main lobes change order (angles above 30 degrees), left out of the mean beside them.

Usage::

    python -m benchmarks.rotation_peaks --side 10 --rotations 3 4
"""

import argparse
import warnings

import numpy as np
from dipy.core.gradients import gradient_table
from scipy.spatial.transform import Rotation

from esdmri import RTESDModel
from esdmri.heldout_phantom import make_heldout_phantom
from esdmri.peaks import peaks_from_sh

from .heldout import markdown

SWAP_ANGLE = 30.0


def main_peaks(gtab, phantom, subvertex_options, **options):
    """The main peak of every voxel of one fit, for each ``subvertex`` setting."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = RTESDModel(gtab, verbose=False, **options).fit(phantom.data, mask=phantom.mask)
    return {subvertex: peaks_from_sh(fit.shm_coeff_descoteaux07, subvertex=subvertex)[0][..., 0, :]
            for subvertex in subvertex_options}


def rows(side, seeds):
    phantom = make_heldout_phantom((side,) * 3, snr=20, seed=901, geometry_seed=900)
    scored = phantom.mask & (phantom.n_fibres > 0)
    table = []
    for seed in seeds:
        rotation = Rotation.random(random_state=seed).as_matrix()
        turned = gradient_table(phantom.gtab.bvals, bvecs=phantom.gtab.bvecs @ rotation.T)
        for pretrained in (False, True):
            for alone in (True, False):
                options = dict(pretrained=pretrained, **({"refine_steps": 0} if alone else {}))
                first, second = (main_peaks(gtab, phantom, (False, True), **options)
                                 for gtab in (phantom.gtab, turned))
                for subvertex in (False, True):
                    cosine = np.abs(np.sum((first[subvertex] @ rotation.T) * second[subvertex],
                                           axis=-1))
                    angle = np.degrees(np.arccos(np.clip(cosine, 0, 1)))[scored]
                    swapped = angle > SWAP_ANGLE
                    table.append([
                        str(seed), "pretrained" if pretrained else "network-free",
                        "alone" if alone else "refined (default)",
                        "sub-vertex" if subvertex else "vertex", str(int(scored.sum())),
                        f"{np.median(angle):.2f}", f"{angle[~swapped].mean():.2f}",
                        f"{np.percentile(angle, 90):.2f}", str(int(swapped.sum()))])
    return table


HEADER = ["rotation seed", "fit", "refinement", "peaks", "voxels", "median (deg)",
          "mean without swaps (deg)", "90th percentile (deg)", "swaps"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=10, help="phantom edge (voxels)")
    parser.add_argument("--rotations", type=int, nargs="+", default=[3, 4],
                        help="seeds of the random rotations")
    args = parser.parse_args(argv)
    print(markdown(HEADER, rows(args.side, args.rotations)))


if __name__ == "__main__":
    main()
