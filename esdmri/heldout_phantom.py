"""Held-out phantom family: a signal that is not the deconvolution model.

:func:`esdmri.sims.make_phantom` builds its signal from the same
multi-tissue convolution model (one tensor response everywhere) that the
deconvolution methods invert, so a method given that response is tested on
its own forward model. The phantoms here break that model in the ways real
white matter does, and carry the ground truth a tractography score needs:

* **geometry**: ``n_bundles`` tubes along quadratic Bezier centrelines
  between two points of the brain surface (random 3D chords, so most bundles
  run through-plane), bent by a control point up to 0.9 brain radii off the
  centre. Every other bundle fans: its radius grows along the centreline and
  its fibres spread out from the axis up to ``max_fan_angle`` at the end.
  Candidates are drawn from ``geometry_seed`` until each one crosses an
  earlier bundle and at most 10 % of each overlap lies below the smallest of
  ``crossing_angles``;
* **dispersion**: each fibre population is ``n_subfibres`` sub-fibres drawn
  per voxel from a Watson distribution around the local mean direction, with
  a concentration that varies along the bundle between two values drawn from
  ``kappa_range``;
* **diffusivities**: the WM axial and radial diffusivities vary smoothly
  across the volume (random low-frequency fields) and between bundles
  (a per-bundle offset), within ``axial_range`` and ``radial_range``; the GM
  diffusivity varies within ``gm_diffusivity_range``;
* **two-compartment WM** (``wm_model="stick_zeppelin"``): an intra-axonal
  stick (diffusivity ``d_par``) plus an extra-axonal zeppelin (``d_par``
  along, ``d_par (1 - f_in)`` across: tortuosity) with an intra-axonal
  fraction ``f_in`` varying smoothly within ``intra_fraction_range``;
* **partial volume**: the brain ellipsoid, CSF rim, cortex and ventricle of
  :mod:`esdmri.sims`; bundle density falls from 1 in the core to 0.3 at the
  border, so the WM fraction is lower at bundle borders; what is neither WM
  nor CSF is GM;
* **noise**: Rician (``sigma = s0 / snr``), background included.

Signal per voxel (``s0`` at b = 0 in every tissue)::

    S(b, g) = s0 * (f_wm * sum_j w_j mean_k K_j(b, g . n_jk)
                    + f_gm exp(-b d_gm(x)) + f_csf exp(-b d_csf))

with ``n_jk`` the sub-fibres of population ``j`` and ``K_j`` its kernel
(tensor or stick + zeppelin with the local diffusivities of its bundle).
There is no exact response: every method must estimate one from the data.

Ground truth: per voxel up to three populations (the densest bundles; two
bundles closer than the smallest crossing angle form one population, their
weighted mean axis) with their mean directions and signal fractions, the
tissue fractions, and per bundle its voxels, its two end regions (bundle
voxels in the outer 35 % of the centreline within 3 voxels of WM depth below
the cortex) and streamlines along it (following the fan). Coordinates of
streamlines are voxel indices, which are also world mm (identity affine).
"""

from dataclasses import dataclass

import numpy as np
from dipy.core.geometry import normalized_vector
from scipy.spatial import cKDTree

from esdmri.sims import (
    _CORTEX_THICKNESS,
    _CSF_RIM_THICKNESS,
    _MIN_BUNDLE_DENSITY,
    _MIN_WM_FRACTION,
    _REFERENCE_SIDE,
    MAX_FIBRES,
    TISSUES,
    Phantom,
    _bundle_density,
    _check_scan,
    _smallest_pairwise_angle,
    _tissue_maps,
    add_rician_noise,
    random_directions,
)

WM_MODELS = ("tensor", "stick_zeppelin")

