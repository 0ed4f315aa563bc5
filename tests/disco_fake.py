"""A small DiSCo phantom folder whose DWI is simulated from known fibres.

Laid out like the real download (``<data_home>/disco/disco_<N>``, same file
names, MRtrix3 ``tournier07`` ground-truth fODFs of SH order 12), but with a
DWI computed by DIPY's ``multi_tensor`` from the same fibres as the ground
truth, so that a deconvolution method run on it must recover them.
"""

import nibabel as nib
import numpy as np
from dipy.core.gradients import gradient_table
from dipy.data import get_sphere
from dipy.reconst.shm import sf_to_sh
from dipy.sims.voxel import multi_tensor

from esdmri.data_fetchers.disco import (
    BVALS_FILE,
    BVECS_FILE,
    GT_SH_ORDER,
    MRTRIX_GRAD_FILE,
    disco_folder,
    dwi_file_name,
)

FIBRE_EVALS = (1.7e-3, 0.3e-3, 0.3e-3)
S0 = 100.0
# Sharpness of the ground-truth lobes exp(kappa ((u.d)^2 - 1)): narrow enough
# that two lobes 60 degrees apart are separate peaks at SH order 12.
LOBE_KAPPA = 20.0


def disco_gradients(bvals=(1000.0, 3000.0), n_b0=4):
    """b0 volumes then one shell per b-value on DIPY's 100-point repulsion sphere."""
    directions = get_sphere(name="repulsion100").vertices
    bvecs = np.vstack([np.zeros((n_b0, 3))] + [directions] * len(bvals))
    all_bvals = np.concatenate([np.zeros(n_b0)] + [np.full(len(directions), b) for b in bvals])
    return all_bvals, bvecs


def _random_axis(rng):
    axis = rng.normal(size=3)
    return axis / np.linalg.norm(axis)


def _axis_at_angle(axis, angle_deg, rng):
    """A unit axis at `angle_deg` from `axis`, in a random plane containing it."""
    other = rng.normal(size=3)
    other -= (other @ axis) * axis
    other /= np.linalg.norm(other)
    angle = np.radians(angle_deg)
    return np.cos(angle) * axis + np.sin(angle) * other


def simulated_fibres(shape, rng, crossing_angles=(60.0, 90.0)):
    """Fibres of every voxel: one random axis for x < X/2, two crossing axes beyond.

    Returns
    -------
    fibres : dict
        Voxel index tuple -> (list of unit axes, list of signal fractions).
    """
    fibres = {}
    for voxel in np.ndindex(*shape):
        first = _random_axis(rng)
        if voxel[0] < shape[0] // 2:
            fibres[voxel] = ([first], [1.0])
        else:
            second = _axis_at_angle(first, rng.uniform(*crossing_angles), rng)
            fibres[voxel] = ([first, second], [0.5, 0.5])
    return fibres


def write_simulated_disco(data_home, phantom=1, resolution="high", snr=None,
                          shape=(6, 6, 4), seed=0):
    """Write a DiSCo-like phantom folder with a DWI simulated from its ground truth.

    The strands fill the volume but a one-voxel border, which is background
    (zero signal, outside the mask). Identity affine: voxel and scanner frames
    coincide.

    Parameters
    ----------
    data_home : Path
        esdmri data home; files go to ``<data_home>/disco/disco_<phantom>``.
    phantom : {1, 2, 3}
    resolution : {"high", "low"}
        Only names the files.
    snr : int or None
        Rician noise of standard deviation ``S0 / snr``; None: noise-free.
    shape : tuple of 3 int
    seed : int

    Returns
    -------
    fibres : dict
        Voxel index -> (axes, fractions) of every voxel inside the mask.
    """
    rng = np.random.default_rng(seed)
    folder = disco_folder(phantom, data_home)
    folder.mkdir(parents=True, exist_ok=True)
    bvals, bvecs = disco_gradients()
    np.savetxt(folder / BVALS_FILE, bvals[None], fmt="%.1f")
    np.savetxt(folder / BVECS_FILE, bvecs.T, fmt="%.8f")
    np.savetxt(folder / MRTRIX_GRAD_FILE, np.column_stack([bvecs, bvals]),
               header="mrtrix b table")

    mask = np.zeros(shape, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    inner = tuple(s - 2 for s in shape)
    fibres = {tuple(np.add(voxel, 1)): value
              for voxel, value in simulated_fibres(inner, rng).items()}

    sphere = get_sphere(name="repulsion724")
    data = np.zeros(shape + (bvals.size,))
    gtab = gradient_table(bvals, bvecs=bvecs)
    lobes = np.zeros(shape + (len(sphere.vertices),))
    for voxel, (axes, fractions) in fibres.items():
        data[voxel], _ = multi_tensor(
            gtab, np.tile(FIBRE_EVALS, (len(axes), 1)), S0=S0,
            angles=list(axes), fractions=[100 * f for f in fractions], snr=None)
        lobes[voxel] = sum(f * np.exp(LOBE_KAPPA * ((sphere.vertices @ axis) ** 2 - 1))
                           for axis, f in zip(axes, fractions))
    fodf = sf_to_sh(lobes, sphere, sh_order_max=GT_SH_ORDER, basis_type="tournier07",
                    legacy=False)
    if snr is not None:
        sigma = S0 / snr
        noisy = np.hypot(data + rng.normal(0, sigma, data.shape),
                         rng.normal(0, sigma, data.shape))
        data = np.where(mask[..., None], noisy, 0.0)

    affine = np.eye(4)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine),
             folder / dwi_file_name(phantom, resolution, snr))
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine),
             folder / f"{resolution}Res_DiSCo{phantom}_mask.nii.gz")
    nib.save(nib.Nifti1Image(fodf, affine),
             folder / f"{resolution}Res_DiSCo{phantom}_Strand_ODFs.nii.gz")
    return fibres
