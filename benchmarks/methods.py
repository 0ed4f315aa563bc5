"""Registry of fODF estimation methods scored by ``benchmarks/accuracy.py``.

A method is a function ``fit(phantom, mask) -> MethodResult`` registered under
a name with :func:`register_method`. It must give WM fODF SH coefficients
(DIPY non-legacy ``descoteaux07``) in every voxel of ``mask``; it may fit more
voxels (a network fits the whole volume). Every method's peaks are then
extracted and scored by the same code, so a new method (the deconvolution
networks) only needs one registration::

    @register_method("esd", "ESD, unsupervised deconvolution network")
    def fit_esd(phantom, mask):
        ...
        return MethodResult(shm_coeff, tissue_fractions)

Baselines registered here: DIPY's single-shell CSD and multi-shell
multi-tissue CSD.

Data without ground-truth tissue fractions (the DiSCo phantoms) arrive with
``tissue_fractions=None`` and a ``response`` estimated from the data; each
method then uses that response, and its ``estimated_description`` says so.
A method that cannot run on some data raises :class:`NotApplicable`.
"""

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from dipy.core.gradients import gradient_table, unique_bvals_tolerance
from dipy.reconst.csdeconv import AxSymShResponse, ConstrainedSphericalDeconvModel

from esdmri.shm import group_shells, legacy_to_descoteaux

SH_ORDER_MAX = 8

# Pure-tissue voxels (ground-truth fraction at least this) that DIPY's MSMT
# response estimation averages over; where fewer are pure (CSF in small
# phantoms), the voxels with the largest fraction of that tissue.
PURE_TISSUE_FRACTION = 0.9
MIN_RESPONSE_VOXELS = 10


class NotApplicable(Exception):
    """Raised by a method's ``fit`` when the data lack what the method needs."""


@dataclass
class MethodResult:
    """fODFs (and optionally tissue fractions) estimated by a method.

    Attributes
    ----------
    shm_coeff : ndarray (X, Y, Z, C)
        WM fODF SH coefficients, DIPY non-legacy ``descoteaux07``; zeros
        where the method was not fitted.
    tissue_fractions : ndarray (X, Y, Z, 3) or None
        Estimated (wm, gm, csf) volume fractions, if the method gives them.
    """

    shm_coeff: np.ndarray
    tissue_fractions: np.ndarray | None = None


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes
    ----------
    name : str
    description : str
        One line for the benchmark's documentation (data with ground-truth
        responses and tissue fractions).
    fit : callable
        ``fit(phantom, mask) -> MethodResult``.
    requires : tuple of str
        Importable modules the method needs (it is skipped without them).
    slow : bool
        Too slow for whole volumes: scored on a fixed random subset of voxels.
    estimated_description : str or None
        The line for data whose responses are estimated (DiSCo); None: same
        as ``description``.
    """

    name: str
    description: str
    fit: Callable
    requires: tuple = ()
    slow: bool = False
    estimated_description: str | None = None

    def describe(self, ground_truth=True):
        """Documentation line, with ground-truth or estimated responses."""
        if ground_truth or self.estimated_description is None:
            return self.description
        return self.estimated_description

    def is_available(self):
        """Whether every module in ``requires`` can be imported."""
        return all(importlib.util.find_spec(module) is not None for module in self.requires)


METHODS: dict[str, Method] = {}


def register_method(name, description, *, requires=(), slow=False,
                    estimated_description=None):
    """Decorator registering ``fit(phantom, mask) -> MethodResult`` under ``name``.

    Parameters
    ----------
    name : str
        Unique method name (command-line ``--methods``).
    description : str
        One line for the documentation.
    requires : tuple of str, optional
        Modules the method imports; without them it is reported as unavailable.
    slow : bool, optional
        Score on a random subset of voxels rather than the whole volume.
    estimated_description : str, optional
        The line for data whose responses are estimated from the data.

    Returns
    -------
    decorator : callable
        Registers and returns the function unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")

    def decorator(fit):
        if name in METHODS:
            raise ValueError(f"name {name!r} is already registered")
        METHODS[name] = Method(name, description, fit, tuple(requires), slow,
                               estimated_description)
        return fit

    return decorator


