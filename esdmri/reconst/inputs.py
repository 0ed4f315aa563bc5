"""Checks and normalisation of the scans a deconvolution model receives.

:class:`PreparedScan` is a scan after them: what every step of a fit reads
(:meth:`esdmri.reconst.models.RTESDModel.prepare`).
"""

import warnings
from dataclasses import dataclass

import numpy as np

from ..response import TENSOR_MAX_BVAL, single_shell
from ..shm import count_unique_axes, count_weighted_axes, group_shells, n_coeffs
from .config import DEBIAS_METHODS


# Below this largest b-value (s/mm^2) a scheme is read as given in ms/um^2
# (b = 1 ms/um^2 is 1000 s/mm^2): diffusion weightings of dMRI start at a few
# hundred s/mm^2, while b0 volumes may be recorded with b up to ~50.
MIN_PLAUSIBLE_MAX_BVAL = 50.0

FLOAT32_MAX = float(np.finfo(np.float32).max)

# Fewest distinct diffusion-weighted directions: a diffusion tensor (what
# DIPY's response estimators fit) has six unknowns.
MIN_DIRECTIONS = 6


def check_gtab(gtab):
    """Validate a gradient table: b-values in s/mm^2, b0 and weighted volumes.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable

    Raises
    ------
    TypeError
        ``gtab`` is not a gradient table.
    ValueError
        The b-values look like ms/um^2 (every non-zero one below
        :data:`MIN_PLAUSIBLE_MAX_BVAL`), there is no b0 or no
        diffusion-weighted volume, or fewer than :data:`MIN_DIRECTIONS`
        distinct diffusion-weighted directions.
    """
    if not hasattr(gtab, "bvals") or not hasattr(gtab, "b0s_mask"):
        raise TypeError(f"gtab must be a dipy GradientTable, got {type(gtab).__name__}")
    bvals = np.asarray(gtab.bvals, dtype=float)
    if not np.all(np.isfinite(bvals)) or np.any(bvals < 0):
        raise ValueError(f"gtab's b-values must be finite and >= 0, got {bvals.tolist()}")
    largest = bvals.max(initial=0.0)
    if 0 < largest < MIN_PLAUSIBLE_MAX_BVAL:
        raise ValueError(
            f"gtab's b-values look like ms/um^2, not s/mm^2: the largest is {largest:g}, "
            f"below {MIN_PLAUSIBLE_MAX_BVAL:g}; esdmri and DIPY expect s/mm^2 (b = 1 "
            "ms/um^2 is 1000 s/mm^2): multiply the b-values by 1000")
    threshold = getattr(gtab, "b0_threshold", None)
    where = "" if threshold is None else f" (b <= b0_threshold={threshold:g})"
    if not np.any(gtab.b0s_mask):
        raise ValueError(f"gtab has no b0 volume{where}: the signal cannot be normalised")
    if np.all(gtab.b0s_mask):
        raise ValueError(f"gtab has no diffusion-weighted volume: every b-value is a b0"
                         f"{where}")
    if getattr(gtab, "bvecs", None) is not None:
        n_directions = count_weighted_axes(gtab)
        if n_directions < MIN_DIRECTIONS:
            raise ValueError(
                f"gtab has {n_directions} distinct diffusion-weighted directions; at least "
                f"{MIN_DIRECTIONS} are needed (a diffusion tensor has 6 unknowns), and the "
                "fODF's SH coefficients need more")


def super_resolved_shell(gtab):
    """Whether the default fit goes beyond the SH order a gtab's axes determine.

    True for one diffusion-weighted shell above ``esdmri.response.TENSOR_MAX_BVAL``
    (b = 1500) with the 45 distinct axes or more that order 8 needs: there a
    single fibre's signal carries the SH degrees beyond 8 (``r_8 / r_0`` about
    6e-3 at b = 2000 and 2e-2 at 3000 for FA 0.76, 5e-4 at 1000), and the fit
    takes order 14 with a stronger sparsity term
    (:func:`esdmri.reconst.config.default_sh_order`,
    :func:`esdmri.reconst.config.default_sparsity`).

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    bool
    """
    shell = single_shell(gtab)
    return (shell is not None and float(np.min(shell[0])) > TENSOR_MAX_BVAL
            and shell[1] >= n_coeffs(8))


