"""Figures: fODF glyphs, peaks, streamlines, tissue fractions, training curves, accuracy.

matplotlib only. Every plotting function draws into the ``ax`` it is given
(a new figure is made through pyplot when it is ``None``) and returns the
Axes it drew on, or the Figure for multi-panel plots; nothing here calls
``plt.show``. :func:`save_figure` writes a figure without ever overwriting a
file unless asked to.

Orientation of slice plots
--------------------------
Slices are shown in voxel (array) coordinates: the slice ``axis`` is removed,
the first remaining array axis runs horizontally (left to right) and the
second vertically (bottom to top, origin lower), and voxel ``(i, j)`` of the
slice is centred at data coordinates ``(i, j)`` with equal aspect. For
``axis=2`` (axial) that is x horizontal and y vertical, for ``axis=1``
(coronal) x and z, for ``axis=0`` (sagittal) y and z. For an image stored
RAS+ (e.g. after ``nibabel.as_closest_canonical``) the axial and coronal
views are in neurological convention (the subject's right on the right of the
plot); call ``ax.invert_xaxis()`` for radiological convention. Given the
image's ``affine``, the slice functions label the four edges with the
anatomical direction each voxel axis points to (R/L, A/P, S/I, the nearest
one for an oblique affine, as ``nibabel.aff2axcodes`` gives it), name the
plane (axial, coronal, sagittal) and say in the axis labels how oblique the
grid is. Directions are coloured like MRtrix3 and DIPY, red/green/blue =
``|x|, |y|, |z|`` of the direction in voxel axes.
"""

import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from dipy.core.sphere import Sphere
from dipy.reconst.shm import sh_to_sf_matrix
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from nibabel.orientations import aff2axcodes

from esdmri.atomic import staged_output
from esdmri.peaks import SH_BASES, sh_order_from_coeffs

_AXIS_NAMES = ("x", "y", "z")
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
_PLANES = {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal", "S": "axial",
           "I": "axial"}
# Voxel axes further than this from their nearest world axis are called oblique.
_OBLIQUE_DEGREES = 1.0
_GLYPH_NORMS = ("max", "global")
# Default glyph sampling: 90 in-plane azimuths (4 degree outline resolution) x
# 45 elevations from the slice plane, with elevation 0 included so in-plane
# lobes are sampled exactly at their tips.
_N_AZIMUTHS = 90
_N_ELEVATIONS = 45
# Fewer outline angles tried, in order, when a user sphere is too coarse to
# put a vertex in each of 90 azimuth bins.
_OUTLINE_ANGLE_CHOICES = (90, 72, 60, 48, 36, 30, 24, 18, 12, 8)
# Float64 values per chunk of voxels evaluated together (~64 MB per array).
_CHUNK_ELEMENTS = 8_000_000


# --------------------------------------------------------------------------
# Slicing helpers
# --------------------------------------------------------------------------

def _in_plane_axes(axis):
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (the slicing array axis), got {axis!r}")
    return tuple(a for a in range(3) if a != axis)


def _slice_index(shape, axis, index):
    size = shape[axis]
    if index is None:
        return size // 2
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"index must be an int or None, got {type(index).__name__}")
    if not 0 <= index < size:
        raise ValueError(f"index must be in [0, {size - 1}] along axis {axis}, got {index}")
    return int(index)


def _take_slice(volume, axis, index):
    """(A, B, ...) slice of a (X, Y, Z, ...) volume, in-plane axes in array order."""
    return np.take(volume, index, axis=axis)


def _spatial_map(volume, shape, name):
    """Check a (X, Y, Z) map against the spatial shape of the main input."""
    volume = np.asarray(volume)
    if volume.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the spatial shape of "
                         f"the plotted data), got {volume.shape}")
    return volume


def _new_axes(ax, figsize=(6, 6)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    elif not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


def _check_affine(affine):
    """A (4, 4) voxel-to-world affine as floats, or None."""
    if affine is None:
        return None
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) \
            or abs(np.linalg.det(affine[:3, :3])) == 0:
        raise ValueError("affine must be an invertible (4, 4) voxel-to-world matrix, got "
                         f"shape {affine.shape}")
    return affine


def slice_orientation(affine, axis):
    """Anatomical names of a slice's plane and of its in-plane voxel axes.

    Parameters
    ----------
    affine : ndarray (4, 4)
        Voxel-to-world (RAS+ mm) affine of the image.
    axis : int
        Array axis normal to the slice.

    Returns
    -------
    plane : str
        "axial", "coronal" or "sagittal": the world axis nearest to the
        slice normal.
    codes : tuple of str
        For the horizontal then the vertical in-plane axis, the direction
        (R, L, A, P, S or I) it points to with increasing index.
    oblique : tuple of float
        For the same two axes, degrees between the voxel axis and its
        nearest world axis (0 for an axis-aligned image).
    """
    affine = _check_affine(affine)
    in_plane = _in_plane_axes(axis)
    all_codes = aff2axcodes(affine)
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    oblique = np.degrees(np.arccos(np.clip(np.abs(columns).max(axis=0), -1.0, 1.0)))
    return (_PLANES[all_codes[axis]], tuple(all_codes[a] for a in in_plane),
            tuple(float(oblique[a]) for a in in_plane))


