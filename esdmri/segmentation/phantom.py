"""Synthetic lesion phantoms for voxel-wise segmentation of 6D dMRI.

Each volume is white-matter-like tissue with lesion blobs, built in a
canonical frame and then rotated as a whole (grid positions, fibre
orientations and lesion shapes together) by ``rotation``, so train/test
splits can hold the same anatomy at orientations never seen in training.

Canonical frame (coordinates in voxels from the volume centre):

* bundle A runs in the x-y plane along ``(cos t, sin t, 0)`` with ``t``
  turning linearly along x (a curved bundle: ``t = t0 + kappa x``, ``t0``
  within 30 degrees of x, ``|kappa| <= 0.06`` rad per voxel);
* bundle B runs within 25 degrees of z through a slab (thickness 3 to 6
  voxels, random normal in the x-y plane) where it takes up to half of the
  fibre signal: a crossing region;
* free water (diffusivity 3e-3 mm^2/s) in smooth patches, volume fraction
  up to 0.3, mimics partial volume with CSF;
* the fibre diffusivities vary per volume (+-10 % axial, +-15 % radial
  around ``wm_evals``) and smoothly in space (radial up to +-30 %, axial
  half of that), so healthy tissue does not have one mean diffusivity.

Lesions are ellipsoids (random semi-axes in ``lesion_radius``, random
orientation) with a smooth border and model partial demyelination with
oedema: inside, with the local severity ``e`` (0.3 to 0.8 in the core, per
lesion), each fibre's radial diffusivity rises by the factor ``1 +
radial_increase e``, its axial diffusivity falls by ``axial_decrease e``
(relative) and the free-water fraction rises by ``lesion_free_water e``. The
fibres keep their orientation, so lesions stay anisotropic; their contrast is
partly shared with the healthy free-water patches and diffusivity
variations, and telling them apart needs the shell dependence of the signal
(free water decays fast at every b-value, raised radial diffusivity only
across the fibres). A voxel is labelled lesion where it lies inside an
ellipsoid (the border profile is above one half).

Signal (``s0 = 100``, Rician noise of ``sigma = s0 / snr`` with DIPY's
``add_noise``)::

    S(b, g) = s0 ((1 - f_w) sum_k f_k exp(-b (l_perp + (l_par - l_perp) (g . d_k)^2))
                  + f_w exp(-b d_w))
"""

from dataclasses import dataclass

import numpy as np
from dipy.core.gradients import GradientTable
from dipy.sims.voxel import add_noise
from scipy.spatial.transform import Rotation

from esdmri.sims import random_directions

DEFAULT_SHAPE = (16, 16, 16)
FREE_WATER_DIFFUSIVITY = 3.0e-3
_MIN_SIDE = 8
# Smooth border widths (voxels) of lesions and the crossing slab.
_LESION_EDGE = 0.4
_SLAB_EDGE = 0.7
_MAX_FREE_WATER = 0.3
_DIFFUSIVITY_VARIATION = 0.3
_SEVERITY_RANGE = (0.3, 0.8)


@dataclass(eq=False)
class LesionPhantom:
    """A synthetic lesion volume with its ground truth.

    Attributes
    ----------
    data : ndarray, shape (X, Y, Z, N), float32
        Diffusion-weighted signal.
    gtab : dipy.core.gradients.GradientTable
        Acquisition of the N measurements (fixed in the scanner frame).
    labels : ndarray, shape (X, Y, Z), bool
        Lesion voxels.
    mask : ndarray, shape (X, Y, Z), bool
        Tissue voxels (the whole volume).
    severity : ndarray, shape (X, Y, Z)
        Local lesion severity ``e`` in [0, 1] (0 outside lesions).
    fibre_dirs : ndarray, shape (X, Y, Z, 2, 3)
        Unit directions of bundles A and B in the grid frame.
    fibre_fractions : ndarray, shape (X, Y, Z, 2)
        Share of the fibre signal of each bundle (sums to 1).
    free_water : ndarray, shape (X, Y, Z)
        Free-water volume fraction.
    rotation : ndarray, shape (3, 3)
        Rotation from the canonical frame to the grid frame.
    affine : ndarray, shape (4, 4)
        Voxel to world (mm), 1 mm isotropic.
    snr : float or None
    s0 : float
    """

    data: np.ndarray
    gtab: GradientTable
    labels: np.ndarray
    mask: np.ndarray
    severity: np.ndarray
    fibre_dirs: np.ndarray
    fibre_fractions: np.ndarray
    free_water: np.ndarray
    rotation: np.ndarray
    affine: np.ndarray
    snr: float | None
    s0: float = 100.0


def _check_shape(shape):
    shape = tuple(shape)
    if len(shape) != 3 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer))
                              or n < _MIN_SIDE for n in shape):
        raise ValueError(f"shape must be 3 ints >= {_MIN_SIDE}, got {shape}")
    return tuple(int(n) for n in shape)


def _check_range(values, name, low, integer=False):
    values = tuple(values)
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if (len(values) != 2 or not all(isinstance(v, kinds) and not isinstance(v, bool)
                                    for v in values) or not low <= values[0] <= values[1]):
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {values}")
    return values