# Centreline sampling step and the share of the centreline at each end that
# may hold an end region.
_STEP = 0.25
_END_SHARE = 0.35
# WM depth (voxels below the cortex) an end region reaches.
_END_WM_DEPTH = 3.0
# Bundle radius range (voxels at the 40^3 reference) and control-point reach
# (in brain radii) of the centrelines.
_RADIUS_RANGE = (3.5, 5.0)
_CONTROL_REACH = (0.2, 0.9)
# Endpoints sit just inside the brain surface (normalised radius).
_ENDPOINT_RADIUS = 0.97
# A candidate bundle is rejected when more of an overlap than this lies below
# the smallest crossing angle.
_MAX_SHALLOW_SHARE = 0.1
_MAX_CANDIDATES = 500
# Voxels whose signal is computed at a time (memory of the sub-fibre sums).
_SIGNAL_CHUNK = 512
# Waves summed in a smooth random field; wavelengths in units of the grid side.
_FIELD_WAVES = 4
_FIELD_WAVELENGTHS = (0.8, 2.0)
# Weight of the spatial field against the per-bundle offset in diffusivities.
_FIELD_WEIGHT = 0.6


@dataclass(eq=False)
class Bundle:
    """One ground-truth bundle of a :class:`HeldoutPhantom`.

    Attributes
    ----------
    centreline : ndarray, shape (P, 3)
        Points every 0.25 voxel (scaled with the grid), voxel coordinates.
    radius : ndarray, shape (P,)
        Tube radius at each centreline point (voxels).
    mask : ndarray, shape (X, Y, Z), bool
        Voxels where the bundle has WM fibres.
    end_regions : ndarray, shape (2, X, Y, Z), bool
        Voxels where the bundle's streamlines start and end.
    streamlines : list of ndarray (n, 3)
        Ground-truth trajectories in voxel coordinates.
    fan_angle : float
        Largest angle (degrees) of the fibres to the axis at the fanning end,
        0 for a tube.
    kappa : tuple of 2 float
        Watson concentration at the start and end of the centreline.
    """

    centreline: np.ndarray
    radius: np.ndarray
    mask: np.ndarray
    end_regions: np.ndarray
    streamlines: list
    fan_angle: float
    kappa: tuple


@dataclass(eq=False, kw_only=True)
class HeldoutPhantom(Phantom):
    """A held-out phantom and its ground truth.

    A :class:`esdmri.sims.Phantom` (the same volumes, ground truth, equality
    and atomic :meth:`save`) with bundles and diffusivity maps, and no exact
    response.

    Attributes
    ----------
    affine : ndarray, shape (4, 4)
        Identity: voxel indices are world mm.
    fibre_dirs : ndarray, shape (X, Y, Z, 3, 3)
        Mean direction of each fibre population (rows), NaN where absent.
    bundles : list of Bundle
    wm_axial, wm_radial : ndarray, shape (X, Y, Z)
        Mean WM diffusivities of each voxel's fibres (mm^2/s), 0 outside WM.
        For ``stick_zeppelin``, those of the zeppelin.
    wm_model : str
    response : None
        There is no exact response: methods must estimate one.
    """

    bundles: list
    wm_axial: np.ndarray
    wm_radial: np.ndarray
    wm_model: str = "tensor"
    response: None = None

    @property
    def end_regions(self):
        """List of (start, end) boolean volumes, one pair per bundle."""
        return [(bundle.end_regions[0], bundle.end_regions[1]) for bundle in self.bundles]

    @property
    def bundle_masks(self):
        """List of boolean volumes, the voxels of each bundle."""
        return [bundle.mask for bundle in self.bundles]

    @property
    def streamlines(self):
        """Every bundle's ground-truth streamlines, bundle after bundle."""
        return [line for bundle in self.bundles for line in bundle.streamlines]

    def extra_truth(self):
        """The diffusivity maps and WM model, for ``ground_truth.npz``."""
        return dict(wm_axial=self.wm_axial, wm_radial=self.wm_radial,
                    wm_model=self.wm_model)

    def extra_files(self):
        """``streamlines.trk`` (every bundle's streamlines), ``bundles/bundle_NN.nii.gz``
        (bundle voxels) and ``end_regions/bundle_NN_{start,end}.nii.gz``: in
        sorted order the pairs ``esdmri_eval --end_regions`` expects."""
        import nibabel as nib
        from dipy.io.stateful_tractogram import Space, StatefulTractogram
        from dipy.io.streamline import save_tractogram

        def volume(array):
            return lambda path: nib.save(nib.Nifti1Image(array.astype(np.uint8), self.affine),
                                         path)

        def tractogram(path):
            reference = nib.Nifti1Image(self.mask.astype(np.uint8), self.affine)
            save_tractogram(StatefulTractogram(self.streamlines, reference, Space.VOX),
                            str(path), bbox_valid_check=False)

        writers = {"streamlines.trk": tractogram}
        for b, bundle in enumerate(self.bundles):
            writers[f"bundles/bundle_{b:02d}.nii.gz"] = volume(bundle.mask)
            for side, region in zip(("start", "end"), bundle.end_regions):
                writers[f"end_regions/bundle_{b:02d}_{side}.nii.gz"] = volume(region)
        return writers


