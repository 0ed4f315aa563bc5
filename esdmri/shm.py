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
        centres = unique_bvals_tolerance(weighted, tol=tolerance)
        nearest = np.argmin(np.abs(weighted[:, None] - centres[None, :]), axis=1)
        shell_index[~is_b0] = first_weighted + nearest
    n_shells = int(shell_index.max()) + 1 if bvals.size else 0
    shell_bvals = np.array([bvals[shell_index == s].mean() for s in range(n_shells)])
    return shell_bvals, shell_index


class ShellInterpolator:
    """Linear map from a multi-shell acquisition to one channel per shell on a grid.

    Per shell, real even SH up to the largest order its direction count
    supports (capped) are fitted by least squares and evaluated at the
    target vertices; the b0 shell becomes a constant channel equal to the mean
    of the b0 volumes. The whole map is precomputed as one dense operator so
    that applying it is a single matrix product.

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
    shell_index : ndarray (N,)
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