def _check_rotation(rotation, rng):
    if rotation is None:
        return np.eye(3)
    if isinstance(rotation, str):
        if rotation != "random":
            raise ValueError(
                f"rotation must be None, 'random' or a (3, 3) matrix, got {rotation!r}")
        return Rotation.random(rng=rng).as_matrix()
    rotation = np.asarray(rotation, dtype=float)
    if (rotation.shape != (3, 3) or not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)
            or np.linalg.det(rotation) < 0):
        raise ValueError("rotation must be a proper rotation matrix (orthonormal, det +1)")
    return rotation


def _logistic(x):
    return 0.5 * (1 + np.tanh(0.5 * x))




def _fibre_field(points, rng):
    """Directions (P, 2, 3) and fractions (P, 2) of bundles A and B (canonical frame)."""
    t0 = rng.uniform(-np.pi / 6, np.pi / 6)
    kappa = rng.uniform(-0.06, 0.06)
    t = t0 + kappa * points[:, 0]
    dir_a = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], axis=-1)
    tilt, azimuth = np.radians(rng.uniform(0, 25)), rng.uniform(0, 2 * np.pi)
    dir_b = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
    normal_angle = rng.uniform(0, 2 * np.pi)
    normal = np.array([np.cos(normal_angle), np.sin(normal_angle), 0.0])
    half_thickness = rng.uniform(1.5, 3.0)
    offset = rng.uniform(-2, 2)
    slab = _logistic((half_thickness - np.abs(points @ normal - offset)) / _SLAB_EDGE)
    share_b = rng.uniform(0.35, 0.5) * slab
    dirs = np.stack([dir_a, np.broadcast_to(dir_b, dir_a.shape)], axis=1)
    fractions = np.stack([1 - share_b, share_b], axis=-1)
    return dirs, fractions


def _smooth_patches(points, rng, radius, amplitude_range, n_range=(1, 3)):
    """Sum of random Gaussian bumps (widths 2 to 4 voxels) inside the ball."""
    n_patches = rng.integers(n_range[0], n_range[1] + 1)
    centres = random_directions(rng, n_patches) * rng.uniform(0, radius, size=(n_patches, 1))
    widths = rng.uniform(2.0, 4.0, size=n_patches)
    amplitudes = rng.uniform(*amplitude_range, size=n_patches)
    distance2 = np.sum((points[:, None] - centres[None]) ** 2, axis=-1)
    return np.sum(amplitudes * np.exp(-distance2 / (2 * widths**2)), axis=1)


def _lesions(points, rng, n_lesions, lesion_radius, radius):
    """Inside-profile (P,) in [0, 1] and severity (P,) of random ellipsoids."""
    count = rng.integers(n_lesions[0], n_lesions[1] + 1)
    profile = np.zeros(len(points))
    severity = np.zeros(len(points))
    for _ in range(count):
        radii = rng.uniform(*lesion_radius, size=3)
        # Centres stay inside the ball that every rotation keeps in the grid.
        reach = max(radius - radii.max() - 1.0, 0.0)
        centre = random_directions(rng) * reach * rng.uniform(0, 1) ** (1 / 3)
        axes = Rotation.random(rng=rng).as_matrix()
        local = (points - centre) @ axes / radii
        rho = np.linalg.norm(local, axis=1)
        inside = _logistic((1 - rho) * radii.min() / _LESION_EDGE)
        strength = rng.uniform(*_SEVERITY_RANGE)
        severity = np.maximum(severity, strength * inside)
        profile = np.maximum(profile, inside)
    return profile, severity