def make_heldout_phantom(shape=(40, 40, 40), gtab=None, snr=20, seed=0, *, geometry_seed=0,
                         n_bundles=6, crossing_angles=(30, 90), wm_model="tensor",
                         axial_range=(1.4e-3, 2.1e-3), radial_range=(0.2e-3, 0.6e-3),
                         intra_fraction_range=(0.5, 0.75), kappa_range=(4.0, 24.0),
                         max_fan_angle=15.0, gm_diffusivity_range=(0.7e-3, 0.9e-3),
                         csf_diffusivity=3.0e-3, n_subfibres=32, streamlines_per_bundle=40,
                         s0=100.0):
    """Build a held-out phantom (see the module notes for the model).

    Parameters
    ----------
    shape : tuple of 3 int, optional
        Grid (1 mm voxels), at least 8 per axis; the layout scales with the
        smallest side (reference 40).
    gtab : dipy.core.gradients.GradientTable, optional
        Any acquisition; :func:`esdmri.sims.default_gtab` if None.
    snr : float or None, optional
        ``s0 / sigma`` of the Rician noise; None for noise-free data.
    seed : int, optional
        Seeds the sub-fibres and the noise.
    geometry_seed : int, optional
        Seeds the bundles, diffusivity fields and concentrations: phantoms
        with different geometry seeds share no layout (dev/test splits).
    n_bundles : int, optional
        Number of bundles (1 to 8).
    crossing_angles : tuple of 2 float, optional
        Smallest and largest crossing angle (degrees) the layout aims at;
        bundles closer than the smallest form one ground-truth population.
    wm_model : {"tensor", "stick_zeppelin"}, optional
        Kernel of a sub-fibre: an axially symmetric tensor, or an
        intra-axonal stick plus an extra-axonal zeppelin.
    axial_range, radial_range : tuple of 2 float, optional
        Range of the WM axial and radial diffusivities (mm^2/s). With
        ``stick_zeppelin`` the axial one is the stick's and the zeppelin's
        parallel diffusivity and ``radial_range`` is not used.
    intra_fraction_range : tuple of 2 float, optional
        Range of the intra-axonal signal fraction of ``stick_zeppelin``.
    kappa_range : tuple of 2 float, optional
        Range of the Watson concentration (larger: less dispersion).
    max_fan_angle : float, optional
        Largest fanning angle (degrees) of the fanning bundles (0: none fan).
    gm_diffusivity_range : tuple of 2 float, optional
        Range of the GM diffusivity (mm^2/s).
    csf_diffusivity : float, optional
    n_subfibres : int, optional
        Sub-fibres drawn per population and voxel.
    streamlines_per_bundle : int, optional
        Ground-truth streamlines stored per bundle.
    s0 : float, optional
        Signal of every tissue at b = 0.

    Returns
    -------
    phantom : HeldoutPhantom
    """
    shape, gtab = _check_scan(shape, gtab, snr)
    if wm_model not in WM_MODELS:
        raise ValueError(f"wm_model must be one of {WM_MODELS}, got {wm_model!r}")
    for name, value in (("n_bundles", n_bundles), ("n_subfibres", n_subfibres),
                        ("streamlines_per_bundle", streamlines_per_bundle)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if n_bundles > 8:
        raise ValueError(f"n_bundles must be at most 8, got {n_bundles}")
    low_angle, high_angle = _check_range(crossing_angles, "crossing_angles", 0, 90)
    axial_range = _check_range(axial_range, "axial_range", 0, np.inf)
    radial_range = _check_range(radial_range, "radial_range", 0, np.inf)
    if wm_model == "tensor" and radial_range[1] >= axial_range[0]:
        raise ValueError("radial_range must lie below axial_range, got "
                         f"{radial_range} and {axial_range}")
    intra_fraction_range = _check_range(intra_fraction_range, "intra_fraction_range", 0, 1)
    kappa_range = _check_range(kappa_range, "kappa_range", 0, np.inf)
    gm_diffusivity_range = _check_range(gm_diffusivity_range, "gm_diffusivity_range", 0,
                                        np.inf)
    if not 0 <= max_fan_angle < 45:
        raise ValueError(f"max_fan_angle must be in [0, 45) degrees, got {max_fan_angle}")
    if not csf_diffusivity > 0:
        raise ValueError(f"csf_diffusivity must be > 0, got {csf_diffusivity}")
    if not s0 > 0:
        raise ValueError(f"s0 must be > 0, got {s0}")

    geometry_rng = np.random.default_rng([geometry_seed, 1])
    centre = (np.array(shape) - 1) / 2
    points = (np.indices(shape).reshape(3, -1).T - centre).astype(float)
    scale = min(shape) / _REFERENCE_SIDE
    radii = 0.46 * np.array(shape, dtype=float)
    mask, csf, cortex = _tissue_maps(points, shape, scale)
    inside = (1 - cortex) * mask
    depth = (1 - np.linalg.norm(points / radii, axis=1)) * radii.min()

    tracks = _draw_layout(points, mask, radii, scale, n_bundles, low_angle, max_fan_angle,
                          kappa_range, geometry_rng)
    offsets = geometry_rng.uniform(size=(len(tracks), 3))
    fields = [_smooth_field(points, mask, shape, geometry_rng) for _ in range(4)]

    # Per voxel, the (up to 3) densest bundles.
    densities = np.stack([t.density for t in tracks], axis=1) * inside[:, None]
    order = np.argsort(-densities, axis=1, kind="stable")[:, :MAX_FIBRES]
    slot_density = np.take_along_axis(densities, order, axis=1)
    slot_density[slot_density < _MIN_BUNDLE_DENSITY] = 0.0
    if densities.shape[1] < MAX_FIBRES:
        pad = MAX_FIBRES - densities.shape[1]
        order = np.pad(order, ((0, 0), (0, pad)))
        slot_density = np.pad(slot_density, ((0, 0), (0, pad)))
    directions = np.stack([t.direction for t in tracks], axis=1)
    kappas = np.stack([t.kappa for t in tracks], axis=1)
    slot_dirs = np.take_along_axis(directions, order[..., None], axis=1)
    slot_kappa = np.take_along_axis(kappas, order, axis=1)

    wm = (1 - csf) * np.minimum(1.0, slot_density.sum(axis=1))
    wm[wm < _MIN_WM_FRACTION] = 0.0
    slot_density[wm == 0] = 0.0
    total = slot_density.sum(axis=1, keepdims=True)
    slot_weights = np.divide(slot_density, total, out=np.zeros_like(slot_density),
                             where=total > 0)
    tissue_fractions = np.stack([wm, 1 - csf - wm, csf], axis=1) * mask[:, None]

    # Diffusivities of each slot: the spatial field plus the bundle's offset.
    def local(field_values, bundle_offsets, bounds):
        mix = _FIELD_WEIGHT * field_values[:, None] + (1 - _FIELD_WEIGHT) * bundle_offsets[order]
        return bounds[0] + (bounds[1] - bounds[0]) * mix

    axial = local(fields[0], offsets[:, 0], axial_range)
    if wm_model == "tensor":
        radial = local(fields[1], offsets[:, 1], radial_range)
        intra = np.zeros_like(axial)
    else:
        intra = local(fields[1], offsets[:, 2], intra_fraction_range)
        radial = axial * (1 - intra)
    gm_diffusivity = gm_diffusivity_range[0] + (
        gm_diffusivity_range[1] - gm_diffusivity_range[0]) * fields[2]

    rng = np.random.default_rng(seed)
    clean = np.zeros((points.shape[0], len(gtab.bvals)))
    wm_voxels = np.flatnonzero(wm > 0)
    for start in range(0, wm_voxels.size, _SIGNAL_CHUNK):
        chunk = wm_voxels[start:start + _SIGNAL_CHUNK]
        clean[chunk] = wm[chunk, None] * _wm_signal(
            gtab, slot_dirs[chunk], slot_weights[chunk], slot_kappa[chunk], axial[chunk],
            radial[chunk], intra[chunk], n_subfibres, rng)
    bvals = gtab.bvals
    clean[mask] += (tissue_fractions[mask, 1:2] * np.exp(-np.outer(gm_diffusivity[mask], bvals))
                    + tissue_fractions[mask, 2:3] * np.exp(-bvals * csf_diffusivity))
    clean *= s0
    data = add_rician_noise(clean, snr, s0, rng)

    fibre_dirs, fibre_fractions = _merge_populations(slot_dirs, slot_weights, low_angle)
    n_fibres = np.count_nonzero(fibre_fractions > 0, axis=1)
    present = slot_weights > 0
    n_present = np.maximum(present.sum(axis=1), 1)
    wm_axial = np.where(present, axial, 0).sum(axis=1) / n_present
    wm_radial = np.where(present, radial, 0).sum(axis=1) / n_present

    end_depth = (_CSF_RIM_THICKNESS + _CORTEX_THICKNESS) * scale + _END_WM_DEPTH
    bundles = [_bundle_truth(track, densities[:, b], mask, depth, end_depth, shape, centre,
                             streamlines_per_bundle, geometry_rng)
               for b, track in enumerate(tracks)]
    return HeldoutPhantom(
        data=data.reshape(*shape, -1), gtab=gtab, mask=mask.reshape(shape),
        affine=np.eye(4), fibre_dirs=fibre_dirs.reshape(*shape, MAX_FIBRES, 3),
        fibre_fractions=fibre_fractions.reshape(*shape, MAX_FIBRES),
        tissue_fractions=tissue_fractions.reshape(*shape, len(TISSUES)),
        n_fibres=n_fibres.reshape(shape),
        crossing_angle=_smallest_pairwise_angle(fibre_dirs).reshape(shape),
        bundles=bundles, wm_axial=wm_axial.reshape(shape), wm_radial=wm_radial.reshape(shape),
        response=None, snr=None if snr is None else float(snr), s0=float(s0),
        wm_model=wm_model)


def _check_range(value, name, low, high):
    try:
        smallest, largest = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (smallest, largest), got {value!r}") \
            from None
    if not low < smallest <= largest <= high:
        raise ValueError(f"{name} must satisfy {low} < smallest <= largest <= {high}, "
                         f"got {value!r}")
    return smallest, largest




def _smooth_field(points, mask, shape, rng):
    """A smooth random field scaled to [0, 1] over the mask, shape (M,)."""
    side = float(min(shape))
    value = np.zeros(points.shape[0])
    for _ in range(_FIELD_WAVES):
        wavelength = side * rng.uniform(*_FIELD_WAVELENGTHS)
        value += np.cos(2 * np.pi * points @ random_directions(rng) / wavelength
                        + rng.uniform(0, 2 * np.pi))
    low, high = value[mask].min(), value[mask].max()
    return np.clip((value - low) / max(high - low, 1e-12), 0, 1)


@dataclass
class _Track:
    """A bundle's centreline and its fields on the grid."""

    centreline: np.ndarray   # (P, 3) centred coordinates
    tangent: np.ndarray      # (P, 3)
    frame: np.ndarray        # (P, 2, 3) rotation-minimising normals
    radius: np.ndarray       # (P,)
    radius_slope: np.ndarray  # (P,) d radius / d arc length
    fan_angle: float
    kappa_ends: tuple
    density: np.ndarray      # (M,)
    excess: np.ndarray       # (M,) distance outside the tube's border (voxels)
    direction: np.ndarray    # (M, 3)
    kappa: np.ndarray        # (M,)
    position: np.ndarray     # (M,) arc-length share of the nearest centreline point


def _surface_point(direction, radii):
    """Point of the ellipsoid with semi-axes ``radii`` along ``direction``."""
    return _ENDPOINT_RADIUS * direction / np.linalg.norm(direction / radii)


def _centreline(rng, radii, step):
    """Quadratic Bezier between two surface points, resampled every ``step``."""
    axis = random_directions(rng)
    start = _surface_point(normalized_vector(axis + 0.35 * rng.normal(size=3)), radii)
    end = _surface_point(normalized_vector(-axis + 0.35 * rng.normal(size=3)), radii)
    control = rng.uniform(*_CONTROL_REACH) * radii * random_directions(rng)
    t = np.linspace(0, 1, 2000)[:, None]
    curve = (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t ** 2 * end
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))])
    samples = np.arange(0, arc[-1], step)
    line = np.stack([np.interp(samples, arc, curve[:, i]) for i in range(3)], axis=1)
    return line


