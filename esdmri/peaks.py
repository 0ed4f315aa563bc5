"""Peak extraction from SH fODFs, shared by every method and ground truth.

Every method in this project (DIPY CSD, MSMT-CSD, the deconvolution networks,
DiSCo ground-truth fODFs) is judged on peaks extracted by the same function,
:func:`peaks_from_sh`: the fODF is evaluated on a dense sphere with one
matrix product per chunk of voxels, DIPY's ``peak_directions`` finds the
local maxima of each voxel and :func:`subvertex_directions` moves each one to
the maximum of a quadratic through its vertex's neighbourhood, below the
sphere's vertex spacing. :func:`peaks_threshold_sweep` gives the peaks at
many relative thresholds from a single search (see its notes for why that is
exact), and :func:`peaks_to_dipy` wraps the result in DIPY's
``PeaksAndMetrics`` for ``.pam5`` files and EuDX tracking.
"""

import warnings
from functools import cache, lru_cache

import numpy as np
from dipy.core.sphere import Sphere
from dipy.data import default_sphere
from dipy.direction.peaks import PeaksAndMetrics
from dipy.reconst.dirspeed import peak_directions
from dipy.reconst.odf import gfa
from dipy.reconst.shm import sh_to_sf_matrix

SH_BASES = ("descoteaux07", "tournier07")

# Neighbours of a vertex that the sub-vertex quadratic goes through: one ring
# of a geodesic sphere, 7 points for 6 unknowns. Measured against DIPY's
# peak_directions_nl on 45-degree crossings of order-10 fODFs, a wider ring
# (8, 12, 18 neighbours) pulls the stationary point towards the other lobe:
# 0.05-0.16 degrees further from the exact maximum than 6.
_QUADRATIC_NEIGHBOURS = 6

# Voxels whose fODFs are evaluated together: (chunk, V) float64 stays ~12 MB
# on the default 1445-vertex sphere.
_CHUNK_VOXELS = 1024


@cache
def default_peak_sphere():
    """Hemisphere used for peak search unless one is given.

    DIPY's ``default_sphere`` (362 vertices, about 7.5 degrees apart) subdivided
    once: 1445 vertices about 3.8 degrees apart, so a vertex lies 1.4 degrees
    from a sharp peak on average; :func:`subvertex_directions` then brings
    that to about 0.02.

    Returns
    -------
    sphere : dipy.core.sphere.HemiSphere
    """
    return default_sphere.subdivide(n=1)