def _setup_slice_axes(ax, plane_shape, axis, index, background, in_plane, affine=None,
                      background_label="background"):
    """Equal-aspect voxel-centred frame, with the background slice (and its colour bar)
    below and, given the affine, the anatomical directions on its edges."""
    if background is not None:
        image = _take_slice(background, axis, index).astype(float)
        finite = image[np.isfinite(image)]
        vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        # imshow's (rows, columns) are (vertical, horizontal): transpose so the
        # first in-plane axis runs horizontally; origin lower puts voxel (i, j)
        # at data (i, j).
        shown = ax.imshow(image.T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax,
                          interpolation="nearest", zorder=0)
        ax.figure.colorbar(shown, ax=ax, shrink=0.8, label=background_label)
    ax.set_xlim(-0.5, plane_shape[0] - 0.5)
    ax.set_ylim(-0.5, plane_shape[1] - 0.5)
    ax.set_aspect("equal")
    labels = [f"{_AXIS_NAMES[a]} (voxel)" for a in in_plane]
    title = f"slice {_AXIS_NAMES[axis]} = {index}"
    if affine is not None:
        plane, codes, oblique = slice_orientation(affine, axis)
        title = f"{plane} {title}"
        halo = [patheffects.withStroke(linewidth=2.5, foreground="black")]
        # A second plot on the same Axes (peaks over glyphs) keeps the letters.
        labelled = any(text.get_gid() == "orientation" for text in ax.texts)
        edges = ((codes[0], 0.99, 0.5, "right", "center"),
                 (_OPPOSITE[codes[0]], 0.01, 0.5, "left", "center"),
                 (codes[1], 0.5, 0.99, "center", "top"),
                 (_OPPOSITE[codes[1]], 0.5, 0.01, "center", "bottom"))
        for letter, x, y, horizontal, vertical in () if labelled else edges:
            ax.text(x, y, letter, transform=ax.transAxes, ha=horizontal, va=vertical,
                    color="white", fontweight="bold", path_effects=halo, zorder=5,
                    gid="orientation")
        for k, (code, degrees) in enumerate(zip(codes, oblique)):
            tilt = f", {degrees:.0f} deg oblique" if degrees > _OBLIQUE_DEGREES else ""
            labels[k] = f"{labels[k][:-1]}, towards {code}{tilt})"
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)


# --------------------------------------------------------------------------
# ODF glyphs
# --------------------------------------------------------------------------

def _glyph_sphere(in_plane, axis):
    """Azimuth x elevation grid in the slice frame, as world unit vectors."""
    azimuth = 2 * np.pi * np.arange(_N_AZIMUTHS) / _N_AZIMUTHS
    elevation = np.linspace(-np.pi / 2, np.pi / 2, _N_ELEVATIONS + 2)[1:-1]
    azimuth, elevation = (g.ravel() for g in np.meshgrid(azimuth, elevation,
                                                         indexing="ij"))
    vertices = np.empty((azimuth.size, 3))
    vertices[:, in_plane[0]] = np.cos(elevation) * np.cos(azimuth)
    vertices[:, in_plane[1]] = np.cos(elevation) * np.sin(azimuth)
    vertices[:, axis] = np.sin(elevation)
    return vertices


def _azimuth_bins(in_plane_xy, n_angles):
    """Index of the outline angle ``2 pi k / n_angles`` nearest to each vertex."""
    azimuth = np.arctan2(in_plane_xy[:, 1], in_plane_xy[:, 0])
    return np.round(azimuth / (2 * np.pi / n_angles)).astype(int) % n_angles


