"""Streamlines through SH fODFs with DIPY's local tracking.

:func:`track` runs DIPY's ``LocalTracking`` with its deterministic or
probabilistic direction getter on fODF SH coefficients (DIPY's default basis,
as ``DeconvolutionFit.shm_coeff`` gives them); :func:`sh_peak_amplitude` is
the stopping map ``esdmri_track`` uses by default.
"""

import math

import numpy as np
from dipy.data import default_sphere
from dipy.direction import DeterministicMaximumDirectionGetter, ProbabilisticDirectionGetter
from dipy.reconst.shm import sh_to_sf
from dipy.tracking import utils
from dipy.tracking.local_tracking import LocalTracking
from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
from dipy.tracking.streamline import Streamlines, length

from esdmri.peaks import sh_order_from_coeffs
from esdmri.shm import legacy_to_descoteaux

TRACKERS = {"det": DeterministicMaximumDirectionGetter, "prob": ProbabilisticDirectionGetter}


def _non_legacy(shm_coeff):
    """Legacy descoteaux07 coefficients (what esdmri_fit writes) in DIPY's new basis.

    The same function (the bases differ by the sign of some m < 0
    coefficients), handed to DIPY with ``legacy=False``: DIPY warns that
    its legacy basis will be deprecated on every call that uses it.
    """
    return legacy_to_descoteaux(shm_coeff, sh_order_from_coeffs(shm_coeff.shape[-1]))


def _sh_to_sf_legacy(shm_coeff, sphere):
    return sh_to_sf(_non_legacy(shm_coeff), sphere,
                    sh_order_max=sh_order_from_coeffs(shm_coeff.shape[-1]),
                    basis_type="descoteaux07", legacy=False)


# The amplitude map is relative to this percentile of the voxels' peak
# amplitudes, so a few outlier voxels do not set the scale.
AMPLITUDE_REFERENCE_PERCENTILE = 99


def sh_peak_amplitude(shm_coeff, sphere=default_sphere):
    """Largest fODF value per voxel over its 99th percentile in the volume.

    The default stopping map of ``esdmri_track``. Unlike GFA, which does not
    depend on the fODF's scale (a deconvolved fODF is sharp everywhere, CSF
    included: GFA >= 0.75 in every voxel of DIPY's small_64D), the amplitude
    falls with the WM content of a voxel, so tracking stops in GM and CSF,
    like MRtrix3's fODF amplitude cutoff.

    Parameters
    ----------
    shm_coeff : ndarray, shape (X, Y, Z, C)
        Legacy ``descoteaux07`` coefficients.
    sphere : dipy Sphere

    Returns
    -------
    amplitude : ndarray, shape (X, Y, Z)
        >= 0; about 1 in the voxels of most WM, 0 where the fODF is not positive.
    """
    peak = np.clip(np.nan_to_num(_sh_to_sf_legacy(shm_coeff, sphere)).max(axis=-1), 0, None)
    positive = peak[peak > 0]
    if positive.size == 0:
        return peak
    return peak / np.percentile(positive, AMPLITUDE_REFERENCE_PERCENTILE)


def track(shm_coeff, affine, stop_map, threshold=0.2, seed_mask=None, tracker="det",
          step_size=0.5, max_angle=30.0, seed_density=1, pmf_threshold=0.1,
          min_length=10.0, max_length=250.0, random_seed=0):
    """Local tracking on SH fODFs with DIPY's direction getters.

    Parameters
    ----------
    shm_coeff : ndarray, shape (X, Y, Z, C)
        fODF SH coefficients in DIPY's default (legacy descoteaux07) basis.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS mm) transform of the grid.
    stop_map : ndarray, shape (X, Y, Z)
        Tracking continues where ``stop_map > threshold``
        (``ThresholdStoppingCriterion``).
    threshold : float
    seed_mask : ndarray of bool, shape (X, Y, Z), optional
        Seed voxels; default ``stop_map > threshold``.
    tracker : {"det", "prob"}
        ``DeterministicMaximumDirectionGetter`` or ``ProbabilisticDirectionGetter``.
    step_size : float
        Step in mm.
    max_angle : float
        Largest turn between steps, degrees.
    seed_density : int
        Seeds per voxel along each axis.
    pmf_threshold : float
        fODF values below this fraction of the voxel's maximum are not followed.
    min_length, max_length : float
        Streamline length limits in mm (shorter ones are dropped, longer ones
        stopped).
    random_seed : int
        Seed of the probabilistic tracker and of the initial directions.

    Returns
    -------
    streamlines : dipy.tracking.streamline.Streamlines
        In world (RAS mm) coordinates.
    """
    if tracker not in TRACKERS:
        raise ValueError(f"tracker must be one of {', '.join(TRACKERS)}, got {tracker!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0 mm, got {step_size}")
    if not 0 < max_angle <= 90:
        raise ValueError(f"max_angle must be in (0, 90] degrees, got {max_angle}")
    if not 0 <= min_length < max_length:
        raise ValueError(f"need 0 <= min_length < max_length, got {min_length} and "
                         f"{max_length}")
    stop_map = np.ascontiguousarray(stop_map, dtype=np.float64)
    if stop_map.shape != shm_coeff.shape[:3]:
        raise ValueError(f"the stopping map has shape {stop_map.shape} but the fODF grid "
                         f"is {shm_coeff.shape[:3]}")
    if seed_mask is None:
        seed_mask = stop_map > threshold
    elif seed_mask.shape != shm_coeff.shape[:3]:
        raise ValueError(f"the seed mask has shape {seed_mask.shape} but the fODF grid is "
                         f"{shm_coeff.shape[:3]}")
    if not np.any(seed_mask):
        raise ValueError("no seed voxel: the seed mask is empty (or, without one, no "
                         f"voxel of the stopping map exceeds threshold={threshold})")
    seeds = utils.seeds_from_mask(seed_mask, affine, density=[seed_density] * 3)
    getter = TRACKERS[tracker].from_shcoeff(
        _non_legacy(shm_coeff), max_angle=max_angle, sphere=default_sphere,
        pmf_threshold=pmf_threshold, basis_type="descoteaux07", legacy=False)
    generator = LocalTracking(
        getter, ThresholdStoppingCriterion(stop_map, threshold), seeds, affine,
        step_size=step_size, maxlen=int(math.ceil(max_length / step_size)),
        random_seed=random_seed)
    streamlines = Streamlines(generator)
    if len(streamlines):
        streamlines = streamlines[length(streamlines) >= min_length]
    return streamlines
