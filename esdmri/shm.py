"""Real even spherical harmonics, shell grouping and shell-to-grid interpolation.

Every SH computation runs in DIPY's non-legacy ``descoteaux07`` basis
restricted to even orders (dMRI signals and fODFs are antipodally symmetric);
``tournier07`` (MRtrix3) is offered for export, and the legacy
``descoteaux07`` basis (still DIPY's default in ``sh_to_sf``, CSD and the
direction getters) for handing fODFs to DIPY. The basis functions
themselves always come from :mod:`dipy.reconst.shm`.

Zonal (``m = 0``) harmonics are identical in both non-legacy bases, so the
zonal response coefficients of MRtrix3 response files can be used as is.
"""

import warnings
from functools import lru_cache

import numpy as np
from dipy.core.gradients import unique_bvals_tolerance
from dipy.core.sphere import Sphere
from dipy.reconst.shm import sh_to_sf_matrix, sph_harm_ind_list

SH_BASES = ("descoteaux07", "tournier07")

# DIPY's default b-value clustering gap (`unique_bvals_tolerance`, `tol=20`).
DEFAULT_BVAL_TOLERANCE = 20

# A shell fit whose design matrix is worse conditioned than this amplifies
# noise too much for plain least squares; it gets a Laplace-Beltrami penalty
# with DIPY's usual Q-ball weight instead.
MAX_FIT_CONDITION = 1e3
FALLBACK_SMOOTH = 0.006

# Two unit vectors whose axes differ by less than about 0.1 degrees sample
# the same point of an antipodally symmetric function.
_SAME_AXIS_COSINE = 1.0 - 1e-6


def _check_sh_order(sh_order_max, name="sh_order_max"):
    if isinstance(sh_order_max, bool) or not isinstance(sh_order_max, (int, np.integer)):
        raise TypeError(f"{name} must be an even int >= 0, got {sh_order_max!r}")
    if sh_order_max < 0 or sh_order_max % 2:
        raise ValueError(f"{name} must be an even int >= 0, got {sh_order_max}")
    return int(sh_order_max)


def _check_basis(basis):
    if basis not in SH_BASES:
        raise ValueError(f"basis must be one of {SH_BASES}, got {basis!r}")
    return basis


def _check_coefficients(coeffs, sh_order_max, name="coeffs"):
    coeffs = np.asarray(coeffs)
    expected = n_coeffs(sh_order_max)
    if coeffs.ndim == 0 or coeffs.shape[-1] != expected:
        raise ValueError(
            f"{name} must have shape (..., {expected}) for sh_order_max="
            f"{sh_order_max}, got {coeffs.shape}")
    return coeffs


def _unit_vectors(vertices, name="vertices"):
    vertices = np.asarray(vertices, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"{name} must have shape (V, 3), got {vertices.shape}")
    norms = np.linalg.norm(vertices, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms < 1e-8):
        raise ValueError(f"{name} must be finite non-zero direction vectors")
    return vertices / norms[:, None]


def n_coeffs(sh_order_max):
    """Number of real even SH coefficients up to order ``sh_order_max``.

    Parameters
    ----------
    sh_order_max : int
        Even maximal SH order (l).

    Returns
    -------
    int
        ``(sh_order_max + 1) * (sh_order_max + 2) / 2``.
    """
    sh_order_max = _check_sh_order(sh_order_max)
    return (sh_order_max + 1) * (sh_order_max + 2) // 2


def sh_degrees(sh_order_max):
    """Order ``l`` of every coefficient, in DIPY's coefficient ordering.

    Parameters
    ----------
    sh_order_max : int
        Even maximal SH order (l).

    Returns
    -------
    l_values : ndarray (C,) int
    """
    _, l_values = sph_harm_ind_list(_check_sh_order(sh_order_max))
    return l_values