def _outline_bins(in_plane_xy, from_grid):
    """Outline angle count and (n_angles, m) vertex indices per angle bin.

    Rows are padded with the index ``V`` (one past the last vertex), which
    the caller maps to a radius below every real one.
    """
    n_vertices = len(in_plane_xy)
    choices = (_N_AZIMUTHS,) if from_grid else _OUTLINE_ANGLE_CHOICES
    for n_angles in choices:
        bins = _azimuth_bins(in_plane_xy, n_angles)
        counts = np.bincount(bins, minlength=n_angles)
        if counts.min() > 0:
            break
    else:
        raise ValueError(f"sphere has too few vertices ({n_vertices}) to outline glyphs; "
                         "give a sphere with at least a few hundred vertices")
    order = np.argsort(bins, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slot = np.arange(n_vertices) - starts[bins[order]]
    table = np.full((n_angles, counts.max()), n_vertices)
    table[bins[order], slot] = order
    return table


def odf_glyph_outlines(shm_coeff, axis=2, index=None, sphere=None,
                       basis_type="descoteaux07", legacy=None, mask=None,
                       scale=0.9, norm="max"):
    """Outlines of fODF glyphs of one slice, projected onto the slice plane.

    Each glyph is the surface ``r(u) u`` with ``r(u) = max(f(u), 0) / n`` for the
    fODF ``f`` of the voxel and ``n`` its maximum (``norm="max"``) or the
    maximum over the slice (``norm="global"``). Its orthogonal projection onto
    the slice plane is star-shaped about the voxel centre, so it is outlined
    exactly by its radius in each in-plane direction ``phi``: the largest
    projected radius ``r(u) |P u|`` over the sphere directions ``u`` whose
    projection ``P u`` points along ``phi``. A crossing therefore shows both
    lobes, and a fibre leaving the plane shows its shortened projection.

    Parameters
    ----------
    shm_coeff : ndarray (X, Y, Z, C)
        Even-order SH coefficients of the fODF.
    axis : int
        Array axis normal to the slice (2: axial, 1: coronal, 0: sagittal).
    index : int, optional
        Slice index along ``axis``; the middle slice when None.
    sphere : dipy.core.sphere.Sphere, optional
        Directions at which the fODF is sampled (antipodes are added). Default:
        a 90 azimuth x 45 elevation grid in the slice frame (4050 directions),
        exact at every outline angle.
    basis_type : {"descoteaux07", "tournier07"}
        SH basis of ``shm_coeff``.
    legacy : bool, optional
        DIPY's legacy version of the basis. Default: legacy for
        ``descoteaux07`` (DIPY's default basis, that of ``fit.shm_coeff``
        and of DIPY's CSD), non-legacy for ``tournier07`` (MRtrix3's).
    mask : ndarray (X, Y, Z), optional
        Voxels to draw; voxels whose fODF is not positive anywhere or not
        finite are always skipped.
    scale : float
        Glyph size: a lobe of normalised radius 1 in the plane reaches
        ``scale / 2`` voxels from the centre, so ``scale=0.9`` fills 90% of the
        voxel cell.
    norm : {"max", "global"}
        Normalise each glyph by its own maximum or by the slice's maximum.

    Returns
    -------
    centres : ndarray (N, 2)
        In-plane voxel indices of the N drawn glyphs.
    outlines : ndarray (N, A, 2)
        Outline points in slice coordinates (voxel centre + projected surface
        point), counter-clockwise at in-plane angles ``2 pi k / A``.
    colours : ndarray (N, A, 3)
        RGB ``|u|`` of the sphere direction behind each outline point.
    """
    shm_coeff = np.asarray(shm_coeff)
    if shm_coeff.ndim != 4 or not np.issubdtype(shm_coeff.dtype, np.number):
        raise ValueError("shm_coeff must be a numeric (X, Y, Z, C) array of SH "
                         f"coefficients, got shape {shm_coeff.shape}")
    sh_order_max = sh_order_from_coeffs(shm_coeff.shape[-1])
    if basis_type not in SH_BASES:
        raise ValueError(f"basis_type must be one of {SH_BASES}, got {basis_type!r}")
    if norm not in _GLYPH_NORMS:
        raise ValueError(f"norm must be one of {_GLYPH_NORMS}, got {norm!r}")
    if not np.isscalar(scale) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    in_plane = _in_plane_axes(axis)
    index = _slice_index(shm_coeff.shape, axis, index)

    if sphere is None:
        vertices = _glyph_sphere(in_plane, axis)
    elif isinstance(sphere, Sphere):
        # fODFs are even, so the antipodes of a hemisphere complete the glyph.
        vertices = np.concatenate([sphere.vertices, -sphere.vertices])
    else:
        raise TypeError(f"sphere must be a dipy Sphere or None, got {type(sphere).__name__}")
    if legacy is None:
        legacy = basis_type == "descoteaux07"
    with warnings.catch_warnings():
        # The legacy basis is DIPY's default; reading it is not a mistake.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        basis = sh_to_sf_matrix(Sphere(xyz=vertices), sh_order_max=sh_order_max,
                                basis_type=basis_type, legacy=legacy, return_inv=False)
    in_plane_xy = vertices[:, in_plane]
    table = _outline_bins(in_plane_xy, from_grid=sphere is None)
    projected_norm = np.hypot(in_plane_xy[:, 0], in_plane_xy[:, 1])

    coeffs = _take_slice(shm_coeff, axis, index)
    keep = np.all(np.isfinite(coeffs), axis=-1)
    if mask is not None:
        keep &= _take_slice(_spatial_map(mask, shm_coeff.shape[:3], "mask"),
                            axis, index).astype(bool)
    centres = np.argwhere(keep)
    coeffs = coeffs[keep].astype(float)

    n_angles = table.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(table.size, len(vertices)))
    radius = np.empty((len(coeffs), n_angles))
    vertex = np.empty((len(coeffs), n_angles), dtype=int)
    peak = np.empty(len(coeffs))
    for first in range(0, len(coeffs), chunk):
        r = np.clip(coeffs[first:first + chunk] @ basis, 0, None)
        peak[first:first + chunk] = r.max(axis=1, initial=0.0)
        # Projected radius, padded with -1 for the table's filler index.
        rho = np.pad(r * projected_norm, ((0, 0), (0, 1)), constant_values=-1.0)
        best = rho[:, table].argmax(axis=-1)
        chosen = table[np.arange(n_angles), best]
        vertex[first:first + chunk] = chosen
        radius[first:first + chunk] = np.take_along_axis(r, chosen, axis=1)

    drawn = peak > 0
    centres, radius, vertex, peak = centres[drawn], radius[drawn], vertex[drawn], peak[drawn]
    if norm == "max":
        divisor = peak[:, None]
    else:
        divisor = peak.max() if peak.size else 1.0
    radius = radius / divisor * (scale / 2)
    outlines = centres[:, None, :] + radius[..., None] * in_plane_xy[vertex]
    colours = np.abs(vertices[vertex])
    return centres, outlines, colours