def make_lesion_phantom(shape=DEFAULT_SHAPE, gtab=None, snr=20, n_lesions=(1, 3),
                        lesion_radius=(1.5, 3.0), rotation=None, seed=0, *, s0=100.0,
                        wm_evals=(1.7e-3, 0.3e-3), radial_increase=1.5, axial_decrease=0.15,
                        lesion_free_water=0.15):
    """Build one lesion phantom.

    Parameters
    ----------
    shape : tuple of 3 int, optional
        Grid size (1 mm voxels), at least 8 per axis.
    gtab : dipy.core.gradients.GradientTable, optional
        Acquisition; ``esdmri.sims.default_gtab()`` if None.
    snr : float or None, optional
        ``s0 / sigma`` of the Rician noise; None for noise-free data.
    n_lesions : (int, int), optional
        Range of the number of lesions (inclusive).
    lesion_radius : (float, float), optional
        Range of the ellipsoid semi-axes in voxels.
    rotation : None, "random" or ndarray (3, 3), optional
        Rotation of the whole volume from the canonical frame (None: identity).
    seed : int or numpy.random.Generator, optional
    s0 : float, optional
        Signal at b = 0.
    wm_evals : (float, float), optional
        Mean axial and radial fibre diffusivity (mm^2/s).
    radial_increase : float, optional
        Relative rise of the radial diffusivity at severity 1 (demyelination).
    axial_decrease : float, optional
        Relative fall of the axial diffusivity at severity 1 (axonal damage).
    lesion_free_water : float, optional
        Rise of the free-water fraction at severity 1 (oedema).

    Returns
    -------
    phantom : LesionPhantom
    """
    shape = _check_shape(shape)
    if gtab is None:
        from esdmri.sims import default_gtab

        gtab = default_gtab()
    if not isinstance(gtab, GradientTable):
        raise TypeError(f"gtab must be a dipy GradientTable, got {type(gtab).__name__}")
    if snr is not None and not (np.isfinite(snr) and snr > 0):
        raise ValueError(f"snr must be positive or None, got {snr!r}")
    n_lesions = _check_range(n_lesions, "n_lesions", 0, integer=True)
    lesion_radius = _check_range(lesion_radius, "lesion_radius", 0.5)
    for name, value, high in (("radial_increase", radial_increase, np.inf),
                              ("axial_decrease", axial_decrease, 1.0),
                              ("lesion_free_water", lesion_free_water, 1.0)):
        if not (np.isfinite(value) and 0 <= value) or value >= high:
            raise ValueError(f"{name} must be in [0, {high}), got {value!r}")
    rng = np.random.default_rng(seed)
    rotation = _check_rotation(rotation, rng)

    centre = (np.array(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    # Canonical coordinates of every voxel: x_canonical = R^T (x - centre).
    points = (grid.reshape(-1, 3) - centre) @ rotation
    radius = min(shape) / 2

    dirs, fractions = _fibre_field(points, rng)
    free_water = np.clip(_smooth_patches(points, rng, radius, (0.1, _MAX_FREE_WATER)),
                         0, _MAX_FREE_WATER)
    # Smoothly varying fibre diffusivities: healthy tissue is not uniform either.
    swelling = np.clip(_smooth_patches(points, rng, radius, (-_DIFFUSIVITY_VARIATION,
                                                             _DIFFUSIVITY_VARIATION), (2, 4)),
                       -_DIFFUSIVITY_VARIATION, _DIFFUSIVITY_VARIATION)
    profile, severity = _lesions(points, rng, n_lesions, lesion_radius, radius)
    free_water = np.clip(free_water + lesion_free_water * severity, 0, 1)
    axial = wm_evals[0] * rng.uniform(0.9, 1.1) * (1 + 0.5 * swelling)
    radial = wm_evals[1] * rng.uniform(0.85, 1.15) * (1 + swelling)
    axial = axial * (1 - axial_decrease * severity)
    radial = radial * (1 + radial_increase * severity)

    dirs = dirs @ rotation.T  # to the grid frame
    bvals = np.asarray(gtab.bvals, dtype=float)
    bvecs = np.asarray(gtab.bvecs, dtype=float)
    cosine2 = np.einsum("pkc,nc->pkn", dirs, bvecs) ** 2
    fibre_signal = np.einsum("pk,pkn->pn", fractions, np.exp(
        -bvals * (radial[:, None, None] + (axial - radial)[:, None, None] * cosine2)))
    signal = s0 * ((1 - free_water)[:, None] * fibre_signal
                   + free_water[:, None] * np.exp(-bvals * FREE_WATER_DIFFUSIVITY))
    signal = add_noise(signal, snr, s0, noise_type="rician", rng=rng)

    return LesionPhantom(
        data=signal.reshape(shape + (-1,)).astype(np.float32), gtab=gtab,
        labels=(profile > 0.5).reshape(shape), mask=np.ones(shape, dtype=bool),
        severity=severity.reshape(shape), fibre_dirs=dirs.reshape(shape + (2, 3)),
        fibre_fractions=fractions.reshape(shape + (2,)), free_water=free_water.reshape(shape),
        rotation=rotation, affine=np.eye(4), snr=None if snr is None else float(snr), s0=s0)


def make_lesion_dataset(n_volumes, shape=DEFAULT_SHAPE, gtab=None, snr=20, rotate=False,
                        seed=0, **kwargs):
    """Independent lesion phantoms, optionally each randomly rotated.

    Parameters
    ----------
    n_volumes : int
    shape, gtab, snr : see :func:`make_lesion_phantom`
    rotate : bool, optional
        Rotate each whole volume by a uniformly random rotation (test
        splits); False keeps the canonical frame (training splits).
    seed : int, optional
        Volumes get independent streams spawned from it.
    **kwargs
        Passed to :func:`make_lesion_phantom`.

    Returns
    -------
    phantoms : list of LesionPhantom
    """
    if isinstance(n_volumes, bool) or not isinstance(n_volumes, (int, np.integer)) or n_volumes < 1:
        raise ValueError(f"n_volumes must be a positive int, got {n_volumes!r}")
    if gtab is None:
        from esdmri.sims import default_gtab

        gtab = default_gtab()
    streams = np.random.SeedSequence(seed).spawn(int(n_volumes))
    return [make_lesion_phantom(shape, gtab, snr, rotation="random" if rotate else None,
                                seed=np.random.default_rng(stream), **kwargs)
            for stream in streams]