def sh_order_from_coeffs(n_coeffs):
    """Even maximal SH order ``L`` with ``(L + 1)(L + 2) / 2 == n_coeffs``.

    Parameters
    ----------
    n_coeffs : int
        Number of symmetric (even-order) SH coefficients.

    Returns
    -------
    sh_order_max : int
    """
    sh_order_max = int(round((np.sqrt(8 * n_coeffs + 1) - 3) / 2))
    if (sh_order_max < 0 or sh_order_max % 2
            or (sh_order_max + 1) * (sh_order_max + 2) // 2 != n_coeffs):
        raise ValueError(
            "shm_coeff must have (L + 1)(L + 2) / 2 coefficients in its last axis "
            f"for an even order L (1, 6, 15, 28, 45, ...), got {n_coeffs}")
    return sh_order_max


def _check_shm_coeff(shm_coeff, basis_type):
    shm_coeff = np.asarray(shm_coeff)
    if shm_coeff.ndim < 1 or not np.issubdtype(shm_coeff.dtype, np.number):
        raise ValueError(
            "shm_coeff must be a numeric array (..., C) of SH coefficients, got "
            f"shape {shm_coeff.shape} and dtype {shm_coeff.dtype}")
    if basis_type not in SH_BASES:
        raise ValueError(f"basis_type must be one of {SH_BASES}, got {basis_type!r}")
    return shm_coeff, sh_order_from_coeffs(shm_coeff.shape[-1])


def _check_sphere(sphere):
    if sphere is None:
        return default_peak_sphere()
    if not isinstance(sphere, Sphere):
        raise TypeError(f"sphere must be a dipy Sphere or HemiSphere, got {type(sphere)}")
    return sphere


def _check_search(shm_coeff, mask, min_separation_angle, npeaks):
    if mask is None:
        mask = np.ones(shm_coeff.shape[:-1], dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != shm_coeff.shape[:-1]:
            raise ValueError(
                f"mask must have the spatial shape of shm_coeff {shm_coeff.shape[:-1]}, "
                f"got {mask.shape}")
        mask = mask.astype(bool)
    if not 0 <= min_separation_angle <= 90:
        raise ValueError(
            f"min_separation_angle must be in [0, 90] degrees, got {min_separation_angle}")
    if isinstance(npeaks, bool) or not isinstance(npeaks, (int, np.integer)) or npeaks < 1:
        raise ValueError(f"npeaks must be a positive int, got {npeaks!r}")
    return mask


def _check_threshold(relative_peak_threshold):
    if not 0 <= relative_peak_threshold <= 1:
        raise ValueError(
            f"relative_peak_threshold must be in [0, 1], got {relative_peak_threshold}")


@lru_cache(maxsize=8)
def _vertex_quadratics(sphere):
    """Each vertex's neighbourhood and the least-squares quadratic through it.

    The fODF is antipodally symmetric, so a vertex's neighbours are taken
    from the sphere's vertices and their antipodes (a hemisphere's edge has
    neighbours across it). Points enter by their gnomonic coordinates on the
    vertex's tangent plane, ``p / (p . v) - v`` in the basis ``(e1, e2)``.

    Returns
    -------
    neighbours : ndarray (V, K + 1) of int
        Vertex indices (the vertex first; an antipode by its vertex's index).
    solve : ndarray (V, 6, K + 1)
        Maps the fODF at ``neighbours`` to the quadratic's coefficients in
        ``(1, x, y, x^2, xy, y^2)``.
    tangents : ndarray (V, 2, 3)
        ``e1``, ``e2``.
    reach : ndarray (V,)
        Largest step accepted, in gnomonic units: the tangent of the angle to
        the nearest neighbour (a maximum further away belongs to another vertex).
    """
    vertices = np.asarray(sphere.vertices, dtype=float)
    n = len(vertices)
    # Antipodes that are not vertices already (a whole Sphere has them all).
    antipodes = -vertices
    cosines = np.empty(n)
    for start in range(0, n, _CHUNK_VOXELS):
        cosines[start:start + _CHUNK_VOXELS] = (antipodes[start:start + _CHUNK_VOXELS]
                                                @ vertices.T).max(axis=1)
    extra = np.flatnonzero(cosines < 1 - 1e-9)
    points = np.concatenate([vertices, antipodes[extra]])
    index = np.concatenate([np.arange(n), extra])
    neighbours = np.empty((n, _QUADRATIC_NEIGHBOURS + 1), dtype=np.intp)
    for start in range(0, n, _CHUNK_VOXELS):
        near = vertices[start:start + _CHUNK_VOXELS] @ points.T
        neighbours[start:start + _CHUNK_VOXELS] = np.argsort(
            -near, axis=1, kind="stable")[:, :_QUADRATIC_NEIGHBOURS + 1]
    # Any unit vector not along the vertex gives its tangent basis.
    helper = np.where(np.abs(vertices[:, 2:]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(vertices, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(vertices, e1)
    near = points[neighbours]
    along = np.einsum("vkd,vd->vk", near, vertices)
    x = np.einsum("vkd,vd->vk", near, e1) / along
    y = np.einsum("vkd,vd->vk", near, e2) / along
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)
    reach = np.hypot(x[:, 1], y[:, 1])
    return index[neighbours], np.linalg.pinv(design), np.stack([e1, e2], axis=1), reach


def subvertex_directions(odf, sphere, vertex_indices):
    """Peak directions refined below the sphere's vertex spacing.

    A peak found at a vertex is moved to the stationary point of the
    quadratic fitted (least squares, on the vertex's tangent plane) to the
    fODF at the vertex and its 6 nearest neighbours or their antipodes,
    where that quadratic has a maximum within the distance to the nearest
    neighbour; otherwise it stays at the vertex. On the 1445-vertex default
    peak sphere a sharp single-fibre fODF's peak moves from 1.4 degrees
    (mean; 2.5 at most) off its axis to 0.02 (0.15 at most; ``tests/test_peaks.py``).
    MRtrix3's ``sh2peaks`` refines its peaks likewise (by Newton steps on
    the SH function); DIPY's ``peak_directions`` returns vertices.

    Parameters
    ----------
    odf : ndarray (P, V)
        The fODF of each peak's voxel on ``sphere``'s vertices.
    sphere : dipy Sphere or HemiSphere
        With ``V`` vertices.
    vertex_indices : ndarray (P,) of int
        The vertex each peak was found at.

    Returns
    -------
    directions : ndarray (P, 3)
        Unit vectors.
    """
    sphere = _check_sphere(sphere)
    odf = np.asarray(odf, dtype=float)
    vertex_indices = np.asarray(vertex_indices, dtype=np.intp)
    n_vertices = len(sphere.vertices)
    if odf.ndim != 2 or odf.shape[1] != n_vertices:
        raise ValueError(
            f"odf must have shape (P, {n_vertices}) (one row per peak, one value per "
            f"vertex of sphere), got {odf.shape}")
    if vertex_indices.shape != (len(odf),):
        raise ValueError(
            f"vertex_indices must have shape ({len(odf)},), got {vertex_indices.shape}")
    if vertex_indices.size and not (0 <= vertex_indices.min()
                                    and vertex_indices.max() < n_vertices):
        raise ValueError(f"vertex_indices must be vertex indices of sphere, in "
                         f"0..{n_vertices - 1}, got {vertex_indices.min()}..{vertex_indices.max()}")
    neighbours, solve, tangents, reach = _vertex_quadratics(sphere)
    samples = odf[np.arange(len(odf))[:, None], neighbours[vertex_indices]]
    solve = solve[vertex_indices]
    # Element-wise sums and a closed-form 2 x 2 solve: each peak's result does
    # not depend on which other peaks share the call (a fit's part or voxel
    # gives its peaks to the last bit).
    quadratic = solve[:, :, 0] * samples[:, None, 0]
    for point in range(1, samples.shape[1]):
        quadratic += solve[:, :, point] * samples[:, None, point]
    _, gx, gy, xx, xy, yy = quadratic.T
    # The Hessian [[2 xx, xy], [xy, 2 yy]]: a maximum where it is negative definite.
    determinant = 4 * xx * yy - xy * xy
    peaked = (xx < 0) & (determinant > 0)
    safe = np.where(peaked, determinant, 1.0)
    step = np.where(peaked[:, None],
                    -np.stack([2 * yy * gx - xy * gy, 2 * xx * gy - xy * gx], axis=1)
                    / safe[:, None], 0.0)
    step[np.hypot(step[:, 0], step[:, 1]) > reach[vertex_indices]] = 0.0
    tangents = tangents[vertex_indices]
    directions = (np.asarray(sphere.vertices, dtype=float)[vertex_indices]
                  + step[:, :1] * tangents[:, 0] + step[:, 1:] * tangents[:, 1])
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


def _search_peaks(shm_coeff, sphere, relative_peak_threshold, min_separation_angle,
                  npeaks, mask, basis_type, subvertex):
    """Peaks of every voxel plus the floor DIPY's relative threshold starts from.

    DIPY's search on the sphere's vertices chooses the peaks and their values;
    with ``subvertex`` their directions are then refined
    (:func:`subvertex_directions`).

    Returns
    -------
    directions : ndarray (..., npeaks, 3)
        NaN where there is no peak.
    values : ndarray (..., npeaks)
        fODF value at each peak, 0 where there is no peak.
    floor : ndarray (...)
        ``max(0, min fODF)`` of each voxel (0 where skipped).
    """
    shm_coeff, sh_order_max = _check_shm_coeff(shm_coeff, basis_type)
    sphere = _check_sphere(sphere)
    mask = _check_search(shm_coeff, mask, min_separation_angle, npeaks)
    spatial_shape = shm_coeff.shape[:-1]
    coeffs = shm_coeff.reshape(-1, shm_coeff.shape[-1])
    n_voxels = coeffs.shape[0]
    directions = np.full((n_voxels, npeaks, 3), np.nan)
    values = np.zeros((n_voxels, npeaks))
    floor = np.zeros(n_voxels)

    # An all-zero fODF (background, or a voxel a model left empty) has no
    # peaks; neither has a failed fit (NaN coefficients).
    voxels = np.flatnonzero(mask.ravel() & np.any(coeffs != 0, axis=-1)
                            & np.all(np.isfinite(coeffs), axis=-1))
    sh_to_sf = sh_to_sf_matrix(sphere, sh_order_max=sh_order_max, basis_type=basis_type,
                               legacy=False, return_inv=False)
    for start in range(0, voxels.size, _CHUNK_VOXELS):
        chunk = voxels[start:start + _CHUNK_VOXELS]
        odf = np.ascontiguousarray(coeffs[chunk].astype(np.float64) @ sh_to_sf)
        floor[chunk] = np.maximum(odf.min(axis=-1), 0.0)
        found_rows, found_slots, found_vertices = [], [], []
        # Without a positive lobe there is no fibre; DIPY would still return a
        # lone local maximum of a negative function.
        for row in np.flatnonzero(odf.max(axis=-1) > 0):
            peak_dirs, peak_values, peak_vertices = peak_directions(
                odf[row], sphere, relative_peak_threshold=relative_peak_threshold,
                min_separation_angle=min_separation_angle)
            n = min(npeaks, peak_values.size)
            directions[chunk[row], :n] = peak_dirs[:n]
            values[chunk[row], :n] = peak_values[:n]
            found_rows.append(np.full(n, row))
            found_slots.append(np.arange(n))
            found_vertices.append(peak_vertices[:n])
        if subvertex and found_rows:
            found_rows = np.concatenate(found_rows)
            found_slots = np.concatenate(found_slots)
            directions[chunk[found_rows], found_slots] = subvertex_directions(
                odf[found_rows], sphere, np.concatenate(found_vertices))
    return (directions.reshape(spatial_shape + (npeaks, 3)),
            values.reshape(spatial_shape + (npeaks,)),
            floor.reshape(spatial_shape))


def peaks_from_sh(shm_coeff, sphere=None, relative_peak_threshold=0.5,
                  min_separation_angle=25, npeaks=5, mask=None,
                  basis_type="descoteaux07", subvertex=True):
    """Peaks of SH fODFs, found by DIPY's ``peak_directions`` on a dense sphere.

    Parameters
    ----------
    shm_coeff : ndarray (..., C)
        Even-order SH coefficients of the fODF (non-legacy ``basis_type``),
        ``C = (L + 1)(L + 2) / 2``.
    sphere : dipy Sphere or HemiSphere, optional
        Directions the fODF is evaluated on; :func:`default_peak_sphere` if None.
    relative_peak_threshold : float in [0, 1]
        Keep peaks above ``floor + threshold * (max - floor)`` with
        ``floor = max(0, min fODF)`` (DIPY's rule).
    min_separation_angle : float in [0, 90]
        Of two peaks closer than this (degrees, antipodal) only the larger is kept.
    npeaks : int
        Largest number of peaks returned per voxel (the largest ones).
    mask : ndarray (...) of bool, optional
        Voxels outside the mask get no peaks; so do voxels whose coefficients
        are all zero or not finite, and fODFs without a positive value.
    basis_type : {"descoteaux07", "tournier07"}
        SH basis of ``shm_coeff`` (DIPY's non-legacy definition).
    subvertex : bool
        Refine each peak's direction below the sphere's vertex spacing
        (:func:`subvertex_directions`); False gives DIPY's vertices. The
        peaks kept and their values are the same either way.

    Returns
    -------
    directions : ndarray (..., npeaks, 3)
        Unit peak directions sorted by decreasing fODF value, NaN-padded.
    values : ndarray (..., npeaks)
        fODF value at each peak's vertex, 0-padded.
    """
    _check_threshold(relative_peak_threshold)
    directions, values, _ = _search_peaks(
        shm_coeff, sphere, relative_peak_threshold, min_separation_angle, npeaks,
        mask, basis_type, subvertex)
    return directions, values


def peaks_threshold_sweep(shm_coeff, thresholds, sphere=None, min_separation_angle=25,
                          npeaks=5, mask=None, basis_type="descoteaux07", subvertex=True):
    """Peaks at several relative thresholds from one peak search.

    Equal to calling :func:`peaks_from_sh` once per threshold: DIPY sorts the
    local maxima by value, keeps those above the threshold (a prefix of the
    sorted list) and then drops, greedily in that order, any peak too close to
    a larger kept one. A decision of the greedy pass depends only on larger
    peaks, so the peaks at a higher threshold are exactly the peaks found at
    the lowest threshold whose value passes the higher one.

    Parameters
    ----------
    shm_coeff : ndarray (..., C)
        As in :func:`peaks_from_sh`.
    thresholds : sequence of float in [0, 1]
        Relative peak thresholds.
    sphere, min_separation_angle, npeaks, mask, basis_type, subvertex
        As in :func:`peaks_from_sh`.

    Yields
    ------
    threshold : float
    directions : ndarray (..., npeaks, 3)
        NaN-padded, as returned by :func:`peaks_from_sh` at ``threshold``.
    values : ndarray (..., npeaks)
        0-padded.
    """
    thresholds = np.asarray(thresholds, dtype=float).ravel()
    if thresholds.size == 0:
        raise ValueError("thresholds must hold at least one relative peak threshold")
    for threshold in thresholds:
        _check_threshold(threshold)
    directions, values, floor = _search_peaks(
        shm_coeff, sphere, thresholds.min(), min_separation_angle, npeaks, mask,
        basis_type, subvertex)
    above_floor = values - floor[..., None]
    has_peak = ~np.isnan(directions[..., 0])
    for threshold in thresholds:
        # Same comparison as DIPY's search_descending, on the same doubles.
        keep = has_peak & (above_floor >= threshold * above_floor[..., :1])
        yield (float(threshold), np.where(keep[..., None], directions, np.nan),
               np.where(keep, values, 0.0))


def peaks_to_dipy(directions, values, shm_coeff, sphere=None, affine=None,
                  basis_type="descoteaux07", legacy=False):
    """Wrap peaks in DIPY's ``PeaksAndMetrics`` (``.pam5`` files, EuDX tracking).

    Parameters
    ----------
    directions : ndarray (..., npeaks, 3)
        Peak directions, NaN-padded (from :func:`peaks_from_sh`).
    values : ndarray (..., npeaks)
        Peak values, 0-padded.
    shm_coeff : ndarray (..., C)
        SH coefficients the peaks came from, in ``basis_type`` (stored as is).
    sphere : dipy Sphere or HemiSphere, optional
        Sphere the peaks were searched on; :func:`default_peak_sphere` if None.
    affine : ndarray (4, 4), optional
        Voxel-to-world transform stored with the peaks.
    basis_type : {"descoteaux07", "tournier07"}
    legacy : bool, optional
        ``shm_coeff`` is in DIPY's legacy variant of ``basis_type`` (DIPY's
        default, what DIPY's trackers read from a ``.pam5``); ``B`` follows.

    Returns
    -------
    pam : dipy.direction.peaks.PeaksAndMetrics
        With ``peak_dirs`` (..., npeaks, 3) zero-padded, ``peak_values``,
        ``peak_indices`` (..., npeaks) (nearest sphere vertex to each peak's
        axis, -1 where none), ``qa`` (peak value above the voxel's fODF minimum,
        over the largest peak of the volume, as in DIPY's ``peaks_from_model``),
        ``gfa`` (...), ``shm_coeff``, ``B`` (C, V), ``sphere``, ``affine``.
    """
    shm_coeff, sh_order_max = _check_shm_coeff(shm_coeff, basis_type)
    sphere = _check_sphere(sphere)
    directions = np.asarray(directions, dtype=float)
    values = np.asarray(values, dtype=float)
    spatial_shape = shm_coeff.shape[:-1]
    if directions.ndim < 2 or directions.shape[:-2] != spatial_shape or directions.shape[-1] != 3:
        raise ValueError(
            f"directions must have shape {spatial_shape} + (npeaks, 3), got {directions.shape}")
    if values.shape != directions.shape[:-1]:
        raise ValueError(
            f"values must have shape {directions.shape[:-1]}, got {values.shape}")
    if affine is not None and np.shape(affine) != (4, 4):
        raise ValueError(f"affine must be a (4, 4) array, got shape {np.shape(affine)}")

    has_peak = np.isfinite(directions).all(axis=-1)
    peak_dirs = np.where(has_peak[..., None], directions, 0.0)
    peak_indices = np.where(
        has_peak, np.abs(peak_dirs @ sphere.vertices.T).argmax(axis=-1), -1).astype(np.int32)

    with warnings.catch_warnings():
        # DIPY's default (legacy) basis is the one asked for: no deprecation notice.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        sh_to_sf = sh_to_sf_matrix(sphere, sh_order_max=sh_order_max, basis_type=basis_type,
                                   legacy=legacy, return_inv=False)
    coeffs = shm_coeff.reshape(-1, shm_coeff.shape[-1]).astype(np.float64)
    gfa_map = np.zeros(coeffs.shape[0])
    odf_min = np.zeros(coeffs.shape[0])
    for start in range(0, coeffs.shape[0], _CHUNK_VOXELS):
        odf = coeffs[start:start + _CHUNK_VOXELS] @ sh_to_sf
        gfa_map[start:start + _CHUNK_VOXELS] = np.nan_to_num(gfa(odf))
        odf_min[start:start + _CHUNK_VOXELS] = odf.min(axis=-1)
    odf_min = odf_min.reshape(spatial_shape)
    qa = np.where(has_peak, values - odf_min[..., None], 0.0)
    largest = values[has_peak].max() if has_peak.any() else 0.0
    if largest > 0:
        qa /= largest

    pam = PeaksAndMetrics()
    pam.sphere = sphere
    pam.peak_dirs = peak_dirs
    pam.peak_values = np.where(has_peak, values, 0.0)
    pam.peak_indices = peak_indices
    pam.qa = qa
    pam.gfa = gfa_map.reshape(spatial_shape)
    pam.shm_coeff = shm_coeff
    pam.B = sh_to_sf
    pam.odf = None
    if affine is not None:
        pam.affine = np.asarray(affine, dtype=float)
    return pam