def plot_odf_slice(shm_coeff, axis=2, index=None, sphere=None,
                   basis_type="descoteaux07", legacy=None, background=None,
                   mask=None, scale=0.9, ax=None, norm="max", affine=None,
                   background_label="background"):
    """Draw fODF glyphs of one slice, optionally over a background map.

    Each glyph is the fODF surface projected onto the slice plane (see
    :func:`odf_glyph_outlines`), filled with a fan of triangles from the voxel
    centre, each coloured by the direction behind it (red/green/blue =
    ``|x|, |y|, |z|``), so crossing lobes show their own colours. Orientation:
    see the module docstring (first in-plane array axis horizontal, second
    vertical, origin lower, voxel ``(i, j)`` centred at ``(i, j)``).

    Parameters
    ----------
    shm_coeff : ndarray (X, Y, Z, C)
        Even-order SH coefficients of the fODF, by default in DIPY's default
        basis (legacy ``descoteaux07``): ``fit.shm_coeff`` of esdmri's models
        and DIPY's CSD plot as they are; pass ``legacy=False`` for
        ``fit.shm_coeff_descoteaux07``.
    axis : int
        Array axis normal to the slice (2: axial, 1: coronal, 0: sagittal).
    index : int, optional
        Slice index; the middle slice when None.
    sphere : dipy.core.sphere.Sphere, optional
        Sampling directions; default: a dense grid in the slice frame.
    basis_type : {"descoteaux07", "tournier07"}
    legacy : bool, optional
        See :func:`odf_glyph_outlines` (default: legacy for descoteaux07).
    background : ndarray (X, Y, Z), optional
        Scalar map (GFA, FA, a fraction) drawn in grey below the glyphs, with
        a colour bar.
    mask : ndarray (X, Y, Z), optional
        Voxels to draw glyphs in.
    scale : float
        Glyph size relative to the voxel cell (0.9: lobes span 90% of it).
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when None.
    norm : {"max", "global"}
        Normalise each glyph by its own maximum or by the slice's maximum.
    affine : ndarray (4, 4), optional
        Voxel-to-world affine of the image: labels the edges with anatomical
        directions and names the plane (see the module docstring).
    background_label : str
        Label of the background's colour bar (what the map is).

    Returns
    -------
    ax : matplotlib.axes.Axes
    """
    shm_coeff = np.asarray(shm_coeff)
    centres, outlines, colours = odf_glyph_outlines(
        shm_coeff, axis=axis, index=index, sphere=sphere, basis_type=basis_type,
        legacy=legacy, mask=mask, scale=scale, norm=norm)
    in_plane = _in_plane_axes(axis)
    index = _slice_index(shm_coeff.shape, axis, index)
    if background is not None:
        background = _spatial_map(background, shm_coeff.shape[:3], "background")
    ax = _new_axes(ax)
    _setup_slice_axes(ax, [shm_coeff.shape[a] for a in in_plane], axis, index,
                      background, in_plane, _check_affine(affine), background_label)

    # Outlines are star-shaped about the voxel centre: a fan of triangles from
    # the centre fills each glyph exactly.
    hub = np.broadcast_to(centres[:, None, :].astype(float), outlines.shape)
    triangles = np.stack([hub, outlines, np.roll(outlines, -1, axis=1)],
                         axis=2).reshape(-1, 3, 2)
    face = ((colours + np.roll(colours, -1, axis=1)) / 2).reshape(-1, 3)
    # Edges in the face colour hide the hairline seams between fan triangles.
    ax.add_collection(PolyCollection(triangles, facecolors=face, edgecolors=face,
                                     linewidths=0.25, zorder=2),
                      autolim=False)
    return ax