def _rotation_minimising_frame(line, tangent):
    """Normals (P, 2, 3) transported along the line by double reflection
    (Wang et al. 2008), so the streamlines' offsets do not twist."""
    normal = np.cross(tangent[0], [1.0, 0.0, 0.0])
    if np.linalg.norm(normal) < 0.1:
        normal = np.cross(tangent[0], [0.0, 1.0, 0.0])
    normals = np.empty_like(line)
    normals[0] = normalized_vector(normal)
    for i in range(len(line) - 1):
        v1 = line[i + 1] - line[i]
        c1 = v1 @ v1
        r_left = normals[i] - (2 / c1) * (v1 @ normals[i]) * v1
        t_left = tangent[i] - (2 / c1) * (v1 @ tangent[i]) * v1
        v2 = tangent[i + 1] - t_left
        c2 = v2 @ v2
        normals[i + 1] = r_left if c2 < 1e-20 else r_left - (2 / c2) * (v2 @ r_left) * v2
    normals = normalized_vector(normals)
    return np.stack([normals, np.cross(tangent, normals)], axis=1)


def _track(points, mask, radii, scale, fan_angle, kappa_ends, rng):
    step = _STEP * scale
    line = _centreline(rng, radii, step)
    tangent = normalized_vector(np.gradient(line, axis=0))
    length = step * (len(line) - 1)
    arc = np.arange(len(line)) * step
    base = rng.uniform(*_RADIUS_RANGE) * scale
    # Fanning: the fibres' angle to the axis grows linearly to fan_angle
    # along the bundle, r' = tan(fan) s / L.
    slope = np.tan(np.radians(fan_angle)) * arc / length
    radius = base + np.tan(np.radians(fan_angle)) * arc ** 2 / (2 * length)

    candidates = np.flatnonzero(mask)
    density = np.zeros(points.shape[0])
    excess = np.full(points.shape[0], np.inf)
    direction = np.full((points.shape[0], 3), np.nan)
    kappa = np.zeros(points.shape[0])
    position = np.full(points.shape[0], np.nan)
    distance, nearest = cKDTree(line).query(points[candidates],
                                            distance_upper_bound=radius.max() + 2)
    found = np.isfinite(distance)
    candidates, nearest = candidates[found], nearest[found]
    offset = points[candidates] - line[nearest]
    along = np.sum(offset * tangent[nearest], axis=1)
    # Beyond the ends the nearest point is an end point: the tube has no
    # fibres there, but a cap of one voxel belongs to the end regions.
    capped = np.abs(along) <= step + 1
    candidates, nearest, offset, along = (candidates[capped], nearest[capped],
                                          offset[capped], along[capped])
    perpendicular = offset - along[:, None] * tangent[nearest]
    width = np.linalg.norm(perpendicular, axis=1)
    excess[candidates] = width - radius[nearest]
    position[candidates] = arc[nearest] / length
    inner = np.abs(along) <= step
    candidates, nearest, perpendicular, width = (candidates[inner], nearest[inner],
                                                 perpendicular[inner], width[inner])
    density[candidates] = _bundle_density(width / radius[nearest])
    direction[candidates] = normalized_vector(
        tangent[nearest] + slope[nearest, None] * perpendicular / radius[nearest, None])
    kappa[candidates] = kappa_ends[0] + (kappa_ends[1] - kappa_ends[0]) * (
        arc[nearest] / length)
    return _Track(line, tangent, _rotation_minimising_frame(line, tangent), radius, slope,
                  fan_angle, kappa_ends, density, excess, direction, kappa, position)


