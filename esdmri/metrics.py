"""Accuracy metrics: fODF peaks against ground truth, tissue fractions, segmentation.

Peak metrics follow SPEC section 7. Directions are arrays ``(..., K, 3)`` over a
volume of voxels; a row that is NaN (or all zero, DIPY's padding) is an absent
peak, so ground truth with 1 to 3 fibres per voxel and predictions with any
number of peaks share one array layout. Directions are axes: ``v`` and ``-v``
are the same fibre.

- angular error of a voxel: mean over its ground-truth fibres of the angle to
  the nearest predicted peak (90 degrees, the largest possible, for a fibre
  when the voxel has no predicted peak);
- matching: one-to-one pairs of a ground-truth fibre and a predicted peak at
  most ``threshold_deg`` apart, the largest number of pairs (then the smallest
  total angle) over all assignments; unmatched predictions are false
  positives, unmatched fibres false negatives;
- success: as many peaks as fibres and every fibre matched.

:func:`score_tractogram` scores streamlines against ground-truth bundles
(Tractometer: valid, invalid and no connections, bundle overlap and
overreach, and the share of steps along a true fibre).
"""

from itertools import product

import numpy as np

from esdmri.peaks import peaks_threshold_sweep

# Relative peak thresholds of the sweep: 0.05, 0.10, ..., 0.95 (rounded so that
# 0.5, DIPY's default, is exactly one of them).
DEFAULT_THRESHOLDS = np.round(np.arange(1, 20) * 0.05, 2)

# Edges (degrees) of the crossing-angle bins in summaries; the last bin is closed.
CROSSING_ANGLE_EDGES = (0.0, 30.0, 45.0, 60.0, 75.0, 90.0)

# Largest number of (voxel, assignment, fibre) angles held at once while matching.
_MATCH_BLOCK = 2**21


def _directions(directions, name):
    """Unit axes (..., K, 3) with NaN rows where absent, and the presence mask."""
    directions = np.asarray(directions, dtype=float)
    if directions.ndim < 2 or directions.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., K, 3), got {directions.shape}")
    norm = np.linalg.norm(directions, axis=-1)
    present = np.isfinite(norm) & (norm > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(present[..., None], directions / norm[..., None], np.nan)
    return unit, present


def _check_pair(pred_dirs, true_dirs):
    pred, pred_present = _directions(pred_dirs, "pred_dirs")
    true, true_present = _directions(true_dirs, "true_dirs")
    if pred.shape[:-2] != true.shape[:-2]:
        raise ValueError(
            "pred_dirs and true_dirs must cover the same voxels, got spatial shapes "
            f"{pred.shape[:-2]} and {true.shape[:-2]}")
    return pred, pred_present, true, true_present


def _check_mask(mask, shape, name="mask"):
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {mask.shape}")
    return mask.astype(bool)


def _axis_angles(a, b):
    """Angles in degrees (..., I, J) between the axes a (..., I, 3) and b (..., J, 3)."""
    cosine = np.abs(np.einsum("...ik,...jk->...ij", a, b))
    return np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0)))


def count_directions(directions):
    """Number of present directions per voxel.

    Parameters
    ----------
    directions : ndarray (..., K, 3)
        NaN- or zero-padded directions.

    Returns
    -------
    counts : ndarray (...) of int
    """
    return _directions(directions, "directions")[1].sum(axis=-1)


def crossing_angles(true_dirs):
    """Smallest angle between two fibres of each voxel.

    Parameters
    ----------
    true_dirs : ndarray (..., K, 3)
        NaN-padded fibre directions.

    Returns
    -------
    angles : ndarray (...)
        Degrees in [0, 90]; NaN in voxels with fewer than two fibres.
    """
    true, _ = _directions(true_dirs, "true_dirs")
    angles = _axis_angles(true, true)
    k = true.shape[-2]
    angles[..., np.arange(k), np.arange(k)] = np.nan
    with np.errstate(invalid="ignore"):
        smallest = np.fmin.reduce(angles.reshape(angles.shape[:-2] + (-1,)), axis=-1)
    return smallest