# --------------------------------------------------------------------------
# Peaks
# --------------------------------------------------------------------------

def plot_peaks_slice(directions, values=None, axis=2, index=None, ax=None,
                     background=None, scale=1.0, linewidth=1.0, color="black", affine=None,
                     background_label="background"):
    """Draw peaks of one slice as line segments through the voxel centres.

    Each peak is the segment ``centre +- (scale / 2) w P d`` for its unit
    direction ``d`` projected onto the slice plane (``P``), so peaks leaving
    the plane shorten; ``w`` is the peak value over the voxel's largest value
    when ``values`` is given, else 1. Drawn over the glyphs of
    :func:`plot_odf_slice` (on its Axes), the default peaks are thin black
    lines with a white edge through the lobes, a little longer than the
    glyphs (the full voxel against 90% of it), so that the direction colours
    of the lobes stay visible on both sides of each line.

    Parameters
    ----------
    directions : ndarray (X, Y, Z, npeaks, 3)
        Peak directions, NaN- (or zero-) padded.
    values : ndarray (X, Y, Z, npeaks), optional
        Peak amplitudes scaling the segment lengths.
    axis : int
        Array axis normal to the slice.
    index : int, optional
        Slice index; the middle slice when None.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when None.
    background : ndarray (X, Y, Z), optional
        Scalar map drawn in grey below the peaks, with a colour bar.
    scale : float
        Length of a full-value in-plane peak, in voxels.
    linewidth : float
        Line width in points.
    color : matplotlib colour or "direction"
        One colour for every peak (with a white edge, or a black one for a
        light colour), or "direction" for ``|d|`` as RGB without edge (a peak
        map on its own).
    affine : ndarray (4, 4), optional
        Voxel-to-world affine: anatomical directions on the edges.
    background_label : str
        Label of the background's colour bar.

    Returns
    -------
    ax : matplotlib.axes.Axes
    """
    directions = np.asarray(directions, dtype=float)
    if directions.ndim != 5 or directions.shape[-1] != 3:
        raise ValueError("directions must have shape (X, Y, Z, npeaks, 3), got "
                         f"{directions.shape}")
    in_plane = _in_plane_axes(axis)
    index = _slice_index(directions.shape, axis, index)
    if background is not None:
        background = _spatial_map(background, directions.shape[:3], "background")

    peaks = _take_slice(directions, axis, index)  # (A, B, P, 3)
    length = np.linalg.norm(peaks, axis=-1)
    present = np.isfinite(length) & (length > 0)
    weight = present.astype(float)
    if values is not None:
        values = np.asarray(values, dtype=float)
        if values.shape != directions.shape[:-1]:
            raise ValueError(f"values must have shape {directions.shape[:-1]} "
                             f"(directions without its last axis), got {values.shape}")
        amplitude = np.where(present, np.abs(_take_slice(values, axis, index)), 0.0)
        amplitude = np.nan_to_num(amplitude)
        largest = amplitude.max(axis=-1, keepdims=True)
        weight = np.divide(amplitude, largest, out=np.zeros_like(amplitude),
                           where=largest > 0)
    ax = _new_axes(ax)
    _setup_slice_axes(ax, [directions.shape[a] for a in in_plane], axis, index,
                      background, in_plane, _check_affine(affine), background_label)
    a, b, p = np.nonzero(present & (weight > 0))
    unit = peaks[a, b, p] / length[a, b, p, None]
    half = (scale / 2) * weight[a, b, p, None] * unit[:, in_plane]
    centre = np.stack([a, b], axis=-1).astype(float)
    segments = np.stack([centre - half, centre + half], axis=1)
    if isinstance(color, str) and color == "direction":
        lines = LineCollection(segments, colors=np.abs(unit), linewidths=linewidth,
                               capstyle="round", zorder=3)
    else:
        lines = LineCollection(segments, colors=[color], linewidths=linewidth,
                               capstyle="round", zorder=3)
        light = np.mean(to_rgb(color)) > 0.5
        lines.set_path_effects([patheffects.withStroke(linewidth=linewidth + 1.0,
                                                       foreground="black" if light
                                                       else "white")])
    ax.add_collection(lines, autolim=False)
    return ax


# --------------------------------------------------------------------------
# Streamlines
# --------------------------------------------------------------------------