def _shallow_share(track, others, low_angle):
    """Largest share of an overlap with an earlier bundle below ``low_angle``,
    and whether the track overlaps any earlier bundle."""
    worst, overlaps = 0.0, False
    for other in others:
        both = (track.density >= _MIN_BUNDLE_DENSITY) & (other.density >= _MIN_BUNDLE_DENSITY)
        if not both.any():
            continue
        overlaps = True
        cosine = np.abs(np.sum(track.direction[both] * other.direction[both], axis=1))
        angle = np.degrees(np.arccos(np.clip(cosine, 0, 1)))
        worst = max(worst, float(np.mean(angle < low_angle)))
    return worst, overlaps


def _draw_layout(points, mask, radii, scale, n_bundles, low_angle, max_fan_angle,
                 kappa_range, rng):
    """Draw bundles until each crosses an earlier one at mostly wide angles."""
    tracks = []
    for _ in range(_MAX_CANDIDATES):
        if len(tracks) == n_bundles:
            break
        fans = len(tracks) % 2 == 1 and max_fan_angle > 0
        fan_angle = rng.uniform(0.5, 1.0) * max_fan_angle if fans else 0.0
        kappa_ends = tuple(rng.uniform(*kappa_range, size=2))
        track = _track(points, mask, radii, scale, fan_angle, kappa_ends, rng)
        if not np.any(track.density >= _MIN_BUNDLE_DENSITY):
            continue
        shallow, overlaps = _shallow_share(track, tracks, low_angle)
        if tracks and (not overlaps or shallow > _MAX_SHALLOW_SHARE):
            continue
        tracks.append(track)
    if len(tracks) < n_bundles:
        raise ValueError(f"could not lay out n_bundles={n_bundles} bundles crossing at "
                         f"{low_angle} degrees or more in {_MAX_CANDIDATES} draws; ask for "
                         "fewer bundles or a smaller smallest crossing angle")
    return tracks


