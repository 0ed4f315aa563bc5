"""Synthetic multi-shell crossing-fibre phantom: the offline default data set.

The phantom is a brain-like ellipsoid on a 1 mm isotropic grid. The layout is
given here for 40^3 and scales with the smallest side of the grid. Five fibre
bundles run through the white matter (WM), all crossing a central ribbon:

* a straight ribbon along x in the plane y = 0 (cross-section 7 x 21 voxels),
* a circular arc inside the ribbon's plane whose tangent turns from the
  smallest to the largest angle of ``crossing_angles`` while it runs down
  through the ribbon, so its crossings with the ribbon cover the whole range,
* a straight tube (radius 3.5) through the centre, where ribbon, arc and tube
  cross pairwise at the middle angle (the tube is tilted out of the x-y plane
  to make the three angles equal): the three-fibre voxels,
* two straight tubes in the x-y planes z = -7 and z = 7 crossing the ribbon
  beside the arc at 3/8 and 5/8 of the angle range.

Bundle density is 1 in the core and falls to 0.3 at the border, so the white
matter (WM) fraction is lower at bundle borders. The bundles fade out in a
grey matter (GM) cortex under a thin cerebrospinal fluid (CSF) rim; a CSF
ventricle sits below the bundles. Everything inside the brain that is not
WM or CSF is GM. Where bundles overlap at an angle outside ``crossing_angles``
(their ends, the arc beyond the ribbon) or beyond ``max_fibres``, only the
densest fibres are kept, so every crossing in the ground truth lies in the
requested range.

Signal per voxel (``s0`` defaults to 100, so ``sigma = s0 / snr`` is in the
same units as the data)::

    S(b, g) = s0 * (f_wm * sum_k w_k exp(-b g^T D_k g)
                    + f_gm exp(-b d_gm) + f_csf exp(-b d_csf))

with ``D_k`` the axially symmetric tensor of fibre ``k`` (eigenvalues
``wm_evals``, principal axis along the bundle, the arc's tangent on curved
bundles), ``w_k`` the fibre fractions and ``f_*`` the tissue fractions. Rician
noise of standard deviation ``sigma`` in each channel is added everywhere,
background included (where it is Rayleigh). The exact multi-tissue response
of this model is kept as ground truth: with the fODF of each fibre a delta
function, ``TissueResponse.forward_matrices`` reproduces the noise-free signal
when the b-values are exactly shelled (as in :func:`default_gtab`).
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.core.geometry import normalized_vector
from dipy.core.gradients import GradientTable, gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges
from dipy.io.gradients import read_bvals_bvecs
from dipy.sims.voxel import add_noise
from scipy.spatial.transform import Rotation

from esdmri.atomic import output_transaction, staged_output
from esdmri.response import TissueResponse
from esdmri.shm import b0_mask, group_shells

DEFAULT_SHELL_BVALS = (1000.0, 2000.0, 3000.0)
DEFAULT_N_B0 = 4
DEFAULT_N_DIRECTIONS = 64
TISSUES = ("wm", "gm", "csf")
MAX_FIBRES = 3
MIN_SHAPE = 8

# Fixed seed of the default acquisition: the same gradient table every time.
_GTAB_SEED = 20210401
_CHARGE_ITERATIONS = 3000

# Layout of the 40^3 reference phantom, in voxels (scaled with the shape).
_REFERENCE_SIDE = 40.0
_BRAIN_RADIUS_FRACTION = 0.46
_CSF_RIM_THICKNESS = 1.0
_CORTEX_THICKNESS = 2.5
_TUBE_RADIUS = 3.5
_RIBBON_HALF_HEIGHT = 10.5
# Heights of the outer tubes, one tube diameter from the middle one.
_TUBE_LEVELS = (-7.0, 7.0)
# Clearance between an outer tube's crossing and the arc, and its limit.
_GAP = 0.5
_MAX_OFFSET = 14.0
# Caps the arc for narrow angle ranges, where it would be nearly straight.
_ARC_MAX_RADIUS = 80.0
_VENTRICLE_CENTRE = (0.0, 6.5, -12.0)
_VENTRICLE_RADII = (7.0, 3.5, 3.0)

# Bundle density is 1 within half the radius and falls smoothly to this at
# the border: crossing fractions stay above about 0.2.
_BORDER_DENSITY = 0.3
# Below these, a bundle or the WM is treated as absent from a voxel.
_MIN_BUNDLE_DENSITY = 0.05
_MIN_WM_FRACTION = 0.02
# Volumes given their noise at a time.
_NOISE_CHUNK = 16
# Slack on the crossing-angle range for directions built at its end points.
_ANGLE_TOLERANCE = 1e-6


@lru_cache(maxsize=1)
def _shell_directions():
    """Well-spread unit vectors, one differently rotated set per shell."""
    rng = np.random.default_rng(_GTAB_SEED)
    start = rng.normal(size=(DEFAULT_N_DIRECTIONS, 3))
    start /= np.linalg.norm(start, axis=1, keepdims=True)
    hemisphere, _ = disperse_charges(HemiSphere(xyz=start), _CHARGE_ITERATIONS)
    rotations = Rotation.random(len(DEFAULT_SHELL_BVALS), rng=rng)
    directions = np.stack([rotation.apply(hemisphere.vertices) for rotation in rotations])
    directions.flags.writeable = False
    return directions


def default_gtab():
    """DiSCo-like multi-shell gradient table of the default phantom.

    Returns
    -------
    gtab : dipy.core.gradients.GradientTable
        4 b0 followed by 3 shells of 64 directions at b = 1000, 2000 and
        3000 s/mm^2 (196 measurements). The directions of each shell are
        spread by electrostatic repulsion on the hemisphere (fixed seed) and
        rotated differently per shell, so the shells sample distinct
        directions.
    """
    directions = _shell_directions()
    bvecs = np.concatenate([np.zeros((DEFAULT_N_B0, 3)), *directions])
    bvals = np.concatenate([
        np.zeros(DEFAULT_N_B0),
        np.repeat(DEFAULT_SHELL_BVALS, DEFAULT_N_DIRECTIONS),
    ])
    return gradient_table(bvals=bvals, bvecs=bvecs)


@dataclass(eq=False)
class Phantom:
    """A synthetic dMRI volume with its ground truth.

    Attributes
    ----------
    data : ndarray, shape (X, Y, Z, N), float32
        Diffusion-weighted signal (Rician noise unless ``snr`` is None).
    gtab : dipy.core.gradients.GradientTable
        Acquisition of the N measurements.
    mask : ndarray, shape (X, Y, Z), bool
        Brain mask; outside it there is no tissue, only noise.
    affine : ndarray, shape (4, 4)
        Voxel to world (mm) transform, 1 mm isotropic.
    fibre_dirs : ndarray, shape (X, Y, Z, 3, 3)
        Unit direction of each fibre (rows), NaN for absent fibres.
    fibre_fractions : ndarray, shape (X, Y, Z, 3)
        Fraction of the WM signal of each fibre, 0 where absent; sums to 1
        where the WM fraction is positive.
    tissue_fractions : ndarray, shape (X, Y, Z, 3)
        Volume fractions of (wm, gm, csf); sum to 1 in the mask, 0 outside.
    n_fibres : ndarray, shape (X, Y, Z), int
        Number of fibres per voxel (0 to 3).
    crossing_angle : ndarray, shape (X, Y, Z)
        Smallest pairwise angle between fibres in degrees, NaN with fewer
        than two fibres.
    response : esdmri.response.TissueResponse or None
        Exact multi-tissue response of the signal model (ground truth); None
        for a signal without one (:class:`esdmri.heldout_phantom.HeldoutPhantom`).
    snr : float or None
        ``s0 / sigma`` of the Rician noise, None for noise-free data.
    s0 : float
        Signal of every tissue at b = 0.
    """

    data: np.ndarray
    gtab: GradientTable
    mask: np.ndarray
    affine: np.ndarray
    fibre_dirs: np.ndarray
    fibre_fractions: np.ndarray
    tissue_fractions: np.ndarray
    n_fibres: np.ndarray
    crossing_angle: np.ndarray
    response: TissueResponse | None
    snr: float | None
    s0: float = 100.0

    @property
    def sigma(self):
        """Standard deviation of the noise in each channel (None if noise free)."""
        return None if self.snr is None else self.s0 / self.snr

    def __eq__(self, other):
        if not isinstance(other, Phantom):
            return NotImplemented
        arrays = ("data", "mask", "affine", "fibre_dirs", "fibre_fractions",
                  "tissue_fractions", "n_fibres", "crossing_angle")
        return (
            all(_arrays_equal(getattr(self, name), getattr(other, name)) for name in arrays)
            and _arrays_equal(self.gtab.bvals, other.gtab.bvals)
            and _arrays_equal(self.gtab.bvecs, other.gtab.bvecs)
            and _responses_equal(self.response, other.response)
            and self.snr == other.snr
            and self.s0 == other.s0
        )

    __hash__ = None

    def save(self, out_dir, force=False):
        """Write the phantom as NIfTI + FSL gradients + ground truth, atomically.

        Parameters
        ----------
        out_dir : str or path-like
            Folder, created if missing. Receives ``dwi.nii.gz``, ``bvals``,
            ``bvecs``, ``mask.nii.gz`` and ``ground_truth.npz`` (read by
            :func:`load_phantom` and ``esdmri_eval``), and the files of
            :meth:`extra_files` of a subclass.
        force : bool, optional
            Overwrite files that exist already.

        Returns
        -------
        paths : dict
            File name (relative to ``out_dir``) -> path written.
        """
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"out_dir must be a folder, got the file {out_dir}")
        responses = {}
        if self.response is not None:
            responses = {f"response_{tissue}": coefficients for tissue, coefficients
                         in zip(self.response.tissues, self.response.coefficients, strict=True)}
            responses.update(response_tissues=np.array(self.response.tissues),
                             response_bvals=self.response.bvals)
        writers = {
            "dwi.nii.gz": lambda path: nib.save(
                nib.Nifti1Image(self.data.astype(np.float32), self.affine), path),
            "mask.nii.gz": lambda path: nib.save(
                nib.Nifti1Image(self.mask.astype(np.uint8), self.affine), path),
            "bvals": lambda path: np.savetxt(path, self.gtab.bvals[None]),
            "bvecs": lambda path: np.savetxt(path, self.gtab.bvecs.T),
            "ground_truth.npz": lambda path: np.savez_compressed(
                path, fibre_dirs=self.fibre_dirs, fibre_fractions=self.fibre_fractions,
                tissue_fractions=self.tissue_fractions, n_fibres=self.n_fibres,
                crossing_angle=self.crossing_angle, **responses,
                snr=np.nan if self.snr is None else self.snr, s0=self.s0,
                b0_threshold=self.gtab.b0_threshold, **self.extra_truth()),
            **self.extra_files(),
        }
        paths = {name: out_dir / name for name in writers}
        if not force:
            existing = [str(path) for path in paths.values() if path.exists()]
            if existing:
                raise FileExistsError(
                    f"refusing to overwrite {', '.join(existing)}; pass force=True")
        for folder in {path.parent for path in paths.values()}:
            folder.mkdir(parents=True, exist_ok=True)
        # All files appear together, or none does.
        with output_transaction():
            for name, write in writers.items():
                with staged_output(paths[name]) as temporary:
                    write(temporary)
        return paths

    def extra_truth(self):
        """Arrays a subclass adds to ``ground_truth.npz`` (none here).

        Returns
        -------
        arrays : dict of str -> ndarray
        """
        return {}

    def extra_files(self):
        """Files a subclass adds to :meth:`save` (none here).

        Returns
        -------
        writers : dict of str -> callable
            File name relative to ``out_dir`` -> function writing it to the
            path it is given (a temporary name ending like the file's).
        """
        return {}


_PHANTOM_FILES = ("dwi.nii.gz", "bvals", "bvecs", "mask.nii.gz", "ground_truth.npz")


def _responses_equal(a, b):
    if a is None or b is None:
        return a is b
    return (a.tissues == b.tissues and _arrays_equal(a.bvals, b.bvals)
            and all(_arrays_equal(x, y) for x, y in zip(a.coefficients, b.coefficients,
                                                         strict=True)))


def _arrays_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(
        a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")


def load_phantom(out_dir):
    """Read a phantom written by :meth:`Phantom.save`.

    Parameters
    ----------
    out_dir : str or path-like
        Folder holding the files of :meth:`Phantom.save`.

    Returns
    -------
    phantom : Phantom
    """
    out_dir = Path(out_dir)
    missing = [str(out_dir / name) for name in _PHANTOM_FILES if not (out_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"out_dir {out_dir} lacks the phantom files {', '.join(missing)}")
    dwi = nib.load(out_dir / "dwi.nii.gz")
    mask = np.asarray(nib.load(out_dir / "mask.nii.gz").dataobj).astype(bool)
    with np.load(out_dir / "ground_truth.npz", allow_pickle=False) as truth:
        bvals, bvecs = read_bvals_bvecs(str(out_dir / "bvals"), str(out_dir / "bvecs"))
        gtab = gradient_table(bvals=bvals, bvecs=bvecs,
                              b0_threshold=float(truth["b0_threshold"]))
        response = None  # a phantom without an exact response (held-out) has none
        if "response_tissues" in truth:
            tissues = tuple(str(tissue) for tissue in truth["response_tissues"])
            response = TissueResponse(
                tissues, truth["response_bvals"],
                tuple(truth[f"response_{tissue}"] for tissue in tissues))
        snr = float(truth["snr"])
        return Phantom(
            data=np.asarray(dwi.dataobj, dtype=np.float32), gtab=gtab, mask=mask,
            affine=dwi.affine, fibre_dirs=truth["fibre_dirs"],
            fibre_fractions=truth["fibre_fractions"],
            tissue_fractions=truth["tissue_fractions"], n_fibres=truth["n_fibres"],
            crossing_angle=truth["crossing_angle"], response=response,
            snr=None if np.isnan(snr) else snr, s0=float(truth["s0"]))


def make_phantom(shape=(40, 40, 40), gtab=None, snr=30, crossing_angles=(30, 90),
                 max_fibres=3, seed=0, *, s0=100.0, wm_evals=(1.7e-3, 0.3e-3, 0.3e-3),
                 gm_diffusivity=0.8e-3, csf_diffusivity=3.0e-3, fibre_fractions=None,
                 sh_order_max=12):
    """Build a multi-shell crossing-fibre phantom with GM/CSF partial volume.

    Parameters
    ----------
    shape : tuple of 3 int, optional
        Grid size, at least 8 per axis (1 mm voxels). The layout scales with
        the smallest side (reference 40).
    gtab : dipy.core.gradients.GradientTable, optional
        Acquisition; :func:`default_gtab` if None.
    snr : float or None, optional
        ``s0 / sigma`` of the Rician noise; None for noise-free data.
    crossing_angles : tuple of 2 float, optional
        Smallest and largest crossing angle in degrees, in (0, 90].
    max_fibres : int, optional
        Most fibres per voxel, 1 to 3.
    seed : int, optional
        Seed of the noise (``numpy.random.default_rng``); the layout is fixed.
    s0 : float, optional
        Signal of every tissue at b = 0.
    wm_evals : tuple of 3 float, optional
        Eigenvalues (mm^2/s) of the axially symmetric fibre tensor,
        ``(axial, radial, radial)``.
    gm_diffusivity, csf_diffusivity : float, optional
        Isotropic diffusivities (mm^2/s) of GM and CSF.
    fibre_fractions : None, "equal" or sequence of float, optional
        How a voxel's WM signal is split over its fibres: None in proportion
        to the bundle densities; "equal" evenly; a sequence of ``max_fibres``
        positive values summing to 1 gives the fractions of the densest,
        second and third fibre (voxels with fewer fibres renormalise the
        leading values).
    sh_order_max : int, optional
        SH order of the ground-truth WM response.

    Returns
    -------
    phantom : Phantom
    """
    shape, gtab = _check_scan(shape, gtab, snr)
    angle_range = _check_crossing_angles(crossing_angles)
    max_fibres = _check_max_fibres(max_fibres)
    wm_evals = _check_wm_evals(wm_evals)
    fractions_rule = _check_fibre_fractions(fibre_fractions, max_fibres)
    if not s0 > 0:
        raise ValueError(f"s0 must be > 0, got {s0}")

    points = (np.indices(shape).reshape(3, -1).T - (np.array(shape) - 1) / 2).astype(float)
    scale = min(shape) / _REFERENCE_SIDE
    mask, csf, cortex = _tissue_maps(points, shape, scale)
    distances, tangents = _bundles(points, scale, angle_range)
    densities = _bundle_density(distances) * ((1 - cortex) * mask)[:, None]
    dirs, weights = _select_fibres(densities, tangents, angle_range, max_fibres)

    wm = (1 - csf) * np.minimum(1.0, weights.sum(axis=1))
    no_wm = wm < _MIN_WM_FRACTION
    wm[no_wm] = 0.0
    dirs[no_wm] = np.nan
    weights[no_wm] = 0.0
    n_fibres = np.count_nonzero(weights > 0, axis=1)
    tissue_fractions = np.stack([wm, 1 - csf - wm, csf], axis=1) * mask[:, None]
    fractions = _fibre_fractions(weights, n_fibres, fractions_rule)

    clean = np.zeros((points.shape[0], len(gtab.bvals)))
    clean[mask] = s0 * _tissue_signal(
        gtab, dirs[mask], fractions[mask], tissue_fractions[mask], wm_evals,
        gm_diffusivity, csf_diffusivity)
    data = add_rician_noise(clean, snr, s0, np.random.default_rng(seed))

    shell_bvals, _ = group_shells(gtab)
    if not b0_mask(gtab).any():
        # The response's first row is the b0 row even if gtab has none.
        shell_bvals = np.concatenate([[0.0], shell_bvals])
    response = TissueResponse.from_tensors(
        shell_bvals, wm_evals=wm_evals, gm_diffusivity=gm_diffusivity,
        csf_diffusivity=csf_diffusivity, s0=s0, sh_order_max=sh_order_max)
    return Phantom(
        data=data.reshape(*shape, -1), gtab=gtab,
        mask=mask.reshape(shape), affine=np.eye(4),
        fibre_dirs=dirs.reshape(*shape, MAX_FIBRES, 3),
        fibre_fractions=fractions.reshape(*shape, MAX_FIBRES),
        tissue_fractions=tissue_fractions.reshape(*shape, len(TISSUES)),
        n_fibres=n_fibres.reshape(shape),
        crossing_angle=_smallest_pairwise_angle(dirs).reshape(shape),
        response=response, snr=None if snr is None else float(snr), s0=float(s0))


def add_rician_noise(clean, snr, s0, rng):
    """Rician noise of standard deviation ``s0 / snr`` in each channel.

    Parameters
    ----------
    clean : ndarray, shape (M, N)
        Noise-free signal.
    snr : float or None
        None returns the signal as is (as float32).
    s0 : float
        Reference signal of the SNR.
    rng : numpy.random.Generator

    Returns
    -------
    data : ndarray, shape (M, N), float32
    """
    data = np.empty(clean.shape, dtype=np.float32)
    # A few volumes at a time: the float64 noise of all volumes at once
    # would take several times the memory of the data.
    for start in range(0, clean.shape[1], _NOISE_CHUNK):
        block = np.s_[:, start:start + _NOISE_CHUNK]
        data[block] = add_noise(clean[block], snr, s0, noise_type="rician", rng=rng)
    return data


def _check_scan(shape, gtab, snr):
    """Validated ``(shape, gtab)`` of a phantom; the default table when gtab is None."""
    shape = _check_shape(shape)
    if gtab is None:
        gtab = default_gtab()
    elif not isinstance(gtab, GradientTable):
        raise TypeError(f"gtab must be a dipy GradientTable, got {type(gtab).__name__}")
    _check_snr(snr)
    return shape, gtab


def _check_shape(shape):
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of 3 ints, got {shape!r}") from None
    if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) for n in shape):
        raise TypeError(f"shape must be a tuple of 3 ints, got {shape!r}")
    if min(shape) < MIN_SHAPE:
        raise ValueError(f"shape must be at least {MIN_SHAPE} voxels per axis, got {shape}")
    return tuple(int(n) for n in shape)


def _check_snr(snr):
    if snr is None:
        return
    if isinstance(snr, bool) or not isinstance(snr, (int, float, np.integer, np.floating)):
        raise TypeError(f"snr must be a positive number or None, got {snr!r}")
    if not snr > 0 or not np.isfinite(snr):
        raise ValueError(f"snr must be a finite number > 0 or None, got {snr}")


def _check_crossing_angles(crossing_angles):
    try:
        smallest, largest = (float(angle) for angle in crossing_angles)
    except (TypeError, ValueError):
        raise ValueError(
            f"crossing_angles must be two angles in degrees, got {crossing_angles!r}") from None
    if not 0 < smallest <= largest <= 90:
        raise ValueError(
            "crossing_angles must satisfy 0 < smallest <= largest <= 90 degrees, "
            f"got {crossing_angles!r}")
    return smallest, largest


def _check_max_fibres(max_fibres):
    if isinstance(max_fibres, bool) or not isinstance(max_fibres, (int, np.integer)) \
            or not 1 <= max_fibres <= MAX_FIBRES:
        raise ValueError(f"max_fibres must be an int in 1..{MAX_FIBRES}, got {max_fibres!r}")
    return int(max_fibres)


def _check_wm_evals(wm_evals):
    wm_evals = np.asarray(wm_evals, dtype=float)
    if wm_evals.shape != (3,) or not np.all(wm_evals > 0) or wm_evals[1] != wm_evals[2]:
        raise ValueError(
            "wm_evals must be 3 positive values (axial, radial, radial) of an axially "
            f"symmetric tensor, got {wm_evals.tolist()}")
    return tuple(float(value) for value in wm_evals)


def _check_fibre_fractions(fibre_fractions, max_fibres):
    if fibre_fractions is None or (isinstance(fibre_fractions, str)
                                   and fibre_fractions == "equal"):
        return fibre_fractions
    if isinstance(fibre_fractions, str):
        raise ValueError(f'fibre_fractions must be None, "equal" or {max_fibres} fractions, '
                         f"got {fibre_fractions!r}")
    values = np.asarray(fibre_fractions, dtype=float)
    if values.shape != (max_fibres,) or not np.all(values > 0):
        raise ValueError(f"fibre_fractions must hold max_fibres={max_fibres} positive "
                         f"values, got {values.tolist()}")
    if not np.isclose(values.sum(), 1.0, atol=1e-6):
        raise ValueError(f"fibre_fractions must sum to 1, got {values.tolist()} "
                         f"(sum {values.sum():.6g})")
    return values


def _partial_volume(depth):
    """Volume fraction of a voxel whose centre lies ``depth`` voxels inside a
    region (negative outside), for a locally flat border."""
    return np.clip(0.5 + depth, 0.0, 1.0)


def _tissue_maps(points, shape, scale):
    """Brain mask and CSF and cortex partial-volume maps, each (M,)."""
    radii = _BRAIN_RADIUS_FRACTION * np.array(shape, dtype=float)
    radius = np.linalg.norm(points / radii, axis=1)
    mask = radius <= 1
    # Depth below the brain surface in voxels (exact for a sphere).
    depth = (1 - radius) * radii.min()
    csf_rim = _partial_volume(_CSF_RIM_THICKNESS * scale - depth)
    cortex = _partial_volume((_CSF_RIM_THICKNESS + _CORTEX_THICKNESS) * scale - depth)
    ventricle_radii = scale * np.array(_VENTRICLE_RADII)
    ventricle_radius = np.linalg.norm(
        (points - scale * np.array(_VENTRICLE_CENTRE)) / ventricle_radii, axis=1)
    ventricle = _partial_volume((1 - ventricle_radius) * ventricle_radii.min())
    csf = np.maximum(csf_rim, ventricle) * mask
    return mask, csf, cortex


def random_directions(rng, n=None):
    """Unit vectors drawn uniformly on the sphere.

    Parameters
    ----------
    rng : numpy.random.Generator
    n : int, optional
        How many (default: one, shape (3,)).

    Returns
    -------
    directions : ndarray, shape (3,) or (n, 3)
    """
    return normalized_vector(rng.normal(size=(3,) if n is None else (n, 3)))


def _straight(points, origin, direction, half_widths, width_axis=None):
    """Normalised distance to a straight bundle of elliptic cross-section.

    Returns the distance in units of the half-widths (1 on the border) and
    the (constant) tangent, shapes (M,) and (M, 3).
    """
    direction = normalized_vector(direction)
    if width_axis is None:
        # Any perpendicular axis will do for a circular cross-section.
        width_axis = np.cross(direction, [0.0, 0.0, 1.0])
    width_axis = normalized_vector(width_axis)
    height_axis = np.cross(direction, width_axis)
    offset = points - origin
    distance = np.hypot(offset @ width_axis / half_widths[0],
                        offset @ height_axis / half_widths[1])
    return distance, np.broadcast_to(direction, points.shape)


def _arc(points, centre, normal, zero_axis, radius, tube_radius):
    """Normalised distance to a half-circle tube and its tangent.

    The half circle lies in the plane through ``centre`` with ``normal`` and
    spans polar angles -90 to 90 degrees around ``zero_axis``.
    """
    normal, zero_axis = normalized_vector(normal), normalized_vector(zero_axis)
    offset = points - centre
    height = offset @ normal
    radial = offset - height[:, None] * normal
    in_plane = np.linalg.norm(radial, axis=1)
    distance = np.hypot(in_plane - radius, height) / tube_radius
    distance[offset @ zero_axis < 0] = np.inf
    tangent = np.cross(normal, radial / np.maximum(in_plane, 1e-12)[:, None])
    return distance, tangent


def _bundles(points, scale, angle_range):
    """Normalised distance (M, B) and tangent (M, B, 3) of each bundle."""
    smallest, largest = np.radians(angle_range)
    middle = 0.5 * (smallest + largest)
    x_axis, y_axis, _ = np.eye(3)
    tube = np.array([_TUBE_RADIUS, _TUBE_RADIUS])

    # Arc in the ribbon's plane (y = 0) through the origin, where its tangent
    # makes the middle angle with x; the tangent turns from the smallest to
    # the largest angle while the arc runs down through the ribbon (the
    # polar angle around the centre is 90 degrees minus the crossing angle).
    arc_radius = min(_RIBBON_HALF_HEIGHT / max(np.cos(smallest) - np.cos(middle),
                                               np.cos(middle) - np.cos(largest), 1e-12),
                     _ARC_MAX_RADIUS)
    arc_centre = -arc_radius * np.array([np.sin(middle), 0.0, np.cos(middle)])

    def arc_x(z):
        polar = np.arcsin(np.clip((z - arc_centre[2]) / arc_radius, -1, 1))
        return arc_centre[0] + arc_radius * np.cos(polar)

    def footprint(angle):
        # Half-length along x of a tube's overlap with the ribbon.
        return _TUBE_RADIUS * (1 + np.cos(angle)) / np.sin(angle)

    # The middle tube crosses the ribbon and the arc at the origin, tilted
    # out of the x-y plane so that all three pairwise angles equal the
    # middle angle (the arc's tangent there is (cos a, 0, -sin a)).
    tilt = -np.arcsin(np.cos(middle) / (1 + np.cos(middle)))
    middle_direction = [np.cos(middle), np.sin(middle) * np.cos(tilt),
                        np.sin(middle) * np.sin(tilt)]
    # The outer tubes cross the ribbon beside the arc: above the origin the
    # arc lies at negative x, below at positive x.
    low_angle = smallest + (largest - smallest) * 3 / 8
    high_angle = smallest + (largest - smallest) * 5 / 8
    lower, upper = _TUBE_LEVELS
    upper_x = arc_x(upper) + min(footprint(low_angle) + _TUBE_RADIUS + _GAP, _MAX_OFFSET)
    lower_x = arc_x(lower) - min(footprint(high_angle) + _TUBE_RADIUS + _GAP, _MAX_OFFSET)

    bundles = [
        _straight(points, np.zeros(3), x_axis,
                  scale * np.array([_TUBE_RADIUS, _RIBBON_HALF_HEIGHT]), y_axis),
        _straight(points, np.zeros(3), middle_direction, scale * tube),
        _straight(points, scale * np.array([upper_x, 0.0, upper]),
                  [np.cos(low_angle), np.sin(low_angle), 0.0], scale * tube),
        _straight(points, scale * np.array([lower_x, 0.0, lower]),
                  [np.cos(high_angle), -np.sin(high_angle), 0.0], scale * tube),
        _arc(points, scale * arc_centre, y_axis, -arc_centre / arc_radius,
             scale * arc_radius, scale * _TUBE_RADIUS),
    ]
    distances = np.stack([distance for distance, _ in bundles], axis=1)
    tangents = np.stack([tangent for _, tangent in bundles], axis=1)
    return distances, tangents


def _bundle_density(distance):
    """Fibre density from the normalised distance: 1 in the core, 0.3 at the border."""
    t = np.clip((distance - 0.5) / 0.5, 0, 1)
    density = 1 - (1 - _BORDER_DENSITY) * t * t * (3 - 2 * t)
    return np.where(distance <= 1, density, 0.0)


def _axis_angle(a, b):
    """Angle in degrees between the axes a and b (..., 3), NaN if one is NaN."""
    cosine = np.abs(np.sum(a * b, axis=-1))
    return np.degrees(np.arccos(np.clip(cosine, 0, 1)))


def _select_fibres(densities, tangents, angle_range, max_fibres):
    """Keep the densest bundles whose pairwise angles lie in the range.

    Bundles are visited per voxel from densest to sparsest; one is kept if
    fewer than ``max_fibres`` are kept and its angle to each kept fibre is in
    ``angle_range``. Returns directions (M, 3, 3) (NaN where absent) and
    densities (M, 3) (0 where absent).
    """
    n_points = densities.shape[0]
    order = np.argsort(-densities, axis=1, kind="stable")
    sorted_densities = np.take_along_axis(densities, order, axis=1)
    sorted_tangents = np.take_along_axis(tangents, order[..., None], axis=1)
    dirs = np.full((n_points, MAX_FIBRES, 3), np.nan)
    weights = np.zeros((n_points, MAX_FIBRES))
    n_kept = np.zeros(n_points, dtype=int)
    low, high = angle_range[0] - _ANGLE_TOLERANCE, angle_range[1] + _ANGLE_TOLERANCE
    for rank in range(densities.shape[1]):
        candidate = sorted_tangents[:, rank]
        keep = (sorted_densities[:, rank] >= _MIN_BUNDLE_DENSITY) & (n_kept < max_fibres)
        for slot in range(max_fibres):
            angle = _axis_angle(dirs[:, slot], candidate)
            keep &= (slot >= n_kept) | ((angle >= low) & (angle <= high))
        voxels = np.flatnonzero(keep)
        dirs[voxels, n_kept[voxels]] = candidate[voxels]
        weights[voxels, n_kept[voxels]] = sorted_densities[voxels, rank]
        n_kept[voxels] += 1
    return dirs, weights


def _fibre_fractions(weights, n_fibres, rule):
    """Split of the WM signal over the fibres (M, 3), summing to 1 where n > 0."""
    present = weights > 0
    if rule is None:
        shares = weights
    elif isinstance(rule, str):
        shares = present.astype(float)
    else:
        shares = np.zeros_like(weights)
        shares[:, :len(rule)] = rule
        shares *= present
    total = shares.sum(axis=1, keepdims=True)
    return np.divide(shares, total, out=np.zeros_like(shares), where=n_fibres[:, None] > 0)


def _tissue_signal(gtab, dirs, fibre_fractions, tissue_fractions, wm_evals,
                   gm_diffusivity, csf_diffusivity):
    """Signal over s0 (M, N) of the multi-tensor, multi-tissue model."""
    bvals, bvecs = gtab.bvals, gtab.bvecs
    axial, radial, _ = wm_evals
    wm_signal = np.zeros((dirs.shape[0], len(bvals)))
    for slot in range(MAX_FIBRES):
        present = fibre_fractions[:, slot] > 0
        cosine = dirs[present, slot] @ bvecs.T
        wm_signal[present] += fibre_fractions[present, slot, None] * np.exp(
            -bvals * (radial + (axial - radial) * cosine**2))
    return (tissue_fractions[:, :1] * wm_signal
            + tissue_fractions[:, 1:2] * np.exp(-bvals * gm_diffusivity)
            + tissue_fractions[:, 2:3] * np.exp(-bvals * csf_diffusivity))


def _smallest_pairwise_angle(dirs):
    """Smallest angle in degrees between the fibres of each voxel (M,)."""
    angles = [_axis_angle(dirs[:, i], dirs[:, j])
              for i in range(MAX_FIBRES) for j in range(i + 1, MAX_FIBRES)]
    return np.fmin.reduce(angles)