def plot_streamlines_slice(streamlines, affine, shape, axis=2, index=None, slab=None,
                           background=None, background_label="background", ax=None,
                           linewidth=0.8, alpha=0.8):
    """Streamlines over a slice, each step coloured by its direction (a quick look).

    The streamlines are brought from world (RAS mm) into voxel coordinates
    with the inverse of ``affine`` and projected onto the slice plane; with
    ``slab`` only the steps whose midpoints lie within ``slab / 2`` voxels of
    the slice are drawn. Each step is coloured like the glyphs,
    red/green/blue = ``|x|, |y|, |z|`` of its direction in voxel axes.

    Parameters
    ----------
    streamlines : sequence of ndarray (n_i, 3)
        Points in world coordinates (RAS mm), as DIPY's ``LocalTracking``
        with ``affine`` and ``StatefulTractogram`` in ``Space.RASMM`` give them.
    affine : ndarray (4, 4)
        Voxel-to-world affine of the grid the streamlines were tracked on.
    shape : tuple of 3 int
        Spatial shape (X, Y, Z) of that grid.
    axis : int
        Array axis normal to the slice.
    index : int, optional
        Slice index; the middle slice when None.
    slab : float, optional
        Thickness in voxels of the slab around the slice whose steps are
        drawn (None: every step, projected).
    background : ndarray (X, Y, Z), optional
        Scalar map drawn in grey below the streamlines, with a colour bar.
    background_label : str
        Label of the background's colour bar.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when None.
    linewidth : float
        Line width in points.
    alpha : float
        Opacity of the lines (overlapping streamlines look denser).

    Returns
    -------
    ax : matplotlib.axes.Axes
    """
    affine = _check_affine(affine)
    if affine is None:
        raise ValueError("affine is required: streamlines are in world coordinates")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be the spatial shape (X, Y, Z), got {shape}")
    if slab is not None and not slab > 0:
        raise ValueError(f"slab must be a positive thickness in voxels or None, got {slab}")
    in_plane = _in_plane_axes(axis)
    index = _slice_index(shape, axis, index)
    if background is not None:
        background = _spatial_map(background, shape, "background")
    inverse = np.linalg.inv(affine)
    segments, colours = [], []
    for points in streamlines:
        points = np.asarray(points, dtype=float)
        if points.ndim != 2 or points.shape[-1] != 3:
            raise ValueError(f"each streamline must be an (n, 3) array, got {points.shape}")
        if len(points) < 2:
            continue
        voxels = points @ inverse[:3, :3].T + inverse[:3, 3]
        steps = np.diff(voxels, axis=0)
        keep = np.linalg.norm(steps, axis=-1) > 0
        if slab is not None:
            middle = (voxels[:-1, axis] + voxels[1:, axis]) / 2
            keep &= np.abs(middle - index) <= slab / 2
        pairs = np.stack([voxels[:-1], voxels[1:]], axis=1)[keep][..., in_plane]
        segments.append(pairs)
        colours.append(np.abs(steps[keep]) / np.linalg.norm(steps[keep], axis=-1,
                                                              keepdims=True))
    ax = _new_axes(ax)
    _setup_slice_axes(ax, [shape[a] for a in in_plane], axis, index, background,
                      in_plane, affine, background_label)
    if segments:
        ax.add_collection(LineCollection(np.concatenate(segments), colors=np.concatenate(
            colours), linewidths=linewidth, alpha=alpha, capstyle="round", zorder=3),
            autolim=False)
    return ax


# --------------------------------------------------------------------------
# Maps, training, accuracy
# --------------------------------------------------------------------------

def _fraction_volumes(fractions, names):
    if isinstance(fractions, dict):
        if names is not None:
            raise ValueError("names must be None when fractions is a dict (its keys "
                             "are the names)")
        if not fractions:
            raise ValueError("fractions must hold at least one map, got an empty dict")
        names = [str(name) for name in fractions]
        volumes = [np.asarray(volume, dtype=float) for volume in fractions.values()]
    else:
        stack = np.asarray(fractions, dtype=float)
        if stack.ndim != 4:
            raise ValueError("fractions must be a dict name -> (X, Y, Z) array or an "
                             f"(X, Y, Z, T) array, got shape {stack.shape}")
        volumes = list(np.moveaxis(stack, -1, 0))
        names = [f"map {t}" for t in range(len(volumes))] if names is None else list(names)
        if len(names) != len(volumes):
            raise ValueError(f"names must give one name per map ({len(volumes)}), "
                             f"got {len(names)}")
    shape = volumes[0].shape
    for name, volume in zip(names, volumes):
        if volume.ndim != 3 or volume.shape != shape:
            raise ValueError(f"fractions[{name!r}] must be an (X, Y, Z) map of shape "
                             f"{shape} like the first, got {volume.shape}")
    return names, volumes