def watson_axes(mean, kappa, n, rng):
    """``n`` axes per row drawn from Watson distributions around ``mean``.

    Parameters
    ----------
    mean : ndarray, shape (V, 3)
        Unit mean axes.
    kappa : ndarray, shape (V,)
        Concentrations.
    n : int
    rng : numpy.random.Generator

    Returns
    -------
    axes : ndarray, shape (V, n, 3)

    Notes
    -----
    The absolute cosine ``t`` to the mean has density ``exp(kappa t^2)`` on
    [0, 1]; it is drawn from ``exp(kappa t)`` (which bounds it) by inversion
    and accepted with probability ``exp(kappa (t^2 - t))``.
    """
    kappa = np.broadcast_to(np.asarray(kappa, dtype=float)[:, None], (mean.shape[0], n))
    cosine = np.empty(kappa.shape)
    todo = np.ones(kappa.shape, dtype=bool)
    while todo.any():
        k = kappa[todo]
        u = rng.uniform(size=k.size)
        t = 1 + np.log(u + (1 - u) * np.exp(-k)) / k
        accept = rng.uniform(size=k.size) < np.exp(k * (t * t - t))
        index = np.flatnonzero(todo)[accept]
        cosine.flat[index] = t[accept]
        todo.flat[index] = False
    azimuth = rng.uniform(0, 2 * np.pi, size=kappa.shape)
    helper = np.where(np.abs(mean[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]])
    e1 = normalized_vector(np.cross(mean, helper))
    e2 = np.cross(mean, e1)
    sine = np.sqrt(np.clip(1 - cosine ** 2, 0, None))
    return (cosine[..., None] * mean[:, None] + sine[..., None]
            * (np.cos(azimuth)[..., None] * e1[:, None] + np.sin(azimuth)[..., None] * e2[:, None]))