def angular_errors(pred_dirs, true_dirs):
    """Mean angle from each ground-truth fibre to its nearest predicted peak.

    Parameters
    ----------
    pred_dirs : ndarray (..., P, 3)
        Predicted peaks, NaN- or zero-padded (any length, any sign).
    true_dirs : ndarray (..., T, 3)
        Ground-truth fibre directions, NaN-padded.

    Returns
    -------
    errors : ndarray (...)
        Degrees in [0, 90], antipodally symmetric. NaN where the voxel has no
        ground-truth fibre; a voxel with fibres but no predicted peak scores 90.
    """
    pred, pred_present, true, true_present = _check_pair(pred_dirs, true_dirs)
    angles = _axis_angles(true, pred)
    angles = np.where(pred_present[..., None, :], angles, np.inf)
    nearest = np.minimum(angles.min(axis=-1, initial=np.inf), 90.0)
    n_true = true_present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_true > 0,
                        np.where(true_present, nearest, 0.0).sum(axis=-1) / n_true,
                        np.nan)


def _assignments(n_true, n_pred):
    """All partial one-to-one maps fibre -> peak, (A, T) with n_pred meaning none."""
    options = [c for c in product(range(n_pred + 1), repeat=n_true)
               if len({p for p in c if p < n_pred}) == sum(p < n_pred for p in c)]
    return np.array(options, dtype=np.intp).reshape(len(options), n_true)