def _scatter(values, mask):
    """Put per-voxel rows (n, K) back on the grid (X, Y, Z, K), zeros elsewhere."""
    grid = np.zeros(mask.shape + values.shape[-1:])
    grid[mask] = values
    return grid


@register_method(
    "csd",
    "DIPY single-shell CSD (sh order 8) on the highest shell, with the phantom's "
    "ground-truth WM response of that shell",
    estimated_description="DIPY single-shell CSD (sh order 8) on the highest shell, with "
    "the estimated WM response of that shell")
def fit_csd(phantom, mask):
    """DIPY CSD on b0 + the highest shell with the phantom's WM response.

    On a synthetic phantom the response is the ground truth, which gives CSD
    its best case: a win over it cannot come from a poorly estimated baseline
    response (DIPY's automatic single-shell estimate picks a central
    FA-thresholded region, which in a crossing phantom mixes crossing voxels
    into the response). On DiSCo it is the response estimated for every method.
    """
    shell_bvals, shell_index = group_shells(phantom.gtab)
    response = phantom.response
    if response.bvals.size != shell_bvals.size or response.bvals[0] != 0:
        raise ValueError(
            "phantom.response must have one row per shell of phantom.gtab, b0 first; got "
            f"b-values {response.bvals} for shells {shell_bvals}")
    highest = shell_bvals.size - 1
    volumes = (shell_index == 0) | (shell_index == highest)
    gtab = gradient_table(phantom.gtab.bvals[volumes], bvecs=phantom.gtab.bvecs[volumes],
                          b0_threshold=phantom.gtab.b0_threshold)
    wm = response["wm"]
    # Zonal SH coefficients are the same in MRtrix3's and DIPY's bases; the
    # b0 row holds the constant s0 as its l = 0 coefficient.
    zonal = wm[highest, :SH_ORDER_MAX // 2 + 1]
    s0 = wm[0, 0] / np.sqrt(4 * np.pi)
    model = ConstrainedSphericalDeconvModel(
        gtab, AxSymShResponse(s0, zonal), sh_order_max=SH_ORDER_MAX)
    data = phantom.data[..., volumes][mask].astype(np.float64)
    shm_coeff = model.fit(data).shm_coeff
    return MethodResult(_scatter(legacy_to_descoteaux(shm_coeff, SH_ORDER_MAX), mask))


def _purest_voxels(phantom, tissue):
    """Voxels for the response of tissue index ``tissue`` (WM: single-fibre only)."""
    fraction = np.where(phantom.mask, phantom.tissue_fractions[..., tissue], 0.0)
    if tissue == 0:
        fraction = np.where(phantom.n_fibres == 1, fraction, 0.0)
    pure = fraction >= PURE_TISSUE_FRACTION
    if pure.sum() < MIN_RESPONSE_VOXELS:
        largest = np.argsort(fraction, axis=None)[-MIN_RESPONSE_VOXELS:]
        pure = np.zeros(fraction.size, dtype=bool)
        pure[largest] = True
        pure = pure.reshape(fraction.shape)
    return pure


@register_method(
    "msmt",
    "DIPY MSMT-CSD (sh order 8), WM/GM/CSF responses estimated by DIPY in "
    f"ground-truth pure-tissue voxels (fraction >= {PURE_TISSUE_FRACTION}, or the "
    f"{MIN_RESPONSE_VOXELS} purest)",
    requires=("cvxpy",), slow=True,
    estimated_description="DIPY MSMT-CSD (sh order 8) with the estimated WM/GM/CSF "
    "responses (skipped when GM or CSF could not be estimated)")
def fit_msmt(phantom, mask):
    """DIPY multi-shell multi-tissue CSD with responses estimated from the data.

    With ground-truth tissue fractions, DIPY estimates the responses in the
    purest voxels of each tissue; without them, the phantom's (estimated)
    response is used, which must hold WM, GM and CSF (DIPY's MSMT-CSD needs
    two isotropic compartments).
    """
    from dipy.reconst.mcsd import (
        MultiShellDeconvModel,
        multi_shell_fiber_response,
        response_from_mask_msmt,
    )

    data = phantom.data.astype(np.float64)
    if phantom.tissue_fractions is None:
        tissues = phantom.response.tissues
        if not all(tissue in tissues for tissue in ("wm", "gm", "csf")):
            raise NotApplicable(f"DIPY's MSMT-CSD needs WM, GM and CSF responses; the "
                                f"estimated response has {tissues}")
        response = phantom.response.to_dipy(SH_ORDER_MAX)
    else:
        tissue_masks = [_purest_voxels(phantom, i) for i in range(3)]
        wm_rf, gm_rf, csf_rf = response_from_mask_msmt(phantom.gtab, data, *tissue_masks)
        response = multi_shell_fiber_response(
            SH_ORDER_MAX, unique_bvals_tolerance(phantom.gtab.bvals), wm_rf, gm_rf, csf_rf)
    model = MultiShellDeconvModel(phantom.gtab, response, sh_order_max=SH_ORDER_MAX)
    with warnings.catch_warnings():
        # cvxpy warns per voxel; failed voxels come back NaN and score as misses.
        warnings.simplefilter("ignore")
        fit = model.fit(data[mask], verbose=False)
    shm_coeff = np.nan_to_num(legacy_to_descoteaux(fit.shm_coeff, SH_ORDER_MAX))
    # DIPY orders the compartments (csf, gm, wm); fractions of the S0-scaled
    # responses, normalised to sum to one.
    csf_gm_wm = np.clip(np.nan_to_num(fit.volume_fractions), 0, None)
    total = csf_gm_wm.sum(axis=-1, keepdims=True)
    wm_gm_csf = np.divide(csf_gm_wm, total, out=np.zeros_like(csf_gm_wm),
                          where=total > 0)[..., ::-1]
    return MethodResult(_scatter(shm_coeff, mask), _scatter(wm_gm_csf, mask))


def _fit_network(model_class, phantom, mask):
    """Train an esdmri model on the phantom (its own scan) with default settings.

    Tissue fractions are returned when the response has WM, GM and CSF.
    """
    model = model_class(phantom.gtab, phantom.response, verbose=False)
    fit = model.fit(phantom.data, phantom.mask)
    keep = mask[..., None]
    shm_coeff = np.where(keep, fit.shm_coeff_descoteaux07, 0)
    by_tissue = fit.volume_fractions
    if not all(tissue in by_tissue for tissue in ("wm", "gm", "csf")):
        return MethodResult(shm_coeff)
    fractions = np.stack([by_tissue[t] for t in ("wm", "gm", "csf")], axis=-1)
    return MethodResult(shm_coeff, np.where(keep, fractions, 0))


@register_method("esd", "esdmri ESDModel (voxel-wise spherical U-Net), default settings, "
                 "ground-truth responses",
                 estimated_description="esdmri ESDModel (voxel-wise spherical U-Net), "
                 "default settings, estimated responses")
def fit_esd(phantom, mask):
    from esdmri import ESDModel
    return _fit_network(ESDModel, phantom, mask)


@register_method("rtesd", "esdmri RTESDModel (E(3) x SO(3) stem + spherical U-Net), default "
                 "settings, ground-truth responses",
                 estimated_description="esdmri RTESDModel (E(3) x SO(3) stem + spherical "
                 "U-Net), default settings, estimated responses")
def fit_rtesd(phantom, mask):
    from esdmri import RTESDModel
    return _fit_network(RTESDModel, phantom, mask)
