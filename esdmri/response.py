"""Multi-shell, multi-tissue response functions and the forward model.

A response is stored like MRtrix3 stores it: per tissue, one row per shell
(b0 row first) of zonal SH coefficients ``r_{s,l}`` (``m = 0``, orders
``l = 0, 2, ...``) of the signal of a single fibre along z. Zonal harmonics are
the same in DIPY's non-legacy ``descoteaux07`` and MRtrix3's ``tournier07``
bases, so MRtrix3 files are read and written as is.

Conventions (identical to MRtrix3 and to DIPY's MSMT-CSD):

- A delta fODF of unit integral along ``u`` (even SH coefficients
  ``Y_lm(u)``) predicts exactly the response signal rotated onto ``u``.
- An isotropic tissue has one coefficient, its fODF's ``l = 0`` SH
  coefficient ``c``; its response row holds ``r_{s,0} = S0 exp(-b D) sqrt(4 pi)``
  and it predicts the signal ``c r_{s,0}``. The tissue's signal fraction is its
  fODF integral ``c sqrt(4 pi)`` when the response is :meth:`normalized`.
- DIPY's ``MultiShellResponse.response`` has the same rows (b0 first) and
  holds the same numbers in the columns ``[csf, gm, wm_l0, wm_l2, ...]``
  (see :meth:`TissueResponse.to_dipy`).
"""

import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from dipy.core.gradients import gradient_table, unique_bvals_tolerance
from dipy.reconst.csdeconv import auto_response_ssst
from dipy.reconst.dti import TensorModel, eig_from_lo_tri, ols_fit_tensor
from dipy.reconst.mcsd import (MultiShellResponse, mask_for_response_msmt,
                               response_from_mask_msmt)
from dipy.reconst.shm import real_sh_descoteaux_from_index
from scipy.special import i0e

from esdmri.atomic import output_transaction, staged_output
from esdmri.shm import (DEFAULT_BVAL_TOLERANCE, b0_mask, count_weighted_axes,
                        count_weighted_shells, group_shells, n_coeffs, sh_degrees, sh_matrix)
from esdmri.threads import run_chunks

TISSUES = ("wm", "gm", "csf")
ISOTROPIC_TISSUES = ("gm", "csf")

# The first response row is the b0 row; like DIPY's default b0_threshold,
# b-values up to 50 s/mm^2 count as b0.
B0_MAX_BVAL = 50.0

# Gauss-Legendre nodes in cos(theta) for the zonal projection. The azimuthally
# averaged tensor signal is an entire function of cos(theta); 256 nodes
# integrate it to machine precision for b D up to several tens.
_QUADRATURE_NODES = 256

# Voxels per chunk of the response's tensor fit (_tensor_fit): about 14 chunks at
# brain size, so that two threads share them evenly.
_TENSOR_CHUNK = 16384

_SHELLS_HEADER = re.compile(r"^#\s*shells\s*:\s*(.*)$", re.IGNORECASE)

# Which tissues to keep when a gtab has too few shells to separate them all:
# WM always, then CSF (the classic two-tissue single-shell model), then GM.
_KEEP_PRIORITY = ("wm", "csf", "gm")


def tensor_zonal_coefficients(bvals, evals, s0=1.0, sh_order_max=8):
    """Zonal SH coefficients of a tensor signal ``s0 exp(-b g^T D g)``.

    ``D`` has its first eigenvector along z. Each coefficient is the exact
    projection ``r_l = 2 pi int_{-1}^{1} S_bar(t) Y_l0(t) dt`` onto the zonal
    harmonic ``Y_l0`` (from DIPY), where ``S_bar`` is the signal averaged over
    the azimuth about z: ``exp(-b (evals[0] t^2 + (1 - t^2) (evals[1] +
    evals[2]) / 2)) I0(b (1 - t^2) |evals[1] - evals[2]| / 2)``. For an axially
    symmetric tensor ``S_bar`` is the signal itself. The integral is computed
    by Gauss-Legendre quadrature in ``t = cos(theta)``, which is exact up to
    rounding for this smooth integrand, unlike a least-squares fit on a
    finite sphere, where the truncated orders above ``sh_order_max`` alias
    into the kept ones.

    Parameters
    ----------
    bvals : ndarray (S,)
        b-values (s/mm^2).
    evals : ndarray (3,) or (S, 3)
        Tensor eigenvalues (mm^2/s), first along the fibre axis; one row per
        b-value for per-shell tensors.
    s0 : float or ndarray (S,), optional
        Signal without diffusion weighting.
    sh_order_max : int, optional
        Even maximal SH order (l).

    Returns
    -------
    ndarray (S, sh_order_max / 2 + 1)
        ``r_{s,l}`` for ``l = 0, 2, ..., sh_order_max``.
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    if bvals.ndim != 1:
        raise ValueError(f"bvals must have shape (S,), got {bvals.shape}")
    evals = np.broadcast_to(np.asarray(evals, dtype=np.float64), bvals.shape + (3,))
    s0 = np.broadcast_to(np.asarray(s0, dtype=np.float64), bvals.shape)
    l_values = np.unique(sh_degrees(sh_order_max))
    nodes, weights = np.polynomial.legendre.leggauss(_QUADRATURE_NODES)
    zonal = real_sh_descoteaux_from_index(0, l_values[None, :], np.arccos(nodes)[:, None],
                                          0.0, legacy=False)
    sin2 = 1.0 - nodes**2
    b = bvals[:, None]
    parallel, perp_a, perp_b = (evals[:, i, None] for i in range(3))
    half_gap = 0.5 * np.abs(perp_a - perp_b)
    # I0(x) = i0e(x) exp(x): the exp(x) is folded into the exponent so that
    # nothing overflows at large b.
    exponent = -b * (parallel * nodes**2 + sin2 * np.minimum(perp_a, perp_b))
    averaged = s0[:, None] * np.exp(exponent) * i0e(b * sin2 * half_gap)
    return 2.0 * np.pi * (averaged * weights) @ zonal


def _isotropic_zonal(bvals, diffusivity, s0):
    """``l = 0`` coefficient of ``s0 exp(-b D)``: the constant times sqrt(4 pi)."""
    return (s0 * np.exp(-np.asarray(bvals, dtype=np.float64) * diffusivity)
            * np.sqrt(4 * np.pi))[:, None]


def _as_paths(files, n_tissues, name="files"):
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [os.fspath(f) for f in files]
    if len(files) != n_tissues:
        raise ValueError(f"{name} must hold one path per tissue ({n_tissues}), "
                         f"got {len(files)}")
    return files


def _format_bval(bval):
    return str(int(bval)) if float(bval).is_integer() else repr(float(bval))


def _read_mrtrix_matrix(path):
    """Rows and the ``# Shells:`` header (or None) of one MRtrix3 text file."""
    rows, shells = [], None
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                header = _SHELLS_HEADER.match(line)
                if header:
                    try:
                        shells = [float(b) for b in re.split(r"[,\s]+", header.group(1).strip())]
                    except ValueError:
                        raise ValueError(f"{path}, line {number}: cannot read the shell "
                                         f"b-values in {line!r}") from None
                continue
            try:
                rows.append([float(value) for value in line.split()])
            except ValueError:
                raise ValueError(f"{path}, line {number}: expected numbers separated by "
                                 f"whitespace, got {line!r}") from None
    if not rows:
        raise ValueError(f"{path} holds no response rows")
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise ValueError(f"{path} has ragged rows: every shell row must have the same "
                         f"number of coefficients, found row lengths {lengths}")
    return np.array(rows), shells