def _wm_signal(gtab, dirs, weights, kappa, axial, radial, intra, n_subfibres, rng):
    """WM signal over s0 (V, N) of dispersed populations."""
    bvals, bvecs = gtab.bvals, gtab.bvecs
    signal = np.zeros((dirs.shape[0], len(bvals)))
    for slot in range(dirs.shape[1]):
        rows = np.flatnonzero(weights[:, slot] > 0)
        if rows.size == 0:
            continue
        axes = watson_axes(dirs[rows, slot], kappa[rows, slot], n_subfibres, rng)
        cosine2 = (axes @ bvecs.T) ** 2  # (V, n, N)
        d_par = axial[rows, slot, None, None]
        d_perp = radial[rows, slot, None, None]
        zeppelin = np.exp(-bvals * (d_perp + (d_par - d_perp) * cosine2))
        f_in = intra[rows, slot, None, None]
        kernel = f_in * np.exp(-bvals * d_par * cosine2) + (1 - f_in) * zeppelin
        signal[rows] += weights[rows, slot, None] * kernel.mean(axis=1)
    return signal


def _merge_populations(slot_dirs, slot_weights, low_angle):
    """Ground-truth populations: slots closer than ``low_angle`` merged into
    their weighted mean axis (principal eigenvector of the weighted scatter)."""
    dirs = np.where(slot_weights[..., None] > 0, slot_dirs, np.nan)
    weights = slot_weights.copy()
    for i in range(MAX_FIBRES):
        for j in range(i + 1, MAX_FIBRES):
            both = (weights[:, i] > 0) & (weights[:, j] > 0)
            cosine = np.abs(np.sum(np.nan_to_num(dirs[:, i] * dirs[:, j]), axis=1))
            close = np.flatnonzero(both & (cosine > np.cos(np.radians(low_angle))))
            if close.size == 0:
                continue
            scatter = (weights[close, i, None, None] * np.einsum("vi,vj->vij", dirs[close, i],
                                                                 dirs[close, i])
                       + weights[close, j, None, None] * np.einsum("vi,vj->vij",
                                                                   dirs[close, j],
                                                                   dirs[close, j]))
            dirs[close, i] = np.linalg.eigh(scatter)[1][..., -1]
            weights[close, i] += weights[close, j]
            weights[close, j] = 0.0
            dirs[close, j] = np.nan
    # Present populations first, by decreasing weight.
    order = np.argsort(-weights, axis=1, kind="stable")
    weights = np.take_along_axis(weights, order, axis=1)
    dirs = np.take_along_axis(dirs, order[..., None], axis=1)
    dirs[weights == 0] = np.nan
    return dirs, weights