def plot_fraction_maps(fractions, names=None, axis=2, index=None, ax=None,
                       cmap="viridis", affine=None):
    """One panel per tissue volume-fraction map of a slice, with colour bars.

    Colour range fixed to [0, 1] so panels and figures compare directly.

    Parameters
    ----------
    fractions : dict of str -> ndarray (X, Y, Z), or ndarray (X, Y, Z, T)
        Fraction maps by tissue name, or stacked along the last axis.
    names : sequence of str, optional
        Tissue names for a stacked array (T of them, e.g. ``("wm", "gm",
        "csf")``); default "map 0", "map 1", ...
    axis : int
        Array axis normal to the slice.
    index : int, optional
        Slice index; the middle slice when None.
    ax : sequence of matplotlib.axes.Axes, optional
        One Axes per map; a new figure with a row of panels when None.
    cmap : str
        Colour map.
    affine : ndarray (4, 4), optional
        Voxel-to-world affine: anatomical directions on the edges.

    Returns
    -------
    fig : matplotlib.figure.Figure
    """
    names, volumes = _fraction_volumes(fractions, names)
    in_plane = _in_plane_axes(axis)
    index = _slice_index(volumes[0].shape, axis, index)
    if ax is None:
        fig, ax = plt.subplots(1, len(volumes), figsize=(3.6 * len(volumes), 3.4),
                               squeeze=False, layout="constrained")
        ax = ax[0]
    else:
        ax = list(ax) if not isinstance(ax, Axes) else [ax]
        if len(ax) != len(volumes) or not all(isinstance(a, Axes) for a in ax):
            raise ValueError(f"ax must be a sequence of {len(volumes)} Axes (one per "
                             f"map), got {len(ax)} items")
        fig = ax[0].figure
    plane_shape = [volumes[0].shape[a] for a in in_plane]
    for panel, name, volume in zip(ax, names, volumes):
        image = panel.imshow(_take_slice(volume, axis, index).T, origin="lower",
                             cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        _setup_slice_axes(panel, plane_shape, axis, index, None, in_plane,
                          _check_affine(affine))
        panel.set_title(f"{name} ({panel.get_title()})")
        fig.colorbar(image, ax=panel, shrink=0.8, label="volume fraction")
    return fig


def plot_training_curves(history, ax=None, terms=None):
    """Loss terms per epoch on a log scale, learning rate on a second axis.

    Parameters
    ----------
    history : list of dict
        One record per epoch, e.g. ``{"epoch": 3, "total": 0.02, "intensity":
        0.018, "sparsity": ..., "nonnegativity": ..., "total_variation": ...,
        "lr": 1e-3}`` as returned by training; a missing ``"epoch"`` counts
        records from 0.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when None.
    terms : sequence of str, optional
        Loss terms to draw; default every numeric key but ``epoch`` and ``lr``.
        Non-positive values (a switched-off term) are left out of the log plot.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The loss Axes (the learning rate, when present, is on its twin).
    """
    if (not isinstance(history, (list, tuple)) or not history
            or not all(isinstance(record, dict) for record in history)):
        raise ValueError("history must be a non-empty list of dicts, one per epoch")
    if terms is None:
        terms = [key for key, value in history[0].items()
                 if key not in ("epoch", "lr") and np.isscalar(value)
                 and np.issubdtype(type(value), np.number)]
    missing = sorted({term for term in terms for record in history if term not in record})
    if missing:
        raise ValueError(f"history records lack the terms {missing}")
    ax = _new_axes(ax, figsize=(7, 4))
    epochs = np.array([record.get("epoch", i) for i, record in enumerate(history)])
    for term in terms:
        value = np.array([record[term] for record in history], dtype=float)
        value[~(value > 0)] = np.nan
        bold = term == "total"
        ax.plot(epochs, value, label=term, linewidth=2.2 if bold else 1.3,
                color="black" if bold else None, zorder=3 if bold else 2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if all("lr" in record for record in history):
        twin = ax.twinx()
        twin.plot(epochs, [record["lr"] for record in history], color="grey",
                  linestyle="--", label="learning rate")
        twin.set_yscale("log")
        twin.set_ylabel("learning rate")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right", fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    return ax


def binned_mean_std(x, y, bins):
    """Mean and standard deviation of ``y`` in bins of ``x``.

    Parameters
    ----------
    x, y : ndarray (n,)
        Samples; pairs with a non-finite member are dropped.
    bins : ndarray (B + 1,)
        Increasing bin edges; bins are ``[e_k, e_k+1)``, the last one closed.

    Returns
    -------
    mean, std, count : ndarray (B,)
        NaN mean and std in empty bins.
    """
    x, y = np.ravel(x).astype(float), np.ravel(y).astype(float)
    keep = np.isfinite(x) & np.isfinite(y) & (x >= bins[0]) & (x <= bins[-1])
    x, y = x[keep], y[keep]
    n_bins = len(bins) - 1
    which = np.clip(np.searchsorted(bins, x, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    total = np.bincount(which, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        squares = np.bincount(which, weights=(y - mean[which]) ** 2, minlength=n_bins)
        std = np.sqrt(squares / count)
    return mean, std, count


def plot_angular_error_vs_crossing(results, bins=np.arange(0, 91, 10), ax=None,
                                   threshold=None, title="Angular error vs crossing angle"):
    """Mean angular error +- standard deviation per crossing-angle bin and method.

    The number of voxels behind each point is written under it (one row per
    method unless every method has the same counts), and the title says the
    peak threshold the errors were measured at.

    Parameters
    ----------
    results : dict of str -> (ndarray (n,), ndarray (n,))
        Per method, the crossing angle of each voxel (degrees, e.g. from
        :func:`esdmri.metrics.crossing_angles`) and its angular error
        (degrees, :func:`esdmri.metrics.angular_errors`). Non-finite pairs
        (voxels without a crossing) are dropped.
    bins : ndarray (B + 1,)
        Increasing crossing-angle bin edges in degrees.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when None.
    threshold : float, optional
        Relative peak threshold of the peaks scored, added to the title.
    title : str
        Title (what is compared; e.g. the data set).

    Returns
    -------
    ax : matplotlib.axes.Axes
    """
    if not isinstance(results, dict) or not results:
        raise ValueError("results must be a non-empty dict method -> (crossing_angles, "
                         "angular_errors)")
    bins = np.asarray(bins, dtype=float)
    if bins.ndim != 1 or len(bins) < 2 or np.any(np.diff(bins) <= 0):
        raise ValueError(f"bins must be at least two increasing edges, got {bins}")
    series = {}
    for method, pair in results.items():
        if len(pair) != 2:
            raise ValueError(f"results[{method!r}] must be a pair (crossing_angles, "
                             "angular_errors)")
        angles, errors = (np.asarray(a, dtype=float) for a in pair)
        if angles.shape != errors.shape:
            raise ValueError(f"results[{method!r}]: crossing_angles {angles.shape} and "
                             f"angular_errors {errors.shape} must have the same shape")
        series[method] = binned_mean_std(angles, errors, bins)
    ax = _new_axes(ax, figsize=(6, 4))
    centres = (bins[:-1] + bins[1:]) / 2
    # Shift methods sideways within a bin so their error bars do not overlap.
    spread = 0.3 * np.diff(bins).min()
    offsets = np.linspace(-spread / 2, spread / 2, len(series)) if len(series) > 1 else [0.0]
    for offset, (method, (mean, std, _)) in zip(offsets, series.items()):
        ax.errorbar(centres + offset, mean, yerr=std, label=method, marker="o",
                    markersize=4, capsize=3)
    ax.set_xlim(bins[0], bins[-1])
    ax.set_ylim(bottom=0)
    # Voxels per bin on a top axis: one number when every method has the
    # same voxels, else one per method.
    counts = [count for _, _, count in series.values()]
    shared = all(np.array_equal(count, counts[0]) for count in counts)
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, ["{}".format(counts[0][k]) if shared else
                             "/".join(str(count[k]) for count in counts)
                             for k in range(len(centres))], fontsize="small")
    top.set_xlabel("voxels per bin" + ("" if shared else f" ({'/'.join(series)})"),
                   fontsize="small")
    ax.set_xlabel("crossing angle (degrees)")
    ax.set_ylabel("angular error (degrees)")
    if threshold is not None:
        title = f"{title} (relative peak threshold {threshold:g})"
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------

def save_figure(fig, path, force=False, dpi=150):
    """Write a figure to an image file, never overwriting unless ``force``.

    Parameters
    ----------
    fig : matplotlib.figure.Figure or matplotlib.axes.Axes
        The figure (or an Axes of it) to save.
    path : str or os.PathLike
        Output file; the format follows its extension (``.png``, ``.pdf``,
        ``.svg``).
    force : bool
        Overwrite an existing file.
    dpi : float
        Resolution of raster formats.

    Returns
    -------
    path : pathlib.Path
    """
    if isinstance(fig, Axes):
        fig = fig.figure
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure or Axes, got {type(fig).__name__}")
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"path: folder {str(folder)!r} does not exist")
    if path.exists() and not force:
        raise FileExistsError(f"path: {str(path)!r} exists; use force=True to overwrite it")
    with staged_output(path) as temporary:  # named like path: same format
        fig.savefig(temporary, dpi=dpi, bbox_inches="tight")
    return path