def sh_order_for_directions(n_directions, cap=8):
    """Largest even SH order a shell of ``n_directions`` distinct axes supports.

    An even SH fit of order L has ``n_coeffs(L)`` unknowns, so it needs at
    least that many distinct (antipodally unique) directions.

    Parameters
    ----------
    n_directions : int
        Number of distinct gradient axes of the shell (>= 1).
    cap : int, optional
        Even upper bound on the returned order.

    Returns
    -------
    int
        Largest even ``L <= cap`` with ``n_coeffs(L) <= n_directions``.
    """
    cap = _check_sh_order(cap, "cap")
    if isinstance(n_directions, bool) or not isinstance(n_directions, (int, np.integer)):
        raise TypeError(f"n_directions must be an int >= 1, got {n_directions!r}")
    if n_directions < 1:
        raise ValueError(f"n_directions must be >= 1, got {n_directions}")
    order = 0
    while order + 2 <= cap and n_coeffs(order + 2) <= n_directions:
        order += 2
    return order


def count_unique_axes(directions):
    """Number of distinct axes among directions, ``g`` and ``-g`` counting once.

    Parameters
    ----------
    directions : ndarray (n, 3)
        Non-zero direction vectors.

    Returns
    -------
    int
    """
    directions = _unit_vectors(directions, "directions")
    same_axis = np.abs(directions @ directions.T) >= _SAME_AXIS_COSINE
    # A direction is new unless it repeats the axis of an earlier one.
    repeats_earlier = np.triu(same_axis, k=1).any(axis=0)
    return int(np.count_nonzero(~repeats_earlier))


def sh_matrix(sh_order_max, vertices, basis="descoteaux07", legacy=False):
    """Real even SH basis (non-legacy DIPY definition) evaluated at vertices.

    Parameters
    ----------
    sh_order_max : int
        Even maximal SH order (l).
    vertices : ndarray (V, 3)
        Directions (normalised here).
    basis : {"descoteaux07", "tournier07"}, optional
        SH basis; ``tournier07`` is MRtrix3's.
    legacy : bool, optional
        DIPY's legacy variant of the basis (DIPY's default elsewhere).

    Returns
    -------
    ndarray (V, C)
        ``sf = coeffs @ sh_matrix(...).T`` samples coefficients at vertices.
    """
    sh_order_max = _check_sh_order(sh_order_max)
    sphere = Sphere(xyz=_unit_vectors(vertices))
    matrix = sh_to_sf_matrix(sphere, sh_order_max=sh_order_max,
                             basis_type=_check_basis(basis), legacy=legacy,
                             return_inv=False)
    return np.ascontiguousarray(matrix.T)


def b0_mask(gtab, b0_threshold=None):
    """Volumes counted as b0: ``b <= b0_threshold`` (default ``gtab.b0_threshold``).

    Parameters
    ----------
    gtab : GradientTable
    b0_threshold : float, optional

    Returns
    -------
    ndarray (N,) bool
    """
    if b0_threshold is None:
        return np.asarray(gtab.b0s_mask, dtype=bool)
    return np.asarray(gtab.bvals, dtype=np.float64) <= b0_threshold