def _bundle_truth(track, density, mask, depth, end_depth, shape, centre, n_streamlines,
                  rng):
    """Voxels, end regions and streamlines of one bundle."""
    present = density >= _MIN_BUNDLE_DENSITY
    # End regions: the bundle's tube (its border widened by a voxel, so that
    # tracks ending at the border count) near either end, down to a few
    # voxels of WM below the cortex.
    near = np.isfinite(track.position) & (depth <= end_depth)
    tube = track.excess <= 1
    start = near & tube & (track.position <= _END_SHARE)
    end = near & tube & (track.position >= 1 - _END_SHARE)
    # Streamlines: fixed offsets in the start disc (uniform over its area),
    # widened with the radius along the fan.
    angle = rng.uniform(0, 2 * np.pi, n_streamlines)
    reach = 0.8 * track.radius[0] * np.sqrt(rng.uniform(size=n_streamlines))
    coords = np.stack([reach * np.cos(angle), reach * np.sin(angle)], axis=1)  # (S, 2)
    growth = track.radius / track.radius[0]
    offsets = np.einsum("sk,pkd->spd", coords, track.frame) * growth[None, :, None]
    brain = mask.reshape(shape)
    streamlines = []
    for line in track.centreline[None] + offsets + centre:
        # The part inside the brain (the ends reach the surface).
        voxels = np.clip(np.round(line).astype(int), 0, np.array(shape) - 1)
        inside = np.flatnonzero(brain[tuple(voxels.T)])
        streamlines.append(line[inside[0]:inside[-1] + 1])
    return Bundle(centreline=track.centreline + centre, radius=track.radius,
                  mask=present.reshape(shape),
                  end_regions=np.stack([start.reshape(shape), end.reshape(shape)]),
                  streamlines=streamlines, fan_angle=float(track.fan_angle),
                  kappa=tuple(float(k) for k in track.kappa_ends))