def count_weighted_measurements(gtab):
    """Distinct (shell, gradient axis) pairs of a gtab's diffusion-weighted volumes.

    Each shell weighs the fODF's SH degrees by its own response, so shells
    sharing their directions still add equations: three shells of the same 64
    axes determine the 91 coefficients of order 12 (issue 26: counted as 64
    axes, order 8 merged 45-degree crossings that order 12 resolves).

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    n_measurements : int
        :func:`esdmri.shm.count_unique_axes` of each shell's weighted
        volumes, summed over shells (0 without any).
    """
    weighted = ~np.asarray(gtab.b0s_mask, dtype=bool)
    if not weighted.any():
        return 0
    _, shell_index = group_shells(gtab)
    bvecs = np.asarray(gtab.bvecs, dtype=float)
    return sum(count_unique_axes(bvecs[weighted & (shell_index == shell)])
               for shell in np.unique(shell_index[weighted]))


def check_data(data, gtab, mask=None, warn=True):
    """Validate a gradient table and a 4D dMRI volume against it (and a mask).

    :func:`check_gtab` then :func:`check_scan`; see the latter for the
    parameters and warnings.

    Returns
    -------
    data : ndarray, shape (X, Y, Z, N)
        The same values as a float32 array.
    """
    check_gtab(gtab)
    return check_scan(data, gtab, mask, warn)[0]


def check_scan(data, gtab, mask=None, warn=True):
    """Validate a 4D dMRI volume against its (checked) gradient table, and a mask.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
    gtab : dipy.core.gradients.GradientTable
    mask : ndarray, shape (X, Y, Z), optional
        Voxels that will be used: NaN or inf values outside it are accepted
        (and set to 0), as DIPY accepts them.
    warn : bool
        Warn about negative values (False where a later check of the same
        data will).

    Returns
    -------
    data : ndarray, shape (X, Y, Z, N)
        The same values as a float32 array.
    mask : ndarray of bool, shape (X, Y, Z)
        The mask as booleans, every voxel when ``mask`` is None.

    Warns
    -----
    UserWarning
        Once, with their count, when diffusion-weighted values are negative
        (noise around a zero signal, e.g. after interpolation): they are
        used as they are, like DIPY does.
    """
    data = np.asarray(data)
    n_volumes = len(gtab.bvals)
    if data.ndim == 1 and data.shape[0] == n_volumes:
        raise ValueError(
            f"data must be a 4D volume (X, Y, Z, N), got one voxel's signal of shape "
            f"{data.shape}: the fit couples neighbouring voxels, so fit the volume and "
            "index the fit (fit = model.fit(data, mask=mask); fit[x, y, z].odf(sphere)), or "
            "give the voxel as a (1, 1, 1, N) volume, data[x:x+1, y:y+1, z:z+1]; "
            "instead of DIPY's peaks_from_model, which fits voxel by voxel, use "
            "fit.peaks()")
    if data.ndim != 4:
        raise ValueError(f"data must be a 4D array (X, Y, Z, N), got shape {data.shape}")
    if data.shape[-1] != n_volumes:
        raise ValueError(
            f"data has {data.shape[-1]} volumes but gtab has {n_volumes} "
            "b-values: they must match")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise TypeError(f"data must be real numbers, got dtype {data.dtype}")
    where = ""
    if mask is not None:
        mask = check_mask(mask, data.shape[:3])
        where = " of the mask"
    inside = data if mask is None else data[mask]
    finite = np.isfinite(inside)
    if not finite.all():
        bad_voxels = np.count_nonzero(~finite.all(axis=-1))
        advice = ("leave those voxels out of the mask or clean them" if mask is not None
                  else "pass a mask that leaves them out, or clean them")
        raise ValueError(f"data has {np.count_nonzero(~finite)} NaN or inf values in "
                         f"{bad_voxels} voxels{where}: {advice}")
    largest = max(float(inside.max(initial=0)), -float(inside.min(initial=0)))
    if largest > FLOAT32_MAX:
        raise ValueError(f"data has values up to {largest:.3g}, beyond the float32 range "
                         f"({FLOAT32_MAX:.3g}) the networks compute in: rescale the data")
    # Compared before the volumes are picked, so only a boolean array is copied.
    negative = (inside < 0)[..., ~np.asarray(gtab.b0s_mask)] if warn else None
    if warn and negative.any():
        warnings.warn(
            f"data has {np.count_nonzero(negative)} negative diffusion-weighted values in "
            f"{np.count_nonzero(negative.any(axis=-1))} voxels{where}: they are used as they "
            "are (noise around a zero signal); clip them at 0 first if that is wrong",
            UserWarning, stacklevel=3)
    data = data.astype(np.float32, copy=False)
    if mask is not None and not np.isfinite(data).all():
        data = np.where(mask[..., None], data, np.float32(0))
    return data, (mask if mask is not None else np.ones(data.shape[:3], dtype=bool))