def _csf_mask(gtab, data, roi_center, roi_radii, csf_fa_thr, csf_md_thr):
    """CSF response voxels: low FA and mean diffusivity *above* ``csf_md_thr``.

    DIPY 1.12's ``mask_for_response_msmt`` keeps CSF voxels with MD *below*
    ``csf_md_thr``, which selects grey matter (on the esdmri phantom its "CSF"
    voxels are pure GM and the CSF b1000/b0 ratio comes out 0.44 instead of
    0.05). The ROI is DIPY's: with a WM FA threshold of -1 its WM mask is the
    whole ROI. The tensor is fitted on b0 and the lowest shell only: at high b
    the CSF signal sinks into the noise floor and the fitted MD collapses
    (0.75e-3 instead of 3e-3 mm^2/s on the phantom at SNR 30).
    """
    roi = mask_for_response_msmt(gtab, data, roi_center=roi_center, roi_radii=roi_radii,
                                 wm_fa_thr=-1)[0].astype(bool)
    shell_bvals, shell_index = group_shells(gtab)
    low = shell_index <= 1
    low_gtab = gradient_table(gtab.bvals[low], bvecs=gtab.bvecs[low],
                              b0_threshold=gtab.b0_threshold)
    tensor = TensorModel(low_gtab).fit(data[..., low], mask=roi)
    fa, md = np.nan_to_num(tensor.fa), np.nan_to_num(tensor.md)
    return (roi & (fa < csf_fa_thr) & (md > csf_md_thr)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class TissueResponse:
    """Zonal response functions per tissue and shell (MRtrix3 layout).

    Immutable: the arrays are read-only and attributes cannot be reassigned.

    Parameters
    ----------
    tissues : sequence of str
        Tissue names among ``("wm", "gm", "csf")``, no repeats.
    bvals : ndarray (S,)
        Shell b-values, strictly ascending; the first row is the b0 row
        (``bvals[0] <= 50``).
    coefficients : sequence of ndarray
        One ``(S, L_t / 2 + 1)`` array per tissue of zonal SH coefficients
        ``r_{s,l}``, ``l = 0, 2, ..., L_t``; isotropic tissues (gm, csf) have
        one column.
    """

    tissues: tuple
    bvals: np.ndarray
    coefficients: tuple

    def __post_init__(self):
        if isinstance(self.tissues, str):
            raise TypeError(f"tissues must be a sequence of names, got the string "
                            f"{self.tissues!r}; use ({self.tissues!r},)")
        tissues = tuple(self.tissues)
        unknown = [t for t in tissues if t not in TISSUES]
        if unknown or not tissues:
            raise ValueError(f"tissues must be names among {TISSUES}, got {tissues}")
        if len(set(tissues)) != len(tissues):
            raise ValueError(f"tissues must not repeat, got {tissues}")

        bvals = np.array(self.bvals, dtype=np.float64)
        if bvals.ndim != 1 or bvals.size == 0 or not np.all(np.isfinite(bvals)):
            raise ValueError(f"bvals must be a non-empty finite (S,) array, got {self.bvals!r}")
        if np.any(np.diff(bvals) <= 0):
            raise ValueError(f"bvals must be strictly ascending, got {bvals}")
        if not 0 <= bvals[0] <= B0_MAX_BVAL:
            raise ValueError(f"bvals[0] must be the b0 row (0 <= b <= {B0_MAX_BVAL:g}), "
                             f"got bvals {bvals}")

        coefficients = self.coefficients
        if isinstance(coefficients, dict):
            raise TypeError("coefficients must be a sequence of arrays in the order of "
                            "tissues, got a dict")
        if isinstance(coefficients, np.ndarray) and coefficients.ndim != 3:
            coefficients = [coefficients]
        if len(coefficients) != len(tissues):
            raise ValueError(f"coefficients must hold one array per tissue ({len(tissues)}), "
                             f"got {len(coefficients)}")
        checked = []
        for tissue, array in zip(tissues, coefficients):
            try:
                array = np.array(array, dtype=np.float64)
            except ValueError:
                raise ValueError(f"coefficients of {tissue!r} are ragged: every shell row "
                                 f"must have the same number of coefficients") from None
            if array.ndim != 2 or array.shape[0] != len(bvals) or array.shape[1] < 1:
                raise ValueError(f"coefficients of {tissue!r} must have shape "
                                 f"({len(bvals)}, L/2 + 1) for {len(bvals)} shells, "
                                 f"got {array.shape}")
            if tissue in ISOTROPIC_TISSUES and array.shape[1] != 1:
                raise ValueError(f"coefficients of the isotropic tissue {tissue!r} must have "
                                 f"one column (l = 0), got {array.shape[1]}")
            if not np.all(np.isfinite(array)):
                raise ValueError(f"coefficients of {tissue!r} must be finite")
            array.setflags(write=False)
            checked.append(array)
        bvals.setflags(write=False)
        object.__setattr__(self, "tissues", tissues)
        object.__setattr__(self, "bvals", bvals)
        object.__setattr__(self, "coefficients", tuple(checked))

    def __repr__(self):
        orders = {t: 2 * (c.shape[1] - 1) for t, c in zip(self.tissues, self.coefficients)}
        return (f"TissueResponse(tissues={self.tissues}, bvals={self.bvals.tolist()}, "
                f"sh_orders={orders})")

    @property
    def sh_order_max(self):
        """Largest zonal order over the tissues (0 for isotropic ones only)."""
        return max(2 * (c.shape[1] - 1) for c in self.coefficients)

    @property
    def n_shells(self):
        """Number of shells, b0 row included."""
        return len(self.bvals)

    def __getitem__(self, tissue):
        """Coefficients (S, L_t / 2 + 1) of one tissue."""
        if tissue not in self.tissues:
            raise KeyError(f"tissue {tissue!r} not in {self.tissues}")
        return self.coefficients[self.tissues.index(tissue)]

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_tensors(cls, bvals, wm_evals=(1.7e-3, 0.3e-3, 0.3e-3), gm_diffusivity=0.8e-3,
                     csf_diffusivity=3.0e-3, s0=1.0, sh_order_max=12, tissues=TISSUES):
        """Analytic responses: a WM tensor and isotropic GM/CSF compartments.

        Parameters
        ----------
        bvals : ndarray (S,)
            Shell b-values, ascending, b0 first.
        wm_evals : ndarray (3,), optional
            WM tensor eigenvalues (mm^2/s), first along the fibre.
        gm_diffusivity, csf_diffusivity : float, optional
            Isotropic diffusivities (mm^2/s).
        s0 : float or dict, optional
            b0 signal of every tissue, or a dict tissue -> b0 signal.
        sh_order_max : int, optional
            Even order of the WM zonal coefficients.
        tissues : sequence of str, optional
            Tissues to include.

        Returns
        -------
        TissueResponse
        """
        if isinstance(tissues, str):
            tissues = (tissues,)
        tissues = tuple(tissues)
        s0_of = s0 if isinstance(s0, dict) else {t: s0 for t in tissues}
        missing = [t for t in tissues if t not in s0_of]
        if missing:
            raise ValueError(f"s0 has no entry for tissues {missing}")
        bvals = np.asarray(bvals, dtype=np.float64)
        diffusivity = {"gm": gm_diffusivity, "csf": csf_diffusivity}
        coefficients = []
        for tissue in tissues:
            if tissue == "wm":
                coefficients.append(tensor_zonal_coefficients(
                    bvals, wm_evals, s0_of[tissue], sh_order_max))
            elif tissue in diffusivity:
                coefficients.append(_isotropic_zonal(bvals, diffusivity[tissue], s0_of[tissue]))
            else:
                raise ValueError(f"tissues must be names among {TISSUES}, got {tissues}")
        return cls(tissues, bvals, coefficients)

    @classmethod
    def from_dipy_ssst(cls, gtab, data, roi_center=None, roi_radii=10, fa_thr=0.7,
                       sh_order_max=8, tolerance=DEFAULT_BVAL_TOLERANCE):
        """Single-shell WM response with DIPY's ``auto_response_ssst``.

        DIPY fits a tensor in the high-FA voxels of a central ROI and returns
        the averaged prolate eigenvalues and the mean b0 signal; the zonal
        coefficients of that tensor are computed with
        :func:`tensor_zonal_coefficients`.

        Parameters
        ----------
        gtab : GradientTable
            b0 volumes plus exactly one diffusion-weighted shell.
        data : ndarray (X, Y, Z, N)
        roi_center, roi_radii, fa_thr
            See ``dipy.reconst.csdeconv.auto_response_ssst``.
        sh_order_max : int, optional
            Even order of the zonal coefficients.
        tolerance : float, optional
            b-value clustering gap.

        Returns
        -------
        TissueResponse
            Tissues ``("wm",)``, rows (b0, shell).
        """
        shell_bvals, _ = group_shells(gtab, tolerance=tolerance)
        has_b0 = bool(b0_mask(gtab).any())
        if not has_b0 or len(shell_bvals) != 2:
            raise ValueError(
                "from_dipy_ssst needs b0 volumes and exactly one diffusion-weighted shell; "
                f"gtab has shells {np.round(shell_bvals).tolist()} (b0 present: {has_b0}); "
                "use from_dipy_msmt for multi-shell data")
        (evals, s0), _ = auto_response_ssst(gtab, data, roi_center=roi_center,
                                            roi_radii=roi_radii, fa_thr=fa_thr)
        evals = np.asarray(evals, dtype=np.float64)
        if evals.shape != (3,) or not np.all(np.isfinite(evals)) or not s0 > 0:
            raise ValueError(f"no voxel in the ROI has FA > fa_thr={fa_thr}: "
                             "increase roi_radii or lower fa_thr")
        bvals = np.array([0.0, shell_bvals[1]])
        coefficients = tensor_zonal_coefficients(bvals, evals, s0, sh_order_max)
        return cls(("wm",), bvals, [coefficients])

    @classmethod
    def from_dipy_msmt(cls, gtab, data, mask=None, roi_center=None, roi_radii=10,
                       wm_fa_thr=0.7, gm_fa_thr=0.2, csf_fa_thr=0.1, gm_md_thr=0.0007,
                       csf_md_thr=0.002, sh_order_max=8, tolerance=DEFAULT_BVAL_TOLERANCE,
                       tissues=TISSUES, drop_empty=False):
        """Multi-shell WM/GM/CSF responses with DIPY's MSMT tools.

        Tissue masks come from DIPY's ``mask_for_response_msmt`` (FA/MD
        thresholds in a central ROI, intersected with ``mask``); DIPY's
        ``response_from_mask_msmt`` fits per shell a tensor to each tissue.
        WM rows are the zonal coefficients of the per-shell tensor, exactly
        as DIPY's ``multi_shell_fiber_response`` (up to its least-squares
        approximation of the projection). GM/CSF rows are the ``l = 0``
        coefficient of the per-shell tensor's signal, i.e. its spherical mean
        times sqrt(4 pi); DIPY uses ``S0 exp(-b lambda_1)`` with the largest
        eigenvalue instead. Both agree for isotropic tensors; otherwise
        DIPY's value is the smaller one (Jensen's inequality).

        Parameters
        ----------
        gtab : GradientTable
            b0 volumes plus one or more diffusion-weighted shells.
        data : ndarray (X, Y, Z, N)
        mask : ndarray (X, Y, Z) bool, optional
            Voxels allowed in the tissue masks (e.g. a brain mask).
        roi_center, roi_radii, wm_fa_thr, gm_fa_thr, csf_fa_thr, gm_md_thr, csf_md_thr
            See ``dipy.reconst.mcsd.mask_for_response_msmt``.
        sh_order_max : int, optional
            Even order of the WM zonal coefficients.
        tolerance : float, optional
            b-value clustering gap (DIPY's ``tol``).
        tissues : sequence of str, optional
            Tissues to estimate, a subset of ``("wm", "gm", "csf")`` with WM;
            only these need response voxels (e.g. ``("wm",)`` for a
            strands-only phantom).
        drop_empty : bool, optional
            Leave out, with a warning, the isotropic tissues of ``tissues``
            that have no response voxels instead of raising (WM is always
            required).

        Returns
        -------
        TissueResponse
            The requested tissues, in ``("wm", "gm", "csf")`` order.
        """
        if isinstance(tissues, str) or "wm" not in tissues or not set(tissues) <= set(TISSUES):
            raise ValueError(f"tissues must be a subset of {TISSUES} containing 'wm', "
                             f"got {tissues!r}")
        data = np.asarray(data)
        if data.ndim != 4:
            raise ValueError(f"data must have shape (X, Y, Z, N), got {data.shape}")
        shell_bvals, _ = group_shells(gtab, tolerance=tolerance)
        dipy_bvals = unique_bvals_tolerance(np.asarray(gtab.bvals), tol=tolerance)
        if not b0_mask(gtab).any() or len(dipy_bvals) != len(shell_bvals):
            raise ValueError(
                "from_dipy_msmt needs b0 volumes and shells that DIPY's clustering "
                f"(tol={tolerance}) also finds; shells {np.round(shell_bvals).tolist()}, "
                f"DIPY clusters {np.round(dipy_bvals).tolist()}")
        wm_mask, gm_mask, _ = mask_for_response_msmt(
            gtab, data, roi_center=roi_center, roi_radii=roi_radii, wm_fa_thr=wm_fa_thr,
            gm_fa_thr=gm_fa_thr, csf_fa_thr=csf_fa_thr, gm_md_thr=gm_md_thr,
            csf_md_thr=csf_md_thr)
        masks = [wm_mask, gm_mask, _csf_mask(gtab, data, roi_center, roi_radii, csf_fa_thr,
                                             csf_md_thr)]
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != data.shape[:3]:
                raise ValueError(f"mask must have shape {data.shape[:3]}, got {mask.shape}")
            masks = [tissue_mask * mask for tissue_mask in masks]
        empty = [t for t, m in zip(TISSUES, masks) if t in tissues and not np.any(m)]
        if empty and (not drop_empty or "wm" in empty):
            raise ValueError(f"no response voxels found for tissues {empty}: enlarge "
                             "roi_radii or relax the FA/MD thresholds")
        kept = tuple(t for t in TISSUES if t in tissues and t not in empty)
        if empty:
            warnings.warn(f"no response voxels found for tissues {empty}; estimating {kept} "
                          "only", UserWarning, stacklevel=2)
        # DIPY fits all three tissues at once; a tissue left out borrows the
        # WM voxels and its rows are dropped.
        masks = [m if t in kept else masks[0] for t, m in zip(TISSUES, masks)]
        tensors = response_from_mask_msmt(gtab, data, *masks, tol=tolerance)
        bvals = np.concatenate([[0.0], shell_bvals[1:]])
        coefficients = []
        for tissue, per_shell in zip(TISSUES, tensors):
            if tissue not in kept:
                continue
            evals, s0 = per_shell[:, :3], per_shell[:, 3]
            # DIPY's b0 map is shared by all shells, so s0 is equal across them.
            rows = tensor_zonal_coefficients(
                bvals, np.vstack([evals[:1], evals]), np.concatenate([s0[:1], s0]),
                sh_order_max if tissue == "wm" else 0)
            coefficients.append(rows)
        return cls(kept, bvals, coefficients)

    @classmethod
    def from_mrtrix(cls, files, tissues, bvals=None, tolerance=DEFAULT_BVAL_TOLERANCE):
        """Read MRtrix3 response text files (one row per shell).

        Parameters
        ----------
        files : path or sequence of paths
            One file per tissue.
        tissues : str or sequence of str
            Tissue of each file.
        bvals : ndarray (S,), optional
            Shell b-values; needed when the files have no ``# Shells:``
            header, checked against the header otherwise.
        tolerance : float, optional
            Allowed difference between ``bvals`` and the header.

        Returns
        -------
        TissueResponse
        """
        if isinstance(tissues, str):
            tissues = (tissues,)
        tissues = tuple(tissues)
        files = _as_paths(files, len(tissues))
        matrices, headers = [], {}
        for path in files:
            matrix, shells = _read_mrtrix_matrix(path)
            matrices.append(matrix)
            if shells is not None:
                headers[path] = np.array(shells)
        header_values = list(headers.values())
        for path, shells in headers.items():
            if shells.shape != header_values[0].shape or not np.allclose(
                    shells, header_values[0], rtol=0, atol=tolerance):
                raise ValueError(f"the '# Shells:' headers disagree: {path} has "
                                 f"{shells.tolist()}, {next(iter(headers))} has "
                                 f"{header_values[0].tolist()}")
        if bvals is None:
            if not headers:
                raise ValueError(f"{files} have no '# Shells:' header: pass bvals")
            bvals = header_values[0]
        else:
            bvals = np.asarray(bvals, dtype=np.float64)
            if header_values and (bvals.shape != header_values[0].shape or not np.allclose(
                    bvals, header_values[0], rtol=0, atol=tolerance)):
                raise ValueError(f"bvals {bvals.tolist()} disagree with the '# Shells:' "
                                 f"header {header_values[0].tolist()} of {next(iter(headers))}")
        for path, matrix in zip(files, matrices):
            if len(matrix) != len(bvals):
                raise ValueError(f"{path} has {len(matrix)} rows but there are {len(bvals)} "
                                 f"shells {np.asarray(bvals).tolist()}; the first row must be "
                                 "the b0 row")
        return cls(tissues, bvals, matrices)

    @classmethod
    def from_dict(cls, saved):
        """The response stored by :meth:`to_dict`.

        Parameters
        ----------
        saved : dict
            With the keys ``"tissues"`` (list of str), ``"bvals"`` (list of
            S floats) and ``"coefficients"`` (one ``S x (L_t / 2 + 1)``
            nested list per tissue).

        Returns
        -------
        TissueResponse
        """
        if not isinstance(saved, dict):
            raise TypeError(f"saved must be a dict from TissueResponse.to_dict, got "
                            f"{type(saved).__name__}")
        missing = [key for key in ("tissues", "bvals", "coefficients") if key not in saved]
        if missing:
            raise ValueError(f"saved has no {missing}: expected the keys 'tissues', 'bvals' "
                             "and 'coefficients' of TissueResponse.to_dict")
        return cls(tuple(saved["tissues"]), np.asarray(saved["bvals"]),
                   tuple(np.asarray(array) for array in saved["coefficients"]))

    @classmethod
    def average(cls, responses, weights=None):
        """Weighted mean of responses of the same tissues and shells.

        Coefficients and b-values are averaged row by row. Responses of scans
        with different intensity scales should be :meth:`normalized` first,
        so that each scan weighs as its weight says (the group response of
        :func:`esdmri.reconst.train_group`). The WM coefficients are truncated
        to the lowest zonal order among the responses.

        Parameters
        ----------
        responses : sequence of TissueResponse
            The same tissues in the same order, and the same number of shells
            whose b-values lie within ``DEFAULT_BVAL_TOLERANCE`` (20 s/mm^2,
            the clustering gap of the shells) of their mean.
        weights : sequence of float (R,), optional
            Non-negative weight of each response, not all zero (default:
            equal weights).

        Returns
        -------
        TissueResponse
        """
        if isinstance(responses, TissueResponse):
            raise TypeError("responses must be a sequence of TissueResponse, got one "
                            "TissueResponse")
        responses = list(responses)
        if not responses:
            raise ValueError("responses is empty: nothing to average")
        wrong = [type(r).__name__ for r in responses if not isinstance(r, TissueResponse)]
        if wrong:
            raise TypeError(f"responses must hold TissueResponse objects, got {wrong}")
        first = responses[0]
        for index, other in enumerate(responses[1:], start=1):
            if other.tissues != first.tissues or len(other.bvals) != len(first.bvals):
                raise ValueError(f"responses[{index}] has tissues {other.tissues} and shells "
                                 f"{other.bvals.tolist()} but responses[0] has "
                                 f"{first.tissues} and {first.bvals.tolist()}: cannot "
                                 "average them")
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (len(responses),) or not np.all(np.isfinite(weights)) \
                    or np.any(weights < 0) or not weights.sum() > 0:
                raise ValueError(f"weights must be {len(responses)} finite non-negative "
                                 f"values, not all zero, got {weights.tolist()}")
        bvals = np.average([r.bvals for r in responses], axis=0, weights=weights)
        for index, other in enumerate(responses):
            gap = np.max(np.abs(other.bvals - bvals))
            if gap > DEFAULT_BVAL_TOLERANCE:
                raise ValueError(f"responses[{index}] has shells {other.bvals.tolist()}, "
                                 f"{gap:g} s/mm^2 from the mean shells "
                                 f"{np.round(bvals, 1).tolist()} (more than "
                                 f"{DEFAULT_BVAL_TOLERANCE}): cannot average them")
        coefficients = []
        for t in range(len(first.tissues)):
            width = min(r.coefficients[t].shape[1] for r in responses)
            coefficients.append(np.average([r.coefficients[t][:, :width] for r in responses],
                                           axis=0, weights=weights))
        return cls(first.tissues, bvals, coefficients)

    # ------------------------------------------------------------------ export

    def to_dict(self):
        """The response as a dict of lists, for JSON and model files.

        Floats are written as Python floats, so :meth:`from_dict` restores
        the response exactly.

        Returns
        -------
        dict
            ``{"tissues": [...], "bvals": [...], "coefficients": [...]}``,
            one nested list ``S x (L_t / 2 + 1)`` per tissue.
        """
        return {"tissues": list(self.tissues), "bvals": self.bvals.tolist(),
                "coefficients": [array.tolist() for array in self.coefficients]}

    def to_mrtrix(self, files, force=False):
        """Write one MRtrix3 response text file per tissue.

        Each file starts with ``# Shells: b0,b1,...`` like MRtrix3 writes it,
        then one whitespace-separated row per shell. Values are written at
        full (round-trip) precision.

        Parameters
        ----------
        files : path or sequence of paths
            One path per tissue, in the order of ``tissues``.
        force : bool, optional
            Overwrite existing files; otherwise ``FileExistsError`` and
            nothing is written.

        Notes
        -----
        The files are written atomically and together
        (:func:`esdmri.atomic.output_transaction`): an interrupted call leaves
        none of them, and no partial file under a target name.
        """
        files = _as_paths(files, len(self.tissues))
        if not force:
            existing = [path for path in files if os.path.exists(path)]
            if existing:
                raise FileExistsError(f"refusing to overwrite {existing}: pass force=True")
        header = "# Shells: " + ",".join(_format_bval(b) for b in self.bvals) + "\n"
        with output_transaction():
            for path, array in zip(files, self.coefficients):
                rows = (" ".join(repr(float(value)) for value in row) for row in array)
                with staged_output(path) as temporary, open(temporary, "w") as handle:
                    handle.write(header + "\n".join(rows) + "\n")

    def to_dipy(self, sh_order_max=None):
        """The same response as DIPY's ``MultiShellResponse`` (for MSMT-CSD).

        DIPY's ``response`` has one row per shell (b0 first) and the columns
        ``[csf, gm, wm_l0, wm_l2, ...]`` (isotropic tissues that are present,
        CSF first), holding exactly this object's coefficients; ``S0`` is the
        b0 signal per tissue in the same order.

        Parameters
        ----------
        sh_order_max : int, optional
            WM zonal order (zero padded or truncated); default the WM order.

        Returns
        -------
        dipy.reconst.mcsd.MultiShellResponse
        """
        isotropic = [t for t in ("csf", "gm") if t in self.tissues]
        if "wm" not in self.tissues or not isotropic:
            raise ValueError(f"to_dipy needs 'wm' and at least one isotropic tissue, "
                             f"got {self.tissues}")
        if sh_order_max is None:
            sh_order_max = 2 * (self["wm"].shape[1] - 1)
        columns = [self[t] for t in isotropic] + [self._zonal_padded("wm", sh_order_max)]
        s0 = [self[t][0, 0] / np.sqrt(4 * np.pi) for t in isotropic + ["wm"]]
        return MultiShellResponse(np.hstack(columns), sh_order_max, self.bvals.copy(), S0=s0)

    # ------------------------------------------------------------------ checks

    def select_tissues(self, tissues):
        """The response restricted to ``tissues`` (in that order).

        Parameters
        ----------
        tissues : str or sequence of str

        Returns
        -------
        TissueResponse
        """
        if isinstance(tissues, str):
            tissues = (tissues,)
        missing = [t for t in tissues if t not in self.tissues]
        if missing:
            raise ValueError(f"tissues {missing} are not in this response {self.tissues}")
        return TissueResponse(tuple(tissues), self.bvals, [self[t] for t in tissues])

    def at_bvals(self, bvals):
        """The response at other b-values, linear in b between its rows.

        Used for the virtual shells of a non-shelled scan
        (:class:`esdmri.shm.ShellInterpolator`), whose b-values lie between
        the rows of a response estimated at every b-value cluster. Rows that
        match (within 1e-6) are copied exactly.

        Parameters
        ----------
        bvals : ndarray (S',)
            Ascending, b0 first, within ``[0, max(self.bvals)]``.

        Returns
        -------
        TissueResponse
        """
        bvals = np.asarray(bvals, dtype=np.float64)
        if bvals.ndim != 1 or bvals.size == 0:
            raise ValueError(f"bvals must be a non-empty (S,) array, got {bvals!r}")
        if bvals.max() > self.bvals[-1] + DEFAULT_BVAL_TOLERANCE:
            raise ValueError(f"bvals up to {bvals.max():g} are beyond this response's last "
                             f"shell b={self.bvals[-1]:g}: it cannot be extrapolated")
        coefficients = [np.stack([np.interp(bvals, self.bvals, column) for column in array.T],
                                 axis=1) for array in self.coefficients]
        return TissueResponse(self.tissues, bvals, coefficients)

    def normalized(self):
        """Each tissue divided by its own b0 signal ``r_{b0,0} / sqrt(4 pi)``.

        Afterwards every tissue's b0 row starts with ``sqrt(4 pi)``, so a
        tissue whose fODF integrates to ``f`` (``l = 0`` coefficient
        ``f / sqrt(4 pi)``) contributes the b0-normalised signal ``f``.

        Returns
        -------
        TissueResponse
        """
        scaled = []
        for tissue, array in zip(self.tissues, self.coefficients):
            b0_signal = array[0, 0] / np.sqrt(4 * np.pi)
            if not b0_signal > 0:
                raise ValueError(f"tissue {tissue!r} has a non-positive b0 signal "
                                 f"({b0_signal:g}); cannot normalise")
            scaled.append(array / b0_signal)
        return TissueResponse(self.tissues, self.bvals, scaled)

    def _gtab_shells(self, gtab, b0_threshold, tolerance):
        """gtab shells and, per gtab shell, the matching response row."""
        shell_bvals, shell_index = group_shells(gtab, b0_threshold, tolerance)
        has_b0 = bool(b0_mask(gtab, b0_threshold).any())
        weighted = shell_bvals[1:] if has_b0 else shell_bvals
        ours = self.bvals[1:]
        if len(weighted) != len(ours) or not np.all(np.abs(weighted - ours) <= tolerance):
            raise ValueError(
                f"response shells {np.round(self.bvals, 1).tolist()} do not match the gtab "
                f"shells {np.round(shell_bvals, 1).tolist()} (diffusion-weighted shells must "
                f"agree within tolerance={tolerance})")
        rows = np.arange(len(shell_bvals)) + (0 if has_b0 else 1)
        return shell_bvals, shell_index, has_b0, rows

    def validate(self, gtab, b0_threshold=None, tolerance=DEFAULT_BVAL_TOLERANCE):
        """Check that this response fits an acquisition.

        The diffusion-weighted shells must match the gtab's (same number,
        b-values within ``tolerance``), and the gtab must have at least as
        many distinct shells (b0 included) as there are tissues, since
        multi-tissue deconvolution separates tissues by their b-value
        dependence; but b0 and one shell at b <= 1500 with 30 axes or more
        (:func:`low_shell`) may hold all three, whose
        missing equation the default fit's charges on the isotropic
        fractions stand for (:func:`estimate_response`).

        Parameters
        ----------
        gtab : GradientTable
        b0_threshold, tolerance : float, optional
            Shell grouping, see :func:`esdmri.shm.group_shells`.

        Raises
        ------
        ValueError
            Describing the mismatch.
        """
        shell_bvals, _, _, _ = self._gtab_shells(gtab, b0_threshold, tolerance)
        # b0 and one shell at b <= 1500 hold all three, one equation short: the models'
        # default fit charges the isotropic fractions there.
        allowed = (len(TISSUES) if len(shell_bvals) == 2 and low_shell(gtab)
                   else len(shell_bvals))
        if len(self.tissues) > allowed:
            keep = [t for t in _KEEP_PRIORITY if t in self.tissues][:len(shell_bvals)]
            drop = [t for t in self.tissues if t not in keep]
            raise ValueError(
                f"{len(self.tissues)} tissues {self.tissues} need at least "
                f"{len(self.tissues)} distinct shells (b0 included), but the gtab has "
                f"{len(shell_bvals)}: {np.round(shell_bvals, 1).tolist()}; drop {drop}, "
                f"e.g. response.select_tissues({tuple(keep)})")

    def _zonal_padded(self, tissue, sh_order_max):
        """(S, sh_order_max / 2 + 1) zonal coefficients, zero beyond the response order."""
        array = self[tissue]
        padded = np.zeros((len(self.bvals), sh_order_max // 2 + 1))
        kept = min(padded.shape[1], array.shape[1])
        padded[:, :kept] = array[:, :kept]
        return padded

    def forward_matrices(self, gtab, sh_order_max, b0_threshold=None,
                         tolerance=DEFAULT_BVAL_TOLERANCE):
        """Linear forward model: per-tissue matrices from fODF SH to the signal.

        For a diffusion-weighted volume n of shell s and direction g_n,
        ``A_wm[lm, n] = sqrt(4 pi / (2l + 1)) r_{wm,s,l} Y_lm(g_n)`` (the fODF
        convolved with the shell's zonal response, evaluated at g_n); b0
        volumes have no direction and use only the ``l = 0`` term of the b0
        row, like DIPY's MSMT-CSD. Isotropic tissues: ``A_t[0, n] =
        r_{t,s,0}``. Zonal coefficients beyond the response's order are zero.

        Parameters
        ----------
        gtab : GradientTable
            Acquisition; validated with :meth:`validate`.
        sh_order_max : int
            Even SH order of the WM fODF.
        b0_threshold, tolerance : float, optional
            Shell grouping, see :func:`esdmri.shm.group_shells`.

        Returns
        -------
        dict
            tissue -> ndarray (C_t, N) float64 with ``C_wm =
            n_coeffs(sh_order_max)`` and ``C_gm = C_csf = 1``; the predicted
            signal is ``sum_t coeffs_t @ A_t`` for coeffs_t (..., C_t).
        """
        n_wm = n_coeffs(sh_order_max)
        self.validate(gtab, b0_threshold, tolerance)
        _, shell_index, _, rows = self._gtab_shells(gtab, b0_threshold, tolerance)
        volume_rows = rows[shell_index]
        is_b0 = b0_mask(gtab, b0_threshold)
        matrices = {}
        for tissue in self.tissues:
            if tissue in ISOTROPIC_TISSUES:
                matrices[tissue] = self[tissue][volume_rows, 0][None, :].copy()
                continue
            basis = np.zeros((len(is_b0), n_wm))
            # Only Y_00 survives at b0: the b0 signal does not depend on direction.
            basis[is_b0, 0] = 1.0 / np.sqrt(4 * np.pi)
            weighted = ~is_b0
            basis[weighted] = sh_matrix(sh_order_max, np.asarray(gtab.bvecs)[weighted])
            l_values = sh_degrees(sh_order_max)
            zonal = self._zonal_padded(tissue, sh_order_max)[volume_rows][:, l_values // 2]
            matrices[tissue] = (np.sqrt(4 * np.pi / (2 * l_values + 1)) * zonal * basis).T
        return matrices


# ---------------------------------------------------------------------------
# The response estimator of esdmri (the Python API, the CLI and the benchmarks)

# At most this many voxels per tissue, like MRtrix3's ``dwi2response fa``
# (300 single-fibre voxels); small scans use RESPONSE_VOXEL_FRACTION of the
# mask instead, so that a 10^3 ROI does not take its 300 most anisotropic
# voxels (FA down to 0.4 on DIPY's small_64D) as single-fibre WM.
RESPONSE_VOXELS_MAX = 300
RESPONSE_VOXEL_FRACTION = 0.02
RESPONSE_VOXELS_MIN = 5

# The diffusion tensor that ranks the voxels is fitted on b0 and b-values up
# to this (the b-range where the tensor model holds); a scan whose lowest
# shell is higher uses its lowest shell.
TENSOR_MAX_BVAL = 1500.0

# Free water diffuses at 3.0e-3 mm^2/s at body temperature and no brain
# tissue (neonatal white matter included, about 1.5e-3) comes near 2e-3, so
# a voxel above it holds CSF. This is a physical bound, not an anatomical one.
CSF_MIN_MD = 2.0e-3

# Isotropic tissue: DIPY's gm_fa_thr (``mask_for_response_msmt``).
ISOTROPIC_MAX_FA = 0.2

# Single-fibre selection: candidates are the most anisotropic voxels (twice
# the number kept); the kept ones are those the current WM response explains
# best, re-estimated this many times (the rounds of DIPY's recursive_response
# and MRtrix3's tournier algorithm, with the fit residual as the criterion).
_CANDIDATE_FACTOR = 2
_SELECTION_ROUNDS = 3


def single_shell(gtab):
    """The b-values and distinct axes of a gtab's one diffusion-weighted shell.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    shell : tuple (ndarray, int) or None
        The diffusion-weighted volumes' b-values and their number of distinct
        axes (:func:`esdmri.shm.count_weighted_axes`); None unless the gtab has
        exactly one diffusion-weighted shell (:func:`esdmri.shm.group_shells`).
    """
    if count_weighted_shells(gtab) != 1:
        return None
    return (np.asarray(gtab.bvals, dtype=float)[~np.asarray(gtab.b0s_mask, dtype=bool)],
            count_weighted_axes(gtab))


# The fewest distinct axes of one shell at b <= 1500 that take the three-tissue fit at
# SH order 12 (low_shell): the dev phantoms' 30 and 60 measured it, fewer were not.
LOW_SHELL_MIN_AXES = 30


def low_shell(gtab):
    """Whether a gtab is one shell at b <= 1500 with 30 distinct axes or more.

    There :func:`estimate_response` gives WM, GM and CSF by default, and the
    models fit them at SH order 12 with a stronger sparsity and charges on
    the isotropic fractions (:func:`esdmri.reconst.config.default_sh_order`,
    :func:`esdmri.reconst.config.default_sparsity`,
    :func:`esdmri.reconst.config.default_isotropic_charges`): on b0 and one
    such shell grey matter's isotropic signal and a WM fODF's mean are nearly
    the same column of the forward model.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    bool
    """
    shell = single_shell(gtab)
    return (shell is not None and float(np.max(shell[0])) <= TENSOR_MAX_BVAL
            and shell[1] >= LOW_SHELL_MIN_AXES)


def _low_b_volumes(gtab):
    """b0 volumes and those up to TENSOR_MAX_BVAL (or the lowest shell)."""
    bvals = np.asarray(gtab.bvals, dtype=np.float64)
    is_b0 = b0_mask(gtab)
    limit = max(TENSOR_MAX_BVAL, bvals[~is_b0].min() + DEFAULT_BVAL_TOLERANCE)
    return is_b0 | (bvals <= limit)


def _subset(gtab, volumes):
    return gradient_table(np.asarray(gtab.bvals)[volumes],
                          bvecs=np.asarray(gtab.bvecs)[volumes],
                          b0_threshold=gtab.b0_threshold)


def _wls_normal_equations(design_matrix, data, return_S0_hat=False):
    """DIPY's weighted least-squares tensor estimate, solved by normal equations.

    A ``fit_method`` for DIPY's ``TensorModel`` (which clips the signal and
    builds the fit); the S0 is not estimated (``return_S0_hat`` must be False).
    The estimate is DIPY's ``wls_fit_tensor``'s [1]_: the log-signal fitted
    with weights equal to the squared signal that DIPY's OLS fit predicts. DIPY
    solves each voxel's weighted design by a pseudo-inverse (an SVD per voxel:
    1.7 of the 2.4 s of the response's tensor fit on the brain-size phantom);
    the 7 x 7 normal equations of all voxels come from two matrix products, and
    give the same values to round-off (FA within 4e-11) seven times faster.
    The log is taken in the data's precision, as DIPY does.

    Parameters
    ----------
    design_matrix : ndarray (N, 7)
        DIPY's tensor design matrix.
    data : ndarray (V, N)
        Positive signal of ``V`` voxels.
    return_S0_hat : bool
        Passed by ``TensorModel.fit``; must be False.

    Returns
    -------
    params : ndarray (V, 12)
        Eigenvalues and eigenvectors, DIPY's layout.
    extra : None

    References
    ----------
    .. [1] Chung, S., Lu, Y., Henry, R. G. (2006). Comparison of bootstrap
       approaches for estimation of uncertainties of DTI parameters.
       NeuroImage 33, 531-541.
    """
    if return_S0_hat:
        raise ValueError("_wls_normal_equations does not estimate the S0")
    log_signal = np.log(data)
    ols, _ = ols_fit_tensor(design_matrix, data, return_lower_triangular=True)
    weights = np.exp(2.0 * (ols @ design_matrix.T))
    n_params = design_matrix.shape[1]
    # Each voxel's X^T W X is its weights times the outer products of the
    # design's rows: one matrix product for every voxel.
    outer = (design_matrix[:, :, None] * design_matrix[:, None, :]).reshape(
        len(design_matrix), -1)
    gram = (weights @ outer).reshape(-1, n_params, n_params)
    rhs = (weights * log_signal) @ design_matrix
    lower_triangular = np.linalg.solve(gram, rhs[..., None])[..., 0]
    # DIPY's floor on the eigenvalues (wls_fit_tensor's tol / -design_matrix.min()).
    return eig_from_lo_tri(lower_triangular, min_diffusivity=1e-6 / -design_matrix.min()), None


def _tensor_fit(gtab, data, mask):
    """FA, MD and principal eigenvectors from a tensor fitted at low b.

    DIPY's weighted least-squares estimate of the masked voxels
    (:func:`_wls_normal_equations`), in chunks of ``_TENSOR_CHUNK`` voxels on
    torch's threads (:func:`esdmri.threads.run_chunks`; numpy's products and
    solves release the GIL). The chunks' bounds do not depend on the thread
    count, so neither do the values (a chunk's round-off depends on its size:
    slabs of the volume, one per thread, made the response move with the
    thread count, docs/benchmarks.md). They differ from DIPY's own WLS fit of
    the whole volume by round-off (FA 4e-11 on the brain-size phantom).
    """
    low = _low_b_volumes(gtab)
    model = TensorModel(_subset(gtab, low), fit_method=_wls_normal_equations)
    inside = np.flatnonzero(mask)
    fa, md = np.zeros(mask.size), np.zeros(mask.size)
    evecs = np.zeros((mask.size, 3))

    def fit(part):
        chunk = inside[part]
        # Each chunk's voxels gathered on their own (data read from NIfTI is
        # Fortran-ordered: a flat view of it would copy the whole volume).
        tensor = model.fit(data[np.unravel_index(chunk, mask.shape)][:, low])
        fa[chunk], md[chunk], evecs[chunk] = tensor.fa, tensor.md, tensor.evecs[..., 0]

    # One filter for every thread (catch_warnings swaps the process's filters, so it
    # must not be entered by the workers): DIPY's DTI fit warns about b-values above
    # 1200 when the lowest shell is higher; that is known here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_chunks(fit, len(inside), _TENSOR_CHUNK)
    return (np.nan_to_num(fa).reshape(mask.shape), np.nan_to_num(md).reshape(mask.shape),
            np.nan_to_num(evecs).reshape(mask.shape + (3,)))


def _n_response_voxels(n_mask):
    return int(min(RESPONSE_VOXELS_MAX,
                   max(RESPONSE_VOXELS_MIN, np.ceil(RESPONSE_VOXEL_FRACTION * n_mask))))


class _LogPolynomialProfile:
    """Signal of a tissue as a smooth function of b and of the fibre angle.

    ``log S(b, t) = c - b (d_0 + d_1 t^2) + b^2 (k_0 + k_1 t^2 + k_2 t^4)``
    with ``t`` the cosine between gradient and fibre axis: an axially
    symmetric diffusion tensor plus the axially symmetric kurtosis (second
    cumulant) terms, fitted by weighted least squares to the signals pooled
    over the tissue's voxels (weights ``S^2`` as in DIPY's WLS tensor fit, so
    the noise floor at high b weighs little). Pure tensors are reproduced
    exactly. Kurtosis terms are used only with two or more non-zero b-values
    (shells or not); isotropic tissues have no ``t`` terms.
    """

    def __init__(self, bvals, cosines, signal, anisotropic, kurtosis, rician=False):
        b = bvals.ravel()
        t2 = cosines.ravel()**2 if anisotropic else np.zeros_like(b)
        columns = [np.ones_like(b), -b]
        if anisotropic:
            columns.append(-b * t2)
        if kurtosis:
            columns.append(b**2)
            if anisotropic:
                columns += [b**2 * t2, b**2 * t2**2]
        design = np.stack(columns, axis=1)
        signal = signal.ravel()
        solution = _log_linear_fit(design, signal)
        self.anisotropic, self.kurtosis = anisotropic, kurtosis
        self.parameters = solution
        # The noise of the normalised signal, 0 where not modelled.
        self.sigma = 0.0
        if rician:
            self.parameters, self.sigma = _rician_fit(design, signal, solution)

    def __call__(self, bvals, cosines):
        """Signal at b-values ``(S, 1)`` and cosines ``(1, T)``."""
        p = iter(self.parameters)
        t2 = cosines**2
        log_signal = next(p) - bvals * next(p)
        if self.anisotropic:
            log_signal = log_signal - bvals * t2 * next(p)
        if self.kurtosis:
            log_signal = log_signal + bvals**2 * next(p)
            if self.anisotropic:
                log_signal = log_signal + bvals**2 * (t2 * next(p) + t2**2 * next(p))
        return np.exp(log_signal)

    def zonal(self, bvals, sh_order_max):
        """Zonal SH coefficients ``r_l(b)``, exact projections by quadrature."""
        l_values = np.unique(sh_degrees(sh_order_max))
        nodes, weights = np.polynomial.legendre.leggauss(_QUADRATURE_NODES)
        zonal = real_sh_descoteaux_from_index(0, l_values[None, :], np.arccos(nodes)[:, None],
                                              0.0, legacy=False)
        bvals = np.asarray(bvals, dtype=np.float64)
        order = np.argsort(bvals)
        values = self(bvals[order, None], nodes[None, :])
        # A signal never grows with b: past the b where the fitted quadratic
        # turns (a noise floor at high b bends it up) it stays flat.
        values[order] = np.minimum.accumulate(values, axis=0)
        return 2.0 * np.pi * (values * weights) @ zonal


def rician_mean(signal, sigma):
    """Expected magnitude of a signal under Rician noise of standard deviation ``sigma``.

    ``E[M] = sigma sqrt(pi / 2) L_{1/2}(-S^2 / (2 sigma^2))`` with the Laguerre
    polynomial written through exponentially scaled Bessel functions (stable
    at any SNR); ``S`` itself where ``sigma`` is 0 or the SNR beyond 1e4.

    Parameters
    ----------
    signal : ndarray
        Noise-free signal ``S >= 0``.
    sigma : float
        Noise standard deviation of each (real and imaginary) channel.

    Returns
    -------
    ndarray
        ``E[M]``, the shape of ``signal``.

    References
    ----------
    .. [1] Gudbjartsson, H., Patz, S. (1995). The Rician distribution of noisy
       MRI data. Magn Reson Med 34, 910-914.
    """
    signal = np.asarray(signal, dtype=np.float64)
    if sigma <= 0:
        return signal
    import torch  # the refinement's formula, one place (here in float64)

    from .reconst.rician import rician_mean_and_slope

    mean, _ = rician_mean_and_slope(torch.from_numpy(signal),
                                    torch.tensor(float(sigma), dtype=torch.float64))
    return mean.numpy()


# Measurements whose normalised signal is predicted above this are far enough
# above the noise floor (at SNR 5 and more) that their residuals measure the noise.
_ABOVE_FLOOR = 0.3


def _log_linear_fit(design, signal):
    """``log S = design @ p`` by least squares weighted by ``S^2`` (DIPY's WLS tensor fit)."""
    floor = 1e-3 * np.max(signal)
    weights = np.clip(signal, floor, None)
    solution, *_ = np.linalg.lstsq(design * weights[:, None],
                                   np.log(np.clip(signal, floor, None)) * weights, rcond=None)
    return solution


def _rician_fit(design, signal, start):
    """Profile parameters fitted to magnitudes as Rician means, and the noise level.

    The log-linear fit treats every measurement as the signal itself, but at
    low SNR the magnitudes along a fibre at high b sit on the noise floor
    (``sigma sqrt(pi / 2)``, far above ``S``): the profile then decays too
    slowly along the fibre, the response is too fat, and deconvolution with
    it merges crossing fibres. The noise level comes from the measurements
    well above the floor (normalised signal above ``_ABOVE_FLOOR``): the
    scaled median absolute deviation of their residuals to a log-linear fit
    of them alone. (Fitted jointly with the profile, it is not identifiable:
    the kurtosis terms bend the profile onto the floor as well.) Then
    ``E[M] = rician_mean(exp(design @ p), sigma)`` is fitted to every
    magnitude by least squares, from ``start``.
    """
    from scipy.optimize import least_squares

    # Chosen by the first fit's prediction, not by the noisy values (which
    # would keep the noise above the cut and shrink the spread).
    above = np.exp(design @ start) > _ABOVE_FLOOR
    if np.count_nonzero(above) <= design.shape[1]:
        return start, 0.0
    residual = signal[above] - np.exp(design[above] @ _log_linear_fit(design[above],
                                                                      signal[above]))
    sigma = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))

    def residuals(parameters):
        return rician_mean(np.exp(design @ parameters), sigma) - signal

    solution = least_squares(residuals, start, method="trf", x_scale="jac", max_nfev=200)
    return solution.x, sigma


def _pooled_fit(gtab, data, voxels, directions, kurtosis, rician=False):
    """Profile of ``voxels`` (K, 3 indices), each voxel's signal divided by its b0.

    ``directions`` (K, 3) are the voxels' fibre axes, or None for an
    isotropic tissue. ``rician``: fit the magnitudes as Rician means
    (:func:`_rician_fit`). Returns the profile and the mean b0 signal.
    """
    signal = data[tuple(voxels.T)].astype(np.float64)
    b0 = signal[:, b0_mask(gtab)].mean(axis=1)
    normalized = signal / b0[:, None]
    bvals = np.broadcast_to(np.asarray(gtab.bvals, dtype=np.float64), normalized.shape)
    anisotropic = directions is not None
    cosines = np.abs(directions @ np.asarray(gtab.bvecs, dtype=np.float64).T) \
        if anisotropic else None
    profile = _LogPolynomialProfile(bvals, cosines, normalized, anisotropic, kurtosis, rician)
    return profile, float(b0.mean())


def _wm_candidates(fa, md, inside, n_keep):
    """The most anisotropic voxels, without mean-diffusivity outliers.

    Voxels whose b0 is corrupted look extremely anisotropic with an
    implausibly low MD (FA 1.0 at MD 0.04e-3 on DIPY's small_64D): the
    candidates beyond 3 scaled median absolute deviations of their median MD
    are dropped.
    """
    usable = inside & (fa > 0)
    ranked = np.argwhere(usable)[np.argsort(-fa[usable], kind="stable")]
    ranked = ranked[:2 * _CANDIDATE_FACTOR * n_keep]
    candidate_md = md[tuple(ranked.T)]
    centre = np.median(candidate_md)
    spread = 1.4826 * np.median(np.abs(candidate_md - centre))
    plausible = np.abs(candidate_md - centre) <= 3 * spread
    return ranked[plausible][:_CANDIDATE_FACTOR * n_keep]


def _select_single_fibre(gtab, data, evecs, candidates, n_keep, kurtosis):
    """The ``n_keep`` candidates (ranked by FA) best explained by one single-fibre profile."""
    chosen = candidates[:n_keep]
    directions = evecs[tuple(candidates.T)]
    all_signal = data[tuple(candidates.T)].astype(np.float64)
    all_signal = all_signal / all_signal[:, b0_mask(gtab)].mean(axis=1)[:, None]
    cosines = np.abs(directions @ np.asarray(gtab.bvecs, dtype=np.float64).T)
    bvals = np.asarray(gtab.bvals, dtype=np.float64)
    for _ in range(_SELECTION_ROUNDS):
        profile, _ = _pooled_fit(gtab, data, chosen, evecs[tuple(chosen.T)], kurtosis)
        predicted = profile(bvals[None, :], cosines)
        # Best scale per voxel, then the relative misfit of the common shape.
        scale = np.sum(predicted * all_signal, 1) / np.sum(predicted**2, 1)
        misfit = (np.linalg.norm(all_signal - scale[:, None] * predicted, axis=1)
                  / np.linalg.norm(all_signal, axis=1))
        new = candidates[np.sort(np.argsort(misfit, kind="stable")[:n_keep])]
        if np.array_equal(new, chosen):
            break
        chosen = new
    return chosen


def apparent_diffusivities(response, tissue="wm"):
    """Apparent axial and radial diffusivities and FA of a response, per shell.

    The response's signal along its axis (``t = 1``) and across it (``t = 0``)
    from its zonal coefficients, ``S_b(t) = sum_l r_{b,l} Y_l0(t)``, gives per
    diffusion-weighted shell ``b`` the diffusivities of the axially symmetric
    tensor through those two signals, ``-log(S_b(t) / S_0) / b``, and that
    tensor's FA. For a tensor response they are its eigenvalues (up to the
    truncation of its zonal series at the response's order); for any other,
    a summary that two responses can be compared by, shell by shell.

    Parameters
    ----------
    response : TissueResponse
    tissue : str, optional

    Returns
    -------
    bvals : ndarray (S - 1,)
        The diffusion-weighted shells.
    axial, radial, fa : ndarray (S - 1,)
        Diffusivities in mm^2/s (NaN where a signal is not positive) and FA.
    """
    coefficients = response[tissue]
    l_values = np.arange(0, coefficients.shape[1]) * 2
    # Y_l0 along the axis (theta = 0) and across it (theta = pi / 2).
    zonal = real_sh_descoteaux_from_index(0, l_values[None, :],
                                          np.array([[0.0], [np.pi / 2]]), 0.0, legacy=False)
    along, across = zonal @ coefficients.T
    bvals = response.bvals[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        axial = -np.log(along[1:] / along[0]) / bvals
        radial = -np.log(across[1:] / across[0]) / bvals
        fa = np.abs(axial - radial) / np.sqrt(axial**2 + 2 * radial**2)
    return bvals, axial, radial, fa


# The WM response order estimate_response gives by default: the highest fODF
# order the models choose by default (esdmri.reconst.config.default_sh_order),
# so that their forward model never zero-pads the response's high degrees.
RESPONSE_SH_ORDER = 12


def estimate_response(gtab, data, mask=None, sh_order_max=RESPONSE_SH_ORDER, tissues=None,
                      rician=False):
    """Tissue responses of a scan, for any b-value scheme.

    The one estimator of esdmri: the models' default, ``esdmri_response``,
    ``esdmri_fit`` and the benchmarks all use it. No threshold depends on the
    anatomy:

    - **WM**: the most anisotropic voxels of the mask (FA of a tensor fitted
      at b <= 1500), refined recursively to those that one common
      single-fibre profile explains best (as DIPY's ``recursive_response``
      and MRtrix3's ``tournier`` algorithm refine theirs); at most
      ``RESPONSE_VOXELS_MAX`` (300, MRtrix3's number), 2% of the mask (and
      at least 5) on small scans.
    - **CSF**: the voxels of highest mean diffusivity among those above
      ``CSF_MIN_MD`` (2e-3 mm^2/s; free water diffuses at 3e-3, no tissue
      reaches 2e-3), mono-exponential, its decay measured at b <= 1500.
    - **GM**: among the voxels with FA below 0.2 (DIPY's threshold) and MD
      below ``CSF_MIN_MD``, the least anisotropic of the lower half by MD
      (CSF partial volume raises the MD).

    Each tissue's signal, pooled over its voxels (each divided by its b0),
    is fitted as a smooth function of b and of the angle to the fibre: an
    axially symmetric tensor, plus kurtosis terms with two or more non-zero
    b-values. The response rows are that function's exact zonal SH
    projections at the gtab's shells, so they are continuous in b and also
    defined on acquisitions without shells (every cluster of
    :func:`esdmri.shm.group_shells` gets the function's value at its mean
    b-value).

    Multi-tissue deconvolution separates tissues by their b-value
    dependence, so a scan with ``S`` distinct shells (b0 included) gets at
    most ``S`` tissues: WM always, then CSF, then GM (b0 plus one shell gives
    WM and CSF, like MSMT-CSD), except one shell at b <= 1500 with 30 axes
    or more (:func:`low_shell`), which gets all three:
    without a GM tissue the WM fODF carried grey matter's partial volume as
    spurious lobes. The three are one equation short there (GM's isotropic
    signal and a WM fODF's mean are nearly the same column of the forward
    model); the models' default fit charges the GM and CSF fractions
    (:func:`esdmri.reconst.config.default_isotropic_charges`; docs/benchmarks.md,
    "One shell at b <= 1500"). A tissue without voxels is left out with a
    warning.

    Parameters
    ----------
    gtab : GradientTable
        With b0 volumes.
    data : ndarray (X, Y, Z, N)
    mask : ndarray (X, Y, Z) bool, optional
        Voxels allowed as response voxels (default: every voxel with a
        positive mean b0 signal).
    sh_order_max : int, optional
        Even SH order of the WM response, at least the fODF's: an fODF of
        order L predicts the signal through the response's degrees up to L,
        and the forward model takes degrees the response lacks as zero. A
        response is axially symmetric and smooth, so its high-degree zonal
        terms are small, but not zero for a sharp one (at b = 3000 and FA
        0.8, ``r_10 / r_0`` is about 5e-3, ``r_12 / r_0`` 8e-4); they are exact projections of the
        fitted profile, so a higher order costs nothing. Default 12, the
        highest order the models choose by default.
    tissues : sequence of str, optional
        Tissues to estimate, a subset of ``("wm", "gm", "csf")`` with WM
        (default: as many as the shells separate, see above).
    rician : bool, optional
        Fit the WM and GM profiles to the magnitudes as Rician means (noise
        level measured on the measurements well above the noise floor).
        Default False: the magnitudes are taken as the signal, so at low SNR
        those along a fibre at high b sit on the noise floor and the WM
        response comes out too fat (dev phantoms at SNR 10, b 3000: apparent
        axial diffusivity 0.6 against the generator's 1.8 um^2/ms; with
        ``rician=True`` 1.45). The fat response merges crossings (crossing
        false negatives 0.15 against 0.03 on the dispersed dev phantom at
        SNR 10), but it also smooths the noise: with ``rician=True`` the
        default fit puts spurious peaks in single-fibre voxels at SNR 10, so
        it is not the default (docs/benchmarks.md, "Where the remaining
        false negatives come from").

    Returns
    -------
    TissueResponse
        Rows at ``[0] + `` the gtab's diffusion-weighted shells, tissues in
        ``("wm", "gm", "csf")`` order.

    References
    ----------
    .. [1] Tax, C. M. W., et al. (2014). Recursive calibration of the fiber
       response function for spherical deconvolution of diffusion MRI data.
       NeuroImage 86, 67-80.
    .. [2] Tournier, J.-D., Calamante, F., Connelly, A. (2013). Determination
       of the appropriate b value and number of gradient directions for
       high-angular-resolution diffusion-weighted imaging. NMR Biomed 26,
       1775-1786.
    .. [3] Jeurissen, B., et al. (2014). Multi-tissue constrained spherical
       deconvolution for improved analysis of multi-shell diffusion MRI data.
       NeuroImage 103, 411-426.
    """
    data = np.asarray(data)
    if data.ndim != 4 or data.shape[-1] != len(gtab.bvals):
        raise ValueError(f"data must have shape (X, Y, Z, {len(gtab.bvals)}) to match the "
                         f"gtab, got {data.shape}")
    is_b0 = b0_mask(gtab)
    if not is_b0.any() or is_b0.all():
        raise ValueError("estimate_response needs b0 volumes and diffusion-weighted volumes")
    shell_bvals, _ = group_shells(gtab)
    if tissues is None:
        tissues = (TISSUES if low_shell(gtab)
                   else tuple(t for t in _KEEP_PRIORITY)[:len(shell_bvals)])
    elif isinstance(tissues, str) or "wm" not in tissues or not set(tissues) <= set(TISSUES):
        raise ValueError(f"tissues must be a subset of {TISSUES} containing 'wm', "
                         f"got {tissues!r}")
    mean_b0 = data[..., is_b0].mean(axis=-1)
    inside = mean_b0 > 0
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape[:3]:
            raise ValueError(f"mask must have shape {data.shape[:3]}, got {mask.shape}")
        inside &= mask
    n_mask = int(np.count_nonzero(inside))
    if n_mask == 0:
        raise ValueError("no voxel of the mask has a positive b0 signal")
    fa, md, evecs = _tensor_fit(gtab, data, inside)
    n_keep = min(_n_response_voxels(n_mask), n_mask)
    kurtosis = len(shell_bvals) - 1 >= 2
    bvals = np.concatenate([[0.0], shell_bvals[1:]])

    candidates = _wm_candidates(fa, md, inside, n_keep)
    if len(candidates) == 0:
        raise ValueError("no voxel of the mask has an anisotropic tensor (FA > 0): there "
                         "is no white matter to take a WM response from")
    voxels = {"wm": _select_single_fibre(gtab, data, evecs, candidates, n_keep, kurtosis)}
    taken = np.zeros(inside.shape, dtype=bool)
    taken[tuple(voxels["wm"].T)] = True
    if "csf" in tissues:
        pool = inside & ~taken & (md >= CSF_MIN_MD)
        found = np.argwhere(pool)
        voxels["csf"] = found[np.argsort(-md[pool], kind="stable")][:n_keep]
        taken[tuple(voxels["csf"].T)] = True
    if "gm" in tissues:
        pool = inside & ~taken & (fa < ISOTROPIC_MAX_FA) & (md < CSF_MIN_MD) & (md > 0)
        found = np.argwhere(pool)
        # The lower half of the pool by MD (CSF partial volume raises it),
        # then the least anisotropic (crossing WM has some anisotropy left).
        # An FA below 1e-6 is the tensor fit's round-off in an isotropic voxel
        # (noiseless data; noise gives every voxel more): those voxels tie, and
        # go by the lower MD (less CSF), not by round-off.
        if pool.any():
            found = found[md[pool] <= np.median(md[pool])]
        at = tuple(found.T)
        anisotropy = np.where(fa[at] < 1e-6, 0.0, fa[at])
        voxels["gm"] = found[np.lexsort((md[at], anisotropy))][:n_keep]
    empty = [t for t in tissues if t != "wm" and len(voxels[t]) == 0]
    kept = tuple(t for t in TISSUES if t in tissues and t not in empty)
    if empty:
        reason = ""
        if "csf" in empty and np.min(gtab.bvals[~is_b0]) > TENSOR_MAX_BVAL:
            # Free water's signal is on the noise floor above this b-value, so its
            # apparent MD stays under CSF_MIN_MD; the WM fODF then carries the
            # isotropic signal (docs/benchmarks.md, "The transfer split").
            reason = (f" (the scan has no volume at b <= {TENSOR_MAX_BVAL:g}, where free "
                      "water's diffusivity can be told from tissue's; without an isotropic "
                      "tissue the WM fODF carries the isotropic signal as spurious lobes: "
                      "tissues=('wm', 'gm') gives it one)")
        warnings.warn(f"no response voxels found for tissues {empty}; estimating {kept} "
                      f"only{reason}", UserWarning, stacklevel=2)
    coefficients = []
    for tissue in kept:
        chosen = voxels[tissue]
        if tissue == "csf":
            # CSF is mono-exponential; its voxels are rarely pure, and at
            # high b the tissue they share (and the noise floor) outweighs
            # the CSF, so its decay is measured where the tensor holds.
            low = _low_b_volumes(gtab)
            profile, s0 = _pooled_fit(_subset(gtab, low), data[..., low], chosen, None, False)
        else:
            directions = evecs[tuple(chosen.T)] if tissue == "wm" else None
            profile, s0 = _pooled_fit(gtab, data, chosen, directions, kurtosis, rician)
        rows = s0 * profile.zonal(bvals, sh_order_max if tissue == "wm" else 0)
        coefficients.append(rows)
    return TissueResponse(kept, bvals, coefficients)