def match_peaks(pred_dirs, true_dirs, threshold_deg=25):
    """One-to-one matching of predicted peaks to ground-truth fibres.

    Every partial assignment of fibres to distinct peaks is scored (exact for
    the few peaks per voxel at stake): the most pairs within ``threshold_deg``
    win, ties go to the smallest total angle.

    Parameters
    ----------
    pred_dirs : ndarray (..., P, 3)
        Predicted peaks, NaN- or zero-padded.
    true_dirs : ndarray (..., T, 3)
        Ground-truth fibres, NaN-padded.
    threshold_deg : float
        Largest angle (degrees, antipodal) of a matched pair.

    Returns
    -------
    match : dict of ndarray (...)
        ``"tp"`` matched fibres, ``"fp"`` unmatched peaks, ``"fn"`` unmatched
        fibres (ints), ``"success"`` (bool: as many peaks as fibres, all matched).
    """
    if not 0 < threshold_deg <= 90:
        raise ValueError(f"threshold_deg must be in (0, 90] degrees, got {threshold_deg}")
    pred, pred_present, true, true_present = _check_pair(pred_dirs, true_dirs)
    spatial_shape = pred.shape[:-2]
    n_fibres, n_peaks = true.shape[-2], pred.shape[-2]
    angles = _axis_angles(true, pred)
    close = true_present[..., :, None] & pred_present[..., None, :] & (angles <= threshold_deg)
    # Column n_peaks stands for "no peak": never a pair.
    cost = np.where(close, angles, np.inf).reshape(-1, n_fibres, n_peaks)
    cost = np.concatenate([cost, np.full(cost.shape[:-1] + (1,), np.inf)], axis=-1)

    assignments = _assignments(n_fibres, n_peaks)
    fibre_index = np.arange(n_fibres)
    tp = np.zeros(cost.shape[0], dtype=np.int64)
    block = max(1, _MATCH_BLOCK // max(1, assignments.size))
    for start in range(0, cost.shape[0], block):
        pair_cost = cost[start:start + block][:, fibre_index, assignments]  # (B, A, T)
        paired = np.isfinite(pair_cost)
        n_pairs = paired.sum(axis=-1)
        total = np.where(paired, pair_cost, 0.0).sum(axis=-1)
        # Pairs dominate: the total angle is below 90 * T < 1000.
        best = np.argmax(n_pairs * 1000.0 - total, axis=-1)
        tp[start:start + block] = n_pairs[np.arange(best.size), best]

    tp = tp.reshape(spatial_shape)
    n_true = true_present.sum(axis=-1)
    n_pred = pred_present.sum(axis=-1)
    return {"tp": tp, "fp": n_pred - tp, "fn": n_true - tp,
            "success": (n_pred == n_true) & (tp == n_true)}


def _summarise(errors, match, n_true, n_pred, selected):
    n_voxels = int(selected.sum())
    tp, fp, fn = (int(match[key][selected].sum()) for key in ("tp", "fp", "fn"))
    total_true, total_pred = int(n_true[selected].sum()), int(n_pred[selected].sum())
    voxel_errors = errors[selected]
    voxel_errors = voxel_errors[np.isfinite(voxel_errors)]
    return {
        "n_voxels": n_voxels,
        "angular_error": float(voxel_errors.mean()) if voxel_errors.size else np.nan,
        "angular_error_median": float(np.median(voxel_errors)) if voxel_errors.size else np.nan,
        "success_rate": float(match["success"][selected].mean()) if n_voxels else np.nan,
        "tp": tp, "fp": fp, "fn": fn, "n_true": total_true, "n_pred": total_pred,
        # Share of predicted peaks that are false, of true fibres that are missed.
        "fp_rate": fp / total_pred if total_pred else np.nan,
        "fn_rate": fn / total_true if total_true else np.nan,
    }


def evaluate_peaks(pred_dirs, true_dirs, mask=None, threshold_deg=25,
                   crossing_angle_edges=CROSSING_ANGLE_EDGES):
    """Peak accuracy over a volume, overall and split by fibre count and crossing angle.

    Parameters
    ----------
    pred_dirs : ndarray (..., P, 3)
        Predicted peaks, NaN- or zero-padded.
    true_dirs : ndarray (..., T, 3)
        Ground-truth fibres, NaN-padded.
    mask : ndarray (...) of bool, optional
        Voxels evaluated (all if None).
    threshold_deg : float
        Matching threshold of :func:`match_peaks`.
    crossing_angle_edges : sequence of float
        Increasing bin edges (degrees) of the crossing-angle split.

    Returns
    -------
    summary : dict
        ``"all"``, ``"crossing"`` (voxels with 2+ fibres), ``"by_n_fibres"``
        (dict fibre count -> summary) and ``"by_crossing_angle"`` (dict
        ``(low, high)`` -> summary, bins ``[low, high)``, the last closed).
        Each summary holds ``n_voxels``, ``angular_error`` (mean, degrees),
        ``angular_error_median``, ``success_rate``, total ``tp``, ``fp``,
        ``fn``, ``n_true``, ``n_pred``, ``fp_rate = fp / n_pred`` and
        ``fn_rate = fn / n_true`` (NaN where undefined).
    """
    edges = np.asarray(crossing_angle_edges, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(
            f"crossing_angle_edges must be increasing bin edges, got {crossing_angle_edges}")
    errors = angular_errors(pred_dirs, true_dirs)
    mask = _check_mask(mask, errors.shape)
    match = match_peaks(pred_dirs, true_dirs, threshold_deg)
    n_true, n_pred = count_directions(true_dirs), count_directions(pred_dirs)
    crossing = crossing_angles(true_dirs)

    def summary(selected):
        return _summarise(errors, match, n_true, n_pred, mask & selected)

    by_angle = {}
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == edges.size - 2
        with np.errstate(invalid="ignore"):
            in_bin = (crossing >= low) & ((crossing <= high) if last else (crossing < high))
        by_angle[(float(low), float(high))] = summary(in_bin)
    return {
        "all": summary(np.ones_like(mask)),
        "crossing": summary(n_true >= 2),
        "by_n_fibres": {int(n): summary(n_true == n) for n in np.unique(n_true[mask])},
        "by_crossing_angle": by_angle,
    }


def threshold_sweep(shm_coeff, true_dirs, mask=None, thresholds=DEFAULT_THRESHOLDS,
                    sphere=None, min_separation_angle=25, npeaks=5, threshold_deg=25,
                    basis_type="descoteaux07", crossing_angle_edges=CROSSING_ANGLE_EDGES):
    """Peak accuracy of SH fODFs over a sweep of relative peak thresholds.

    Peaks come from :func:`esdmri.peaks.peaks_threshold_sweep`, identical to
    :func:`esdmri.peaks.peaks_from_sh` at each threshold.

    Parameters
    ----------
    shm_coeff : ndarray (..., C)
        fODF SH coefficients (non-legacy ``basis_type``).
    true_dirs : ndarray (..., T, 3)
        Ground-truth fibres, NaN-padded.
    mask : ndarray (...) of bool, optional
        Voxels evaluated (and searched for peaks).
    thresholds : sequence of float in [0, 1]
        Relative peak thresholds (default 0.05, 0.10, ..., 0.95).
    sphere, min_separation_angle, npeaks, basis_type
        As in :func:`esdmri.peaks.peaks_from_sh`.
    threshold_deg : float
        Matching threshold of :func:`match_peaks`.
    crossing_angle_edges : sequence of float
        Bin edges of the crossing-angle split of :func:`evaluate_peaks`.

    Returns
    -------
    sweep : dict
        ``"thresholds"`` (n,), ``"results"`` (list of :func:`evaluate_peaks`
        dicts, one per threshold), ``"best_threshold"`` and ``"best_index"``:
        the threshold with the highest overall success rate (ties: lowest
        angular error).
    """
    shm_coeff = np.asarray(shm_coeff)
    mask = _check_mask(mask, shm_coeff.shape[:-1])
    thresholds = np.asarray(thresholds, dtype=float).ravel()
    results = [
        evaluate_peaks(directions, true_dirs, mask, threshold_deg, crossing_angle_edges)
        for _, directions, _ in peaks_threshold_sweep(
            shm_coeff, thresholds, sphere=sphere, min_separation_angle=min_separation_angle,
            npeaks=npeaks, mask=mask, basis_type=basis_type)
    ]
    success = np.array([r["all"]["success_rate"] for r in results])
    error = np.array([r["all"]["angular_error"] for r in results])
    best = int(np.lexsort((np.nan_to_num(error, nan=np.inf),
                           -np.nan_to_num(success, nan=-np.inf)))[0])
    return {"thresholds": thresholds, "results": results,
            "best_threshold": float(thresholds[best]), "best_index": best}


def _fractions(fractions, name):
    fractions = np.asarray(fractions, dtype=float)
    if fractions.ndim < 1 or fractions.shape[-1] < 2:
        raise ValueError(f"{name} must have shape (..., n_tissues >= 2), got {fractions.shape}")
    return fractions


def _check_fraction_pair(pred_fractions, true_fractions):
    pred = _fractions(pred_fractions, "pred_fractions")
    true = _fractions(true_fractions, "true_fractions")
    if pred.shape != true.shape:
        raise ValueError(
            "pred_fractions and true_fractions must have the same shape, got "
            f"{pred.shape} and {true.shape}")
    return pred, true


def fraction_absolute_errors(pred_fractions, true_fractions):
    """Absolute error of each tissue fraction.

    Parameters
    ----------
    pred_fractions, true_fractions : ndarray (..., n_tissues)
        Volume fractions (e.g. WM, GM, CSF).

    Returns
    -------
    errors : ndarray (..., n_tissues)
    """
    pred, true = _check_fraction_pair(pred_fractions, true_fractions)
    return np.abs(pred - true)


def fraction_kl_divergence(pred_fractions, true_fractions, eps=1e-6):
    """Kullback-Leibler divergence KL(true || predicted) of tissue fractions.

    Both are clipped to ``[eps, inf)`` and renormalised to sum to one, so a
    tissue the estimate misses costs a large but finite divergence.

    Parameters
    ----------
    pred_fractions, true_fractions : ndarray (..., n_tissues)
    eps : float
        Smallest fraction kept.

    Returns
    -------
    kl : ndarray (...)
        Nats, >= 0.
    """
    pred, true = _check_fraction_pair(pred_fractions, true_fractions)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    pred = np.clip(pred, eps, None)
    true = np.clip(true, eps, None)
    pred /= pred.sum(axis=-1, keepdims=True)
    true /= true.sum(axis=-1, keepdims=True)
    return np.sum(true * np.log(true / pred), axis=-1)


def evaluate_fractions(pred_fractions, true_fractions, mask=None,
                       tissues=("wm", "gm", "csf")):
    """Partial-volume agreement between estimated and true tissue fractions.

    Parameters
    ----------
    pred_fractions, true_fractions : ndarray (..., n_tissues)
    mask : ndarray (...) of bool, optional
        Voxels evaluated.
    tissues : sequence of str
        Name of each tissue, in the order of the last axis.

    Returns
    -------
    summary : dict
        ``"mae"`` (mean over voxels and tissues), ``"mae_<tissue>"`` per tissue,
        ``"kl"`` (mean KL(true || predicted) over voxels), ``"n_voxels"``.
    """
    errors = fraction_absolute_errors(pred_fractions, true_fractions)
    if len(tissues) != errors.shape[-1]:
        raise ValueError(
            f"tissues must name the {errors.shape[-1]} fractions, got {tuple(tissues)}")
    mask = _check_mask(mask, errors.shape[:-1])
    kl = fraction_kl_divergence(pred_fractions, true_fractions)
    summary = {"n_voxels": int(mask.sum()), "mae": float(errors[mask].mean())}
    summary.update({f"mae_{name}": float(errors[mask][:, i].mean())
                    for i, name in enumerate(tissues)})
    summary["kl"] = float(kl[mask].mean())
    return summary


def _scores_and_labels(scores, labels, mask):
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must have the same shape, got {scores.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be binary (bool or 0/1)")
    mask = _check_mask(mask, scores.shape)
    labels = labels[mask].astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("labels must contain both classes inside the mask")
    return scores[mask], labels


def roc_auc(scores, labels, mask=None):
    """Area under the ROC curve of voxel scores against binary labels.

    Parameters
    ----------
    scores : ndarray (...)
        Predicted lesion probability (or any monotone score).
    labels : ndarray (...) of bool or 0/1
        Ground truth.
    mask : ndarray (...) of bool, optional
        Voxels evaluated.

    Returns
    -------
    auc : float
    """
    from sklearn.metrics import roc_auc_score

    scores, labels = _scores_and_labels(scores, labels, mask)
    return float(roc_auc_score(labels, scores))


def average_precision(scores, labels, mask=None):
    """Average precision (area under the precision-recall curve) of voxel scores.

    Parameters
    ----------
    scores : ndarray (...)
    labels : ndarray (...) of bool or 0/1
    mask : ndarray (...) of bool, optional

    Returns
    -------
    ap : float
    """
    from sklearn.metrics import average_precision_score

    scores, labels = _scores_and_labels(scores, labels, mask)
    return float(average_precision_score(labels, scores))


def dice(prediction, truth, mask=None):
    """Dice overlap ``2 |A & B| / (|A| + |B|)`` of two binary segmentations.

    Parameters
    ----------
    prediction, truth : ndarray (...) of bool or 0/1
    mask : ndarray (...) of bool, optional
        Voxels evaluated.

    Returns
    -------
    dice : float
        In [0, 1]; 1 when both are empty.
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(
            "prediction and truth must have the same shape, got "
            f"{prediction.shape} and {truth.shape}")
    for name, array in (("prediction", prediction), ("truth", truth)):
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1)")
    mask = _check_mask(mask, prediction.shape)
    prediction, truth = prediction[mask].astype(bool), truth[mask].astype(bool)
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.sum(prediction & truth) / total)


# Largest distance (voxels) between the points at which a streamline's
# traversed voxels are sampled.
_TRAVERSAL_STEP = 0.25


def _check_regions(end_regions, bundle_masks):
    """End regions as a (B, 2, X, Y, Z) bool array and bundle masks (B, X, Y, Z) or None."""
    try:
        pairs = [tuple(pair) for pair in end_regions]
    except TypeError:
        raise TypeError("end_regions must be a sequence of (start, end) boolean volumes, "
                        f"got {type(end_regions).__name__}") from None
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError("end_regions must hold one (start, end) pair of volumes per bundle")
    regions = np.stack([np.stack([np.asarray(r) for r in pair]) for pair in pairs])
    if regions.ndim != 5 or not np.isin(regions, (0, 1)).all():
        raise ValueError("end_regions must be binary 3D volumes of one shape, got an array "
                         f"of shape {regions.shape}")
    if len(pairs) > 31:
        raise ValueError(f"end_regions can hold at most 31 bundles, got {len(pairs)}")
    regions = regions.astype(bool)
    if bundle_masks is None:
        return regions, None
    masks = np.stack([np.asarray(mask) for mask in bundle_masks])
    if masks.shape != (regions.shape[0],) + regions.shape[2:] or not np.isin(masks, (0, 1)).all():
        raise ValueError(f"bundle_masks must be {regions.shape[0]} binary volumes of shape "
                         f"{regions.shape[2:]}, one per bundle of end_regions; got shape "
                         f"{masks.shape}")
    return regions, masks.astype(bool)


def _to_voxels(streamlines, affine):
    """Streamlines (world) as voxel coordinates, concatenated, with their lengths."""
    lines = [np.asarray(line, dtype=float) for line in streamlines]
    for line in lines:
        if line.ndim != 2 or line.shape[1] != 3:
            raise ValueError(f"streamlines must be arrays of shape (n, 3), got {line.shape}")
    lengths = np.array([len(line) for line in lines], dtype=np.intp)
    points = np.concatenate(lines) if lines else np.zeros((0, 3))
    if affine is not None:
        affine = np.asarray(affine, dtype=float)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be a (4, 4) array, got shape {affine.shape}")
        inverse = np.linalg.inv(affine)
        points = points @ inverse[:3, :3].T + inverse[:3, 3]
    return points, lengths


def _voxel_lookup(volume, points):
    """Values of ``volume`` at the voxels of ``points`` (n, 3); 0 outside the grid."""
    index = np.round(points).astype(np.intp)
    inside = np.all((index >= 0) & (index < np.array(volume.shape[:3])), axis=1)
    values = np.zeros((len(points),) + volume.shape[3:], dtype=volume.dtype)
    values[inside] = volume[tuple(index[inside].T)]
    return values


def _traversed_voxels(points, lengths, shape):
    """Flat indices of the grid voxels each streamline passes through (list of arrays)."""
    voxels = []
    for line in np.split(points, np.cumsum(lengths)[:-1]):
        if len(line) > 1:
            gaps = np.linalg.norm(np.diff(line, axis=0), axis=1)
            pieces = np.maximum(1, np.ceil(gaps / _TRAVERSAL_STEP)).astype(int)
            t = np.concatenate([np.arange(n) / n for n in pieces] + [[1.0]])
            segment = np.concatenate([np.full(n, i) for i, n in enumerate(pieces)]
                                     + [[len(gaps) - 1]])
            line = line[segment] + t[:, None] * (line[segment + 1] - line[segment])
        index = np.round(line).astype(np.intp)
        inside = np.all((index >= 0) & (index < np.array(shape)), axis=1)
        voxels.append(np.unique(np.ravel_multi_index(tuple(index[inside].T), shape)))
    return voxels


def _lowest_bit(codes, n_bits):
    """Index of the lowest set bit of each code, -1 where none is set."""
    lowest = np.full(codes.shape, -1, dtype=np.intp)
    for bit in reversed(range(n_bits)):
        lowest[(codes >> bit) & 1 == 1] = bit
    return lowest


def score_tractogram(streamlines, end_regions, bundle_masks=None, fibre_dirs=None,
                     affine=None, angle_deg=25.0):
    """Tractometer-style scores of a tractogram against ground-truth bundles.

    A streamline is a valid connection (VC) when one end point lies in the
    start region and the other in the end region of the same bundle, an
    invalid connection (IC) when both end points lie in end regions but no
    bundle joins them, and no connection (NC) otherwise (Côté et al. 2013).
    A bundle is valid when at least one VC joins its two regions; each
    distinct pair of regions joined by ICs is one invalid bundle. Overlap of
    a bundle: share of its voxels traversed by its VCs; overreach: voxels
    its VCs traverse outside it, over its number of voxels (Maier-Hein et
    al. 2017). Local direction: share of streamline steps, in voxels with a
    true fibre, within ``angle_deg`` of one of them.

    Parameters
    ----------
    streamlines : sequence of ndarray (n_i, 3)
        Points in world coordinates (voxel coordinates if ``affine`` is None).
    end_regions : sequence of (start, end) pairs of ndarray (X, Y, Z) of bool
        The two end regions of each ground-truth bundle (at most 31).
    bundle_masks : sequence of ndarray (X, Y, Z) of bool, optional
        Voxels of each bundle, in the order of ``end_regions`` (for overlap
        and overreach).
    fibre_dirs : ndarray (X, Y, Z, K, 3), optional
        True fibre directions in the voxel frame, NaN-padded (for the local
        direction score).
    affine : ndarray (4, 4), optional
        Voxel-to-world transform of the volumes; voxel centres are at integer
        voxel coordinates.
    angle_deg : float, optional
        Largest angle (degrees) of a step counted as along a true fibre.

    Returns
    -------
    scores : dict
        ``n_streamlines``; counts ``vc``, ``ic``, ``nc`` and their shares
        ``vc_rate``, ``ic_rate``, ``nc_rate``; ``valid_bundles``,
        ``invalid_bundles``, ``n_bundles``; ``overlap`` and ``overreach``
        (means over bundles, NaN without ``bundle_masks``; a bundle without
        VC has overlap 0 and overreach 0); ``per_bundle`` (list of dicts with
        ``vc``, ``overlap``, ``overreach``); ``steps_along_fibres`` (share of
        steps within ``angle_deg`` of a true fibre, NaN without
        ``fibre_dirs``) and ``steps_off_fibres`` (share of steps in voxels
        without a true fibre, not counted in the former).

    References
    ----------
    Côté M.-A. et al. (2013). Tractometer: towards validation of
    tractography pipelines. Medical Image Analysis 17, 844-857.

    Maier-Hein K. H. et al. (2017). The challenge of mapping the human
    connectome based on diffusion tractography. Nature Communications 8, 1349.
    """
    if not 0 < angle_deg <= 90:
        raise ValueError(f"angle_deg must be in (0, 90] degrees, got {angle_deg}")
    regions, masks = _check_regions(end_regions, bundle_masks)
    n_bundles, shape = regions.shape[0], regions.shape[2:]
    points, lengths = _to_voxels(streamlines, affine)
    n_lines = len(lengths)

    # Bit 2 b (start) and 2 b + 1 (end) of each voxel: the regions it is in.
    codes = np.zeros(shape, dtype=np.int64)
    for bundle in range(n_bundles):
        for side in range(2):
            codes |= regions[bundle, side].astype(np.int64) << (2 * bundle + side)
    nonempty = lengths > 0
    first_index = np.cumsum(lengths) - lengths
    first = np.zeros(n_lines, dtype=np.int64)
    last = np.zeros(n_lines, dtype=np.int64)
    first[nonempty] = _voxel_lookup(codes, points[first_index[nonempty]])
    last[nonempty] = _voxel_lookup(codes, points[first_index[nonempty] + lengths[nonempty] - 1])
    starts = sum(1 << (2 * b) for b in range(n_bundles))
    # Bundle bits where one end is in the start and the other in the end region.
    joined = (((first & starts) & (last >> 1)) | ((last & starts) & (first >> 1))) & starts
    valid = joined != 0
    invalid = ~valid & (first != 0) & (last != 0)
    # A VC of several bundles (overlapping regions) counts for the lowest;
    # an IC joins the lowest regions of its two ends.
    owner = _lowest_bit(joined, 2 * n_bundles) // 2
    pairs = set(zip(*np.sort([_lowest_bit(first[invalid], 2 * n_bundles),
                              _lowest_bit(last[invalid], 2 * n_bundles)], axis=0).tolist()))

    per_bundle = [{"vc": int(np.sum(owner == b)), "overlap": np.nan, "overreach": np.nan}
                  for b in range(n_bundles)]
    if masks is not None:
        line_voxels = _traversed_voxels(points, lengths, shape)
        for bundle in range(n_bundles):
            members = np.flatnonzero(owner == bundle)
            traversed = (np.unique(np.concatenate([line_voxels[i] for i in members]))
                         if members.size else np.zeros(0, dtype=np.intp))
            truth = masks[bundle].ravel()
            size = max(int(truth.sum()), 1)
            inside = truth[traversed]
            per_bundle[bundle]["overlap"] = float(inside.sum() / size)
            per_bundle[bundle]["overreach"] = float((~inside).sum() / size)

    along, off = np.nan, np.nan
    if fibre_dirs is not None:
        true, present = _directions(fibre_dirs, "fibre_dirs")
        if true.shape[:3] != tuple(shape):
            raise ValueError(f"fibre_dirs must cover the grid {tuple(shape)}, got "
                             f"{true.shape[:3]}")
        # Steps within each streamline only (not across two of them).
        line_id = np.repeat(np.arange(n_lines), lengths)
        keep = line_id[1:] == line_id[:-1]
        steps = np.diff(points, axis=0)[keep]
        middles = (points[:-1][keep] + points[1:][keep]) / 2
        norms = np.linalg.norm(steps, axis=1)
        steps, middles = steps[norms > 0] / norms[norms > 0, None], middles[norms > 0]
        local = _voxel_lookup(np.where(present[..., None], true, 0.0), middles)
        has_fibre = np.any(local != 0, axis=(1, 2))
        angles = np.degrees(np.arccos(np.clip(
            np.abs(np.einsum("nkd,nd->nk", local, steps)).max(axis=1, initial=0), 0, 1)))
        if steps.shape[0]:
            off = float(np.mean(~has_fibre))
        if has_fibre.any():
            along = float(np.mean(angles[has_fibre] <= angle_deg))

    def share(count):
        return count / n_lines if n_lines else np.nan

    n_vc, n_ic = int(valid.sum()), int(invalid.sum())
    n_nc = n_lines - n_vc - n_ic
    return {
        "n_streamlines": n_lines, "vc": n_vc, "ic": n_ic, "nc": n_nc,
        "vc_rate": share(n_vc), "ic_rate": share(n_ic), "nc_rate": share(n_nc),
        "n_bundles": n_bundles,
        "valid_bundles": int(sum(b["vc"] > 0 for b in per_bundle)),
        "invalid_bundles": len(pairs),
        "overlap": (float(np.mean([b["overlap"] for b in per_bundle]))
                    if masks is not None else np.nan),
        "overreach": (float(np.mean([b["overreach"] for b in per_bundle]))
                      if masks is not None else np.nan),
        "per_bundle": per_bundle,
        "steps_along_fibres": along, "steps_off_fibres": off,
    }