def check_mask(mask, spatial_shape):
    """Validate a brain mask, defaulting to every voxel.

    Parameters
    ----------
    mask : ndarray or None, shape (X, Y, Z)
    spatial_shape : tuple of int

    Returns
    -------
    mask : ndarray of bool, shape (X, Y, Z)
    """
    if mask is None:
        return np.ones(spatial_shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != tuple(spatial_shape):
        raise ValueError(f"mask has shape {mask.shape} but data's voxel grid is "
                         f"{tuple(spatial_shape)}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty: it selects no voxel")
    return mask


def normalize_by_b0(data, gtab, mask, warn_dropped=False):
    """Divide each voxel's signal by its mean b0 signal.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
    gtab : dipy.core.gradients.GradientTable
    mask : ndarray of bool, shape (X, Y, Z)
    warn_dropped : bool
        Warn, with their count, about voxels of ``mask`` that are left out
        because their mean b0 is not positive (for a mask the user gave).

    Returns
    -------
    normalized : ndarray, float32, shape (X, Y, Z, N)
        Zero outside ``mask``.
    mask : ndarray of bool, shape (X, Y, Z)
        ``mask`` without the voxels whose mean b0 is not positive.
    """
    mean_b0 = data[..., gtab.b0s_mask].mean(axis=-1)
    positive = mask & (mean_b0 > 0)
    if not positive.any():
        raise ValueError("no voxel in mask has a positive mean b0 signal")
    n_dropped = np.count_nonzero(mask) - np.count_nonzero(positive)
    if warn_dropped and n_dropped:
        # DIPY's models do not stop on a few such voxels (brain edges after
        # motion correction): they are left out visibly, not fitted as garbage.
        warnings.warn(
            f"{n_dropped} of the {np.count_nonzero(mask)} voxels of the mask have a mean b0 "
            "signal <= 0 and are left out (fit.mask is False there, fODF and fractions 0): "
            "their signal cannot be normalised", UserWarning, stacklevel=3)
    mask = positive
    normalized = np.zeros(data.shape, dtype=np.float32)
    normalized[mask] = data[mask] / mean_b0[mask, None]
    return normalized, mask


# The median absolute value of a standard normal variable (scipy.stats.norm.ppf(0.75)).
_GAUSSIAN_MAD = 0.6744897501960817
# Signal-to-noise ratios S / sigma on which the Rician mean is tabulated for its
# inversion (beyond the last, rician_mean is S itself).
_RICIAN_GRID = np.concatenate([[0.0], np.geomspace(1e-3, 1e4, 6000)])


def debias_magnitudes(data, mask, variance, method="power"):
    """Magnitudes with the Rician noise floor taken off.

    A magnitude of a signal ``S`` under Gaussian noise of standard deviation
    ``sigma`` in each channel is Rician: where ``S`` is far under ``sigma``
    (along a fibre at high b, at low SNR) the magnitudes sit on a floor near
    ``sigma sqrt(pi / 2)``, which a noise-free forward model can only explain
    by a fatter response or by extra fODF lobes. Taking the floor off once,
    before the signal is normalised, lets the prior, the network and the
    refinement see the same debiased signal and keeps the refinement's
    least-squares data term.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
        Magnitudes.
    mask : ndarray of bool, shape (X, Y, Z)
    variance : float
        ``sigma^2`` of the noise, in the units of ``data`` squared
        (:func:`noise_floor_variance`).
    method : {"power", "rician_mean"}
        ``"power"``: ``sqrt(max(M^2 - 2 sigma^2, 0))``, from ``E[M^2] = S^2 +
        2 sigma^2`` (the power-image correction of [1]_), unbiased in ``S^2``;
        its mean is ``0.46 sigma`` at ``S = 0`` (against the floor's ``1.25
        sigma``) and lies about as far under ``S`` above the floor as the
        magnitudes' mean lies over it. ``"rician_mean"``: the ``S`` whose
        Rician mean (:func:`esdmri.response.rician_mean`) is ``M``, 0 for
        ``M`` under the floor (the inversion of [2]_); its mean is ``0.61
        sigma`` at ``S = 0`` and within ``0.11 sigma`` of ``S`` above
        ``sigma``.

    Returns
    -------
    debiased : ndarray, float64, shape (X, Y, Z, N)
        ``data`` itself outside ``mask``.

    References
    ----------
    .. [1] McGibney G, Smith MR. An unbiased signal-to-noise ratio measure
       for magnetic resonance images. Med Phys 1993;20(4):1077-1078.
    .. [2] Koay CG, Basser PJ. Analytically exact correction scheme for
       signal extraction from noisy magnitude MR signals. J Magn Reson
       2006;179(2):317-322.
    """
    if not variance >= 0:
        raise ValueError(f"variance must be >= 0, got {variance!r}")
    if np.shape(mask) != np.shape(data)[:3]:
        raise ValueError(f"mask must have the data's spatial shape {np.shape(data)[:3]}, got "
                         f"{np.shape(mask)}")
    if method not in DEBIAS_METHODS:
        raise ValueError(f"method must be {' or '.join(map(repr, DEBIAS_METHODS))}, got "
                         f"{method!r}")
    debiased = np.array(data, dtype=np.float64)
    if variance == 0:
        return debiased
    inside = debiased[mask]
    if method == "power":
        debiased[mask] = np.sqrt(np.maximum(inside**2 - 2.0 * variance, 0.0))
        return debiased
    from ..response import rician_mean

    sigma = np.sqrt(variance)
    ratio = inside / sigma
    means = rician_mean(_RICIAN_GRID, 1.0)
    inverted = np.interp(ratio, means, _RICIAN_GRID, left=0.0)
    debiased[mask] = sigma * np.where(ratio > means[-1], ratio, inverted)
    return debiased


def noise_floor_variance(data, gtab, mask):
    """The scan's noise variance ``sigma^2`` in the units of ``data`` squared.

    Measured on the b0 volumes alone, where the signal lies far above the
    floor (so the magnitudes' noise is Gaussian of standard deviation
    ``sigma``) and tissue contrast is weakest:

    - with two or more b0 volumes, from their spread within each voxel: the
      median over the voxels of ``mask`` of the b0 volumes' sample variance,
      over the median of its ``chi^2`` distribution (``n_b0 - 1`` degrees of
      freedom), so that the few voxels that move or pulsate between volumes
      do not count;
    - with one, from face-neighbour differences of the b0 volume: ``(MAD /
      0.6745)^2 / 2`` of the differences over the pairs of ``mask`` (the
      median ignores the pairs across tissue borders).

    Why not every measurement's neighbour differences (the refinement's
    :func:`esdmri.reconst.refine.noise_variance`, the estimate until
    2026-12-06): diffusion-weighted neighbours differ by signal as well as
    noise wherever bundles bend, disperse or share a voxel with another
    tissue, and on the floor the magnitudes spread less than ``sigma``. On the
    devset's dev phantoms (b0 100, ``sigma`` 10 / 5 / 3.33 at SNR 10 / 20 /
    30) that estimate gave 8.9-10.1 / 4.7-7.0 / 3.2-6.2 (the signal part of
    the heldout families' neighbour differences alone is 3.3-5.4); this one
    gives 9.9-10.5 / 5.0-5.1 / 3.2-3.5 (docs/benchmarks.md, "Debiasing the
    noise floor").

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
        Magnitudes.
    gtab : dipy.core.gradients.GradientTable
    mask : ndarray of bool, shape (X, Y, Z)

    Returns
    -------
    variance : float
        0 when the scan has one b0 volume and no two voxels of ``mask``
        touch (nothing to measure it on).
    """
    from scipy.stats import chi2

    b0 = np.asarray(data, dtype=np.float64)[mask][:, np.asarray(gtab.b0s_mask)]
    n_b0 = b0.shape[1]
    if n_b0 >= 2:
        dof = n_b0 - 1
        return float(np.median(b0.var(axis=1, ddof=1)) * dof / chi2.ppf(0.5, dof))
    import torch  # here, so that the data checks load without torch

    from .losses import neighbour_pairs

    first, second = (index.numpy() for index in neighbour_pairs(torch.as_tensor(mask)))
    if not len(first):
        return 0.0
    differences = b0[first, 0] - b0[second, 0]
    return float((np.median(np.abs(differences)) / _GAUSSIAN_MAD) ** 2 / 2)


def voxel_noise_sigma(data, gtab, mask, variance):
    """Each voxel's noise level in the units of its b0-normalised signal.

    The scan's ``sigma`` (:func:`noise_floor_variance`) over the voxel's mean
    b0, what :func:`normalize_by_b0` divides the voxel by: the noise level of
    the Rician-mean data term (``noise_floor="model"``,
    :class:`esdmri.reconst.rician.RicianVoxelLoss`).

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
    gtab : dipy.core.gradients.GradientTable
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels with a positive mean b0 (:func:`normalize_by_b0`'s mask).
    variance : float
        ``sigma^2`` in the units of ``data`` squared.

    Returns
    -------
    sigma : ndarray, float64, shape (X, Y, Z), or None
        0 outside ``mask``. None where ``variance`` is 0 (no two voxels of the
        mask touch, so no noise level is measured): without noise the Rician
        mean is the signal itself and the data term the least-squares one.
    """
    if not variance >= 0:
        raise ValueError(f"variance must be >= 0, got {variance!r}")
    if variance == 0:
        return None
    mean_b0 = np.asarray(data, dtype=np.float64)[..., gtab.b0s_mask].mean(axis=-1)
    sigma = np.zeros(mask.shape)
    sigma[mask] = np.sqrt(variance) / mean_b0[mask]
    return sigma


def resolve_device(device):
    """A ``torch.device`` for ``device``, checking that CUDA exists when asked."""
    import torch  # here, so that the data checks load without torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available "
                         "on this machine: use device='cpu'")
    return resolved


@dataclass(frozen=True)
class PreparedScan:
    """A checked, b0-normalised scan with its response and grid interpolation.

    Made by ``model.prepare(data, mask=mask)``; the steps of a fit
    (``model.prior_coefficients``, ``model.network_coefficients``,
    ``model.refine``, ``model.train``) read it, so the data are checked once
    per fit.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
    normalized : ndarray, float32, shape (X, Y, Z, N)
        Signal divided by the mean b0, zero outside ``mask``.
    mask : ndarray of bool, shape (X, Y, Z)
        The voxels fitted (the given mask without voxels whose mean b0 is
        not positive).
    response : TissueResponse
        The model's, or the one estimated from this scan.
    interpolator : esdmri.shm.ShellInterpolator
        From the gtab's shells onto the model's HEALPix grid.
    noise_sigma : ndarray, shape (X, Y, Z), or None
        Each voxel's noise level in the units of ``normalized``
        (:func:`voxel_noise_sigma`) when the refinement's data term models
        the Rician floor (``noise_floor="model"``); None otherwise.
    """

    gtab: object
    normalized: np.ndarray
    mask: np.ndarray
    response: object
    interpolator: object
    noise_sigma: object = None