@lru_cache(maxsize=64)
def cluster_bvals(bvals, tolerance):
    """DIPY's b-value clusters, warning once per scheme instead of per call.

    DIPY warns about overlapping clusters on every call, and a fit groups the
    shells dozens of times (48 warnings per fit on small_101D); the cache
    makes it one warning, which says what esdmri does about it
    (``cluster_bvals.cache_clear()`` makes the next call warn again).

    Parameters
    ----------
    bvals : tuple of float
        The diffusion-weighted b-values (hashable, for the cache).
    tolerance : float
        DIPY's ``unique_bvals_tolerance`` tolerance, in s/mm^2.

    Returns
    -------
    centres : ndarray, read-only
        The clusters' b-values.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        centres = unique_bvals_tolerance(np.asarray(bvals), tol=tolerance)
    if any("overlap in clustering" in str(w.message) for w in caught):
        warnings.warn(
            f"the b-values do not form well-separated shells (DIPY's clustering with "
            f"tolerance {tolerance:g} finds {len(centres)} overlapping groups between "
            f"b={min(bvals):g} and {max(bvals):g}); esdmri treats the scan as non-shelled: "
            "responses continuous in b, network input resampled onto a few b-values",
            UserWarning, stacklevel=4)
    centres.setflags(write=False)
    return centres


def group_shells(gtab, b0_threshold=None, tolerance=DEFAULT_BVAL_TOLERANCE):
    """Group the volumes of a gradient table into b-value shells.

    Volumes with ``b <= b0_threshold`` form the b0 shell (shell 0 when
    present). The other b-values are clustered with DIPY's
    ``unique_bvals_tolerance`` and every volume joins its nearest cluster.

    Parameters
    ----------
    gtab : GradientTable
        Acquisition scheme.
    b0_threshold : float, optional
        Largest b-value counted as b0; default ``gtab.b0_threshold``.
    tolerance : float, optional
        Clustering gap of ``unique_bvals_tolerance``.

    Returns
    -------
    shell_bvals : ndarray (S,)
        Mean b-value of each shell, ascending (b0 shell first).
    shell_index : ndarray (N,) int
        Shell of every volume.
    """
    bvals = np.asarray(gtab.bvals, dtype=np.float64)
    is_b0 = b0_mask(gtab, b0_threshold)
    shell_index = np.empty(bvals.shape, dtype=np.intp)
    first_weighted = 0
    if is_b0.any():
        shell_index[is_b0] = 0
        first_weighted = 1
    weighted = bvals[~is_b0]
    if weighted.size:
        centres = cluster_bvals(tuple(np.unique(weighted)), float(tolerance))
        nearest = np.argmin(np.abs(weighted[:, None] - centres[None, :]), axis=1)
        shell_index[~is_b0] = first_weighted + nearest
    n_shells = int(shell_index.max()) + 1 if bvals.size else 0
    shell_bvals = np.array([bvals[shell_index == s].mean() for s in range(n_shells)])
    return shell_bvals, shell_index


def count_weighted_axes(gtab):
    """Distinct axes of a gtab's diffusion-weighted gradients (v and -v count once).

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    n_axes : int
        :func:`count_unique_axes` of the weighted volumes' non-zero
        gradient directions (0 without any).
    """
    bvecs = np.asarray(gtab.bvecs, dtype=float)[~np.asarray(gtab.b0s_mask, dtype=bool)]
    bvecs = bvecs[np.linalg.norm(bvecs, axis=-1) > 0]
    return count_unique_axes(bvecs) if len(bvecs) else 0


def count_weighted_shells(gtab):
    """Number of diffusion-weighted shells of a gtab (:func:`group_shells`).

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    n_shells : int
        Shells other than b0 (0 without diffusion-weighted volumes); a scheme
        without shells counts each cluster of b-values.
    """
    weighted = ~np.asarray(gtab.b0s_mask, dtype=bool)
    if not weighted.any():
        return 0
    _, shell_index = group_shells(gtab)
    return len(np.unique(shell_index[weighted]))


def is_shelled(gtab, b0_threshold=None, tolerance=DEFAULT_BVAL_TOLERANCE):
    """Whether every diffusion-weighted shell can carry an SH fit of order 2.

    A shell with fewer than ``n_coeffs(2) = 6`` distinct axes only gives its
    mean, which depends on where its few directions point: such schemes
    (non-shelled q-space sampling, sparse shells) are resampled onto virtual
    shells by :class:`ShellInterpolator` instead.

    Parameters
    ----------
    gtab : GradientTable
    b0_threshold, tolerance : float, optional
        Shell grouping, see :func:`group_shells`.

    Returns
    -------
    bool
    """
    _, shell_index = group_shells(gtab, b0_threshold, tolerance)
    is_b0 = b0_mask(gtab, b0_threshold)
    bvecs = np.asarray(gtab.bvecs, dtype=np.float64)
    for shell in np.unique(shell_index[~is_b0]):
        if count_unique_axes(bvecs[(shell_index == shell) & ~is_b0]) < n_coeffs(2):
            return False
    return True


def virtual_shell_bvals(bvals, n_shells):
    """b-values of the virtual shells: quantiles of the diffusion-weighted b-values.

    Parameters
    ----------
    bvals : ndarray (N,)
        Diffusion-weighted b-values only.
    n_shells : int

    Returns
    -------
    ndarray (n_shells,)
        Ascending, at the quantiles ``(k + 1/2) / n_shells``, rounded to 10.
    """
    quantiles = (np.arange(n_shells) + 0.5) / n_shells
    return np.round(np.quantile(np.asarray(bvals, dtype=np.float64), quantiles), -1)


# Virtual shells of a non-shelled scan: about this many volumes each, 2 to 4;
# the signal's b-dependence is a sum of as many decays exp(-b d), d spread
# geometrically over this range (mm^2/s), with this Laplace-Beltrami weight
# (chosen on tensors sampled at small_101D's points).
VOLUMES_PER_VIRTUAL_SHELL = 30
MAX_VIRTUAL_SHELLS = 4
VIRTUAL_SHELL_DIFFUSIVITIES = (0.2e-3, 1.5e-3)
RESAMPLE_SMOOTH = 6e-4


class ShellInterpolator:
    """Linear map from an acquisition to one channel per shell on a grid.

    Per shell, real even SH up to the largest order its direction count
    supports (capped) are fitted by least squares and evaluated at the
    target vertices; the b0 shell becomes a constant channel equal to the mean
    of the b0 volumes. The whole map is precomputed as one dense operator so
    that applying it is a single matrix product.

    A scheme without usable shells (see :func:`is_shelled`: q-space
    sampling such as DIPY's ``small_101D``, or sparse shells) is resampled
    per voxel onto a few virtual shells instead: one joint least-squares fit
    of the signal as SH coefficients that are sums of decays ``exp(-b d_k)``
    in b, with a Laplace-Beltrami penalty, evaluated at virtual b-values
    (quantiles of the acquired ones, about one per
    ``VOLUMES_PER_VIRTUAL_SHELL`` volumes, 2 to 4). ``shell_bvals`` then holds the virtual
    b-values (b0 first).

    Parameters
    ----------
    gtab : GradientTable
        Acquisition scheme of the data.
    vertices : ndarray (V, 3) or object with ``.vertices``
        Target directions (e.g. ``HealpixSphere.vertices``).
    sh_order_cap : int, optional
        Upper bound on the automatic per-shell order.
    sh_order_max : int, optional
        Explicit order for every diffusion-weighted shell instead of the
        automatic one; every shell must have enough distinct axes.
    b0_threshold, tolerance : float, optional
        Shell grouping, see :func:`group_shells`.
    smooth : float, optional
        Laplace-Beltrami weight of the fit. Default: none where the shell's
        design matrix has condition number <= ``MAX_FIT_CONDITION`` (band
        limited signals are then reproduced exactly), ``FALLBACK_SMOOTH``
        otherwise.

    Attributes
    ----------
    shell_bvals : ndarray (S,)
        b-value of each channel (b0 first).
    shell_index : ndarray (N,)
        Shell of every volume (of :func:`group_shells`).
    resampled : bool
        Channels are virtual shells (the scheme has no usable shells).
    shell_sh_orders : ndarray (S,) int
        SH order fitted per shell (0 for the b0 shell).
    shell_smooth : ndarray (S,)
        Laplace-Beltrami weight used per shell.
    operator : ndarray (S, V, N) float64
        ``out[..., s, v] = sum_n operator[s, v, n] * data[..., n]``.
    """

    def __init__(self, gtab, vertices, sh_order_cap=8, sh_order_max=None,
                 b0_threshold=None, tolerance=DEFAULT_BVAL_TOLERANCE, smooth=None):
        vertices = _unit_vectors(getattr(vertices, "vertices", vertices))
        sh_order_cap = _check_sh_order(sh_order_cap, "sh_order_cap")
        if sh_order_max is not None:
            sh_order_max = _check_sh_order(sh_order_max)
        if smooth is not None and not smooth >= 0:
            raise ValueError(f"smooth must be None or a float >= 0, got {smooth!r}")
        self.shell_bvals, self.shell_index = group_shells(gtab, b0_threshold, tolerance)
        bvecs = np.asarray(gtab.bvecs, dtype=np.float64)
        is_b0 = b0_mask(gtab, b0_threshold)
        self.resampled = not is_shelled(gtab, b0_threshold, tolerance)
        if self.resampled:
            self._resample(gtab, vertices, is_b0, sh_order_cap, smooth)
            return
        n_shells, n_vertices, n_volumes = len(self.shell_bvals), len(vertices), len(bvecs)
        self.n_volumes = n_volumes
        self.shell_sh_orders = np.zeros(n_shells, dtype=int)
        self.shell_smooth = np.zeros(n_shells)
        operator = np.zeros((n_shells, n_vertices, n_volumes))
        for shell in range(n_shells):
            volumes = np.flatnonzero(self.shell_index == shell)
            if is_b0[volumes[0]]:
                operator[shell][:, volumes] = 1.0 / len(volumes)
                continue
            order = self._shell_order(bvecs[volumes], sh_order_cap, sh_order_max,
                                      self.shell_bvals[shell])
            shell_smooth = self._shell_smooth(bvecs[volumes], order, smooth)
            _, fit = sh_to_sf_matrix(Sphere(xyz=_unit_vectors(bvecs[volumes], "bvecs")),
                                     sh_order_max=order, basis_type="descoteaux07",
                                     legacy=False, return_inv=True, smooth=shell_smooth)
            operator[shell][:, volumes] = sh_matrix(order, vertices) @ fit.T
            self.shell_sh_orders[shell] = order
            self.shell_smooth[shell] = shell_smooth
        self.operator = operator
        self._operator_float32 = None

    def _resample(self, gtab, vertices, is_b0, sh_order_cap, smooth):
        """Operator of the virtual shells of a non-shelled scheme."""
        bvals = np.asarray(gtab.bvals, dtype=np.float64)
        bvecs = np.asarray(gtab.bvecs, dtype=np.float64)
        weighted = np.flatnonzero(~is_b0)
        n_volumes = len(bvals)
        if not is_b0.any():
            raise ValueError("resampling a scheme without shells needs b0 volumes (the "
                             "b0 channel); none has b <= b0_threshold")
        n_virtual = int(np.clip(round(len(weighted) / VOLUMES_PER_VIRTUAL_SHELL), 2,
                                MAX_VIRTUAL_SHELLS))
        order = 0
        while (order + 2 <= sh_order_cap
               and n_virtual * n_coeffs(order + 2) <= len(weighted)):
            order += 2
        if order < 2:
            raise ValueError(
                f"the gtab has no usable shells and only {len(weighted)} diffusion-weighted "
                f"volumes: resampling it onto {n_virtual} virtual shells with SH order 2 "
                f"needs at least {n_virtual * n_coeffs(2)}")
        knots = virtual_shell_bvals(bvals[weighted], n_virtual)
        knots = np.unique(knots)
        n_virtual = len(knots)
        # Each SH coefficient is a sum of decays exp(-b d_k) in b: diffusion
        # signals are (mixtures of) such decays, so this follows them between
        # and beyond the virtual b-values far better than linear interpolation
        # (max error 0.08 against 0.18 for tensors sampled like small_101D).
        diffusivities = np.geomspace(*VIRTUAL_SHELL_DIFFUSIVITIES, n_virtual)
        decays = np.exp(-np.outer(bvals[weighted], diffusivities))
        basis = sh_matrix(order, bvecs[weighted])  # (n, C)
        design = (decays[:, :, None] * basis[:, None, :]).reshape(len(weighted), -1)
        l_values = sh_degrees(order)
        weight = RESAMPLE_SMOOTH if smooth is None else float(smooth)
        penalty = np.tile(weight * (l_values * (l_values + 1.0))**2, n_virtual)
        fit = np.linalg.solve(design.T @ design + np.diag(penalty), design.T)  # (K C, n)
        to_grid = sh_matrix(order, vertices)  # (V, C)
        n_coeff = n_coeffs(order)
        operator = np.zeros((n_virtual + 1, len(vertices), n_volumes))
        operator[0][:, is_b0] = 1.0 / np.count_nonzero(is_b0)
        radial = np.exp(-np.outer(knots, diffusivities))  # (virtual shells, K)
        fit = fit.reshape(n_virtual, n_coeff, -1)
        for k in range(n_virtual):
            operator[k + 1][:, weighted] = to_grid @ np.einsum("j,jcn->cn", radial[k], fit)
        self.shell_bvals = np.concatenate([[bvals[is_b0].mean()], knots])
        self.shell_sh_orders = np.array([0] + [order] * n_virtual)
        self.shell_smooth = np.array([0.0] + [weight] * n_virtual)
        self.n_volumes = n_volumes
        self.operator = operator
        self._operator_float32 = None

    @staticmethod
    def _shell_order(directions, sh_order_cap, sh_order_max, bval):
        n_axes = count_unique_axes(directions)
        if sh_order_max is None:
            return sh_order_for_directions(n_axes, sh_order_cap)
        if n_coeffs(sh_order_max) > n_axes:
            raise ValueError(
                f"sh_order_max={sh_order_max} needs {n_coeffs(sh_order_max)} distinct "
                f"directions, but the shell b={bval:g} has only {n_axes}")
        return sh_order_max

    @staticmethod
    def _shell_smooth(directions, order, smooth):
        if smooth is not None:
            return float(smooth)
        condition = np.linalg.cond(sh_matrix(order, directions))
        return 0.0 if condition <= MAX_FIT_CONDITION else FALLBACK_SMOOTH

    def __call__(self, data):
        """Interpolate every shell onto the target vertices.

        Parameters
        ----------
        data : ndarray (..., N)
            Signal, last axis ordered like the gradient table.

        Returns
        -------
        ndarray (..., S, V)
            float32 for float32 (or integer) input, float64 otherwise.
        """
        data = np.asarray(data)
        if data.ndim == 0 or data.shape[-1] != self.n_volumes:
            raise ValueError(
                f"data must have shape (..., {self.n_volumes}) to match the gtab, "
                f"got {np.shape(data)}")
        if np.result_type(data.dtype, np.float32) == np.float32:
            if self._operator_float32 is None:
                self._operator_float32 = self.operator.astype(np.float32)
            operator = self._operator_float32
        else:
            operator = self.operator
        n_shells, n_vertices, _ = operator.shape
        flat = data.reshape(-1, self.n_volumes).astype(operator.dtype, copy=False)
        out = flat @ operator.reshape(n_shells * n_vertices, self.n_volumes).T
        return out.reshape(data.shape[:-1] + (n_shells, n_vertices))


def convolve_sh(coeffs, zonal, sh_order_max):
    """Spherical convolution of SH coefficients with a zonal kernel (Funk-Hecke).

    ``c'_lm = sqrt(4 pi / (2l + 1)) r_l c_lm``: with ``r_l`` the zonal SH
    coefficients of a response whose axis is z, a delta fODF along ``u``
    convolves to the response rotated onto ``u``.

    Parameters
    ----------
    coeffs : ndarray (..., C)
        Even SH coefficients, ``C = n_coeffs(sh_order_max)``.
    zonal : ndarray (..., K)
        Zonal coefficients ``r_0, r_2, ...``; broadcast against the leading
        axes of ``coeffs``. Orders beyond ``2 (K - 1)`` count as zero, orders
        beyond ``sh_order_max`` are ignored.
    sh_order_max : int
        Even maximal SH order of ``coeffs``.

    Returns
    -------
    ndarray (..., C)
    """
    coeffs = _check_coefficients(coeffs, sh_order_max)
    zonal = np.asarray(zonal, dtype=np.float64)
    if zonal.ndim == 0 or zonal.shape[-1] < 1:
        raise ValueError(f"zonal must have shape (..., K) with K >= 1, got {zonal.shape}")
    n_zonal = sh_order_max // 2 + 1
    padded = np.zeros(zonal.shape[:-1] + (n_zonal,))
    kept = min(n_zonal, zonal.shape[-1])
    padded[..., :kept] = zonal[..., :kept]
    l_values = sh_degrees(sh_order_max)
    factors = np.sqrt(4 * np.pi / (2 * l_values + 1)) * padded[..., l_values // 2]
    return coeffs * factors


@lru_cache(maxsize=16)
def _basis_change(sh_order_max, source, target, target_legacy=False, source_legacy=False):
    """Matrix M with ``coeffs_target = coeffs_source @ M`` (same function).

    Both bases span the same space, so fitting one to the other on a sphere
    with more points than coefficients is exact; the result is a signed
    permutation, which is enforced by rounding after the check.
    """
    n_points = max(4 * n_coeffs(sh_order_max), 64)
    # Fibonacci sphere: well spread, deterministic, no coincident points.
    index = np.arange(n_points) + 0.5
    z = 1 - 2 * index / n_points
    azimuth = np.pi * (1 + 5**0.5) * index
    radius = np.sqrt(1 - z**2)
    points = np.stack([radius * np.cos(azimuth), radius * np.sin(azimuth), z], axis=1)
    with warnings.catch_warnings():
        # DIPY flags every use of its legacy basis; esdmri converts to it on
        # purpose, because DIPY's own tools read that basis by default.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        source_matrix = sh_matrix(sh_order_max, points, source, legacy=source_legacy)
        target_matrix = sh_matrix(sh_order_max, points, target, legacy=target_legacy)
    change = np.linalg.lstsq(target_matrix, source_matrix, rcond=None)[0].T
    rounded = np.rint(change) + 0.0  # + 0.0 turns -0.0 into 0.0
    if not np.allclose(change, rounded, atol=1e-8):
        raise RuntimeError(f"{source} -> {target} is not a signed permutation in this DIPY")
    rounded.setflags(write=False)
    return rounded


def descoteaux_to_tournier(coeffs, sh_order_max):
    """Non-legacy ``descoteaux07`` coefficients to MRtrix3 ``tournier07``.

    Parameters
    ----------
    coeffs : ndarray (..., C)
    sh_order_max : int

    Returns
    -------
    ndarray (..., C)
        Coefficients of the same function in the ``tournier07`` basis.
    """
    coeffs = _check_coefficients(coeffs, sh_order_max)
    return coeffs @ _basis_change(_check_sh_order(sh_order_max), "descoteaux07", "tournier07")


def tournier_to_descoteaux(coeffs, sh_order_max):
    """MRtrix3 ``tournier07`` coefficients to non-legacy ``descoteaux07``.

    Parameters
    ----------
    coeffs : ndarray (..., C)
    sh_order_max : int

    Returns
    -------
    ndarray (..., C)
        Coefficients of the same function in the ``descoteaux07`` basis.
    """
    coeffs = _check_coefficients(coeffs, sh_order_max)
    return coeffs @ _basis_change(_check_sh_order(sh_order_max), "tournier07", "descoteaux07")


def descoteaux_to_legacy(coeffs, sh_order_max):
    """Non-legacy ``descoteaux07`` coefficients to DIPY's legacy default basis.

    DIPY's ``sh_to_sf``, CSD and direction getters read SH coefficients in the
    legacy ``descoteaux07`` basis unless given ``legacy=False``; the two
    differ by the sign of some ``m < 0`` coefficients.

    Parameters
    ----------
    coeffs : ndarray (..., C)
    sh_order_max : int

    Returns
    -------
    ndarray (..., C)
        Coefficients of the same function in the legacy basis.
    """
    coeffs = _check_coefficients(coeffs, sh_order_max)
    change = _basis_change(_check_sh_order(sh_order_max), "descoteaux07", "descoteaux07",
                           target_legacy=True)
    return coeffs @ change


def legacy_to_descoteaux(coeffs, sh_order_max):
    """DIPY's legacy default ``descoteaux07`` coefficients to the non-legacy basis.

    DIPY's CSD and MSMT-CSD fits return legacy coefficients.

    Parameters
    ----------
    coeffs : ndarray (..., C)
    sh_order_max : int

    Returns
    -------
    ndarray (..., C)
        Coefficients of the same function in the non-legacy basis.
    """
    coeffs = _check_coefficients(coeffs, sh_order_max)
    change = _basis_change(_check_sh_order(sh_order_max), "descoteaux07", "descoteaux07",
                           source_legacy=True)
    return coeffs @ change
