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

Baselines registered here, each run the way its own documentation shows:
DIPY's single-shell CSD (highest shell, or the b = 1000 / 2000 shells for the
held-out benchmark's dev split to choose from) and multi-shell multi-tissue
CSD at the SH order their directions support (:func:`supported_sh_order`);
RUMBA-SD (voxel-wise and with total variation), whose peaks come from its own
fODF on its own sphere as in DIPY's RUMBA example (projected on SH, its sharp
fODFs blur: issue 26); MRtrix3's ``dwi2response dhollander`` +
``dwi2fod msmt_csd`` when its programs are installed; the networks trained
on the scan (``TRAINED``) and their ablations (the trained network alone,
``refine_steps=0``; the network-free fit, ``epochs=0, pretrained=False``; the
linear prior alone) and the shipped pretrained correction, alone and refined.

Data without ground-truth tissue fractions (the DiSCo phantoms) arrive with
``tissue_fractions=None`` and a ``response`` estimated from the data; each
method then uses that response, and its ``estimated_description`` says so.
A method that cannot run on some data raises :class:`NotApplicable`.
"""

import importlib.util
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from dipy.core.gradients import unique_bvals_tolerance

from esdmri import baselines
from esdmri.reconst.config import default_sh_order
from esdmri.shm import count_unique_axes, group_shells, legacy_to_descoteaux

SH_ORDER_MAX = 8

# The papers' per-scan training on the CPU budget, the models' default until
# the default became epochs=0 (no training; docs/benchmarks.md): the rows that
# measure what training adds ask for it by name.
TRAINED = {"epochs": 30, "pretrained": False}  # the per-scan network from scratch

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
        where the method was not fitted (tracking reads these).
    tissue_fractions : ndarray (X, Y, Z, 3) or None
        Estimated (wm, gm, csf) volume fractions, if the method gives them.
    odf : ndarray (X, Y, Z, V) or None
        The fODF sampled on the method's own ``sphere``, for a method that
        does not work in SH (RUMBA-SD): its peaks come from these samples,
        not from ``shm_coeff`` (:func:`peak_sweep`).
    sphere : dipy.core.sphere.Sphere or None
        The V directions of ``odf``.
    """

    shm_coeff: np.ndarray
    tissue_fractions: np.ndarray | None = None
    odf: np.ndarray | None = None
    sphere: object = None


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
        Importable modules or, prefixed ``program:``, executables on the PATH
        the method needs (it is skipped without them).
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

    def missing(self):
        """The modules and programs of ``requires`` that this machine lacks."""
        return [need for need in self.requires
                if (shutil.which(need.removeprefix("program:")) is None
                    if need.startswith("program:")
                    else importlib.util.find_spec(need) is None)]

    def is_available(self):
        """Whether every module and program in ``requires`` is there."""
        return not self.missing()


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
        Modules the method imports and (``"program:NAME"``) programs it runs;
        without them it is reported as unavailable.
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


def supported_sh_order(gtab, bval=None, tolerance=50.0):
    """The highest SH order (8, 10 or 12) the scan's directions determine.

    Like the networks' default (:func:`esdmri.reconst.config.default_sh_order`):
    the highest of 12, 10 and 8 with no more coefficients than distinct
    gradient axes, of the shell at ``bval`` (single-shell CSD) or of every
    diffusion-weighted volume (multi-shell methods); 8, DIPY's default,
    below 45 axes.
    """
    bvals = np.asarray(gtab.bvals)
    weighted = ~np.asarray(gtab.b0s_mask, dtype=bool)
    if bval is not None:
        weighted &= np.abs(bvals - bval) <= tolerance
    return default_sh_order(count_unique_axes(np.asarray(gtab.bvecs)[weighted]))


def _csd_on_shell(phantom, mask, shell):
    """DIPY CSD on b0 + shell number ``shell`` (1 = lowest) with the WM response row,
    at the SH order that shell's directions support."""
    shell_bvals, _ = group_shells(phantom.gtab)
    if not 0 < shell < shell_bvals.size:
        raise NotApplicable(f"the scan has no shell number {shell} (b-values {shell_bvals})")
    bval = shell_bvals[shell]
    return MethodResult(baselines.fit_csd(phantom.gtab, phantom.data, phantom.response,
                                        mask=mask, bval=bval,
                                        sh_order_max=supported_sh_order(phantom.gtab, bval)))


_CSD_ORDER = "sh order 8, 10 or 12: the highest its shell's directions determine"


@register_method(
    "csd",
    f"DIPY single-shell CSD ({_CSD_ORDER}) on the highest shell, with the phantom's "
    "ground-truth WM response of that shell",
    estimated_description=f"DIPY single-shell CSD ({_CSD_ORDER}) on the highest shell, "
    "with the estimated WM response of that shell")
def fit_csd(phantom, mask):
    """DIPY CSD on b0 + the highest shell with the phantom's WM response.

    On a synthetic phantom the response is the ground truth, which gives CSD
    its best case: a win over it cannot come from a poorly estimated baseline
    response (DIPY's automatic single-shell estimate picks a central
    FA-thresholded region, which in a crossing phantom mixes crossing voxels
    into the response). On DiSCo it is the response estimated for every method.
    """
    return _csd_on_shell(phantom, mask, group_shells(phantom.gtab)[0].size - 1)


@register_method("csd-shell1", f"DIPY single-shell CSD ({_CSD_ORDER}) on the lowest "
                 "non-zero shell with the estimated WM response of that shell")
def fit_csd_shell1(phantom, mask):
    return _csd_on_shell(phantom, mask, 1)


@register_method("csd-shell2", f"DIPY single-shell CSD ({_CSD_ORDER}) on the second "
                 "non-zero shell with the estimated WM response of that shell")
def fit_csd_shell2(phantom, mask):
    return _csd_on_shell(phantom, mask, 2)


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
    "DIPY MSMT-CSD (sh order 8, 10 or 12: the highest the scan's distinct directions "
    "determine), WM/GM/CSF responses estimated by DIPY in ground-truth pure-tissue voxels "
    f"(fraction >= {PURE_TISSUE_FRACTION}, or the {MIN_RESPONSE_VOXELS} purest)",
    requires=("cvxpy",), slow=True,
    estimated_description="DIPY MSMT-CSD (sh order 8, 10 or 12: the highest the scan's "
    "distinct directions determine) with the estimated WM/GM/CSF responses (skipped when "
    "GM or CSF could not be estimated)")
def fit_msmt(phantom, mask):
    return _fit_msmt(phantom, mask, supported_sh_order(phantom.gtab))


@register_method("msmt-sh8", "DIPY MSMT-CSD at sh order 8 (DIPY's default), otherwise as "
                 "msmt", requires=("cvxpy",), slow=True)
def fit_msmt_sh8(phantom, mask):
    return _fit_msmt(phantom, mask, SH_ORDER_MAX)


def _fit_msmt(phantom, mask, sh_order_max):
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
        response = phantom.response.to_dipy(sh_order_max)
    else:
        tissue_masks = [_purest_voxels(phantom, i) for i in range(3)]
        wm_rf, gm_rf, csf_rf = response_from_mask_msmt(phantom.gtab, data, *tissue_masks)
        response = multi_shell_fiber_response(
            sh_order_max, unique_bvals_tolerance(phantom.gtab.bvals), wm_rf, gm_rf, csf_rf)
    model = MultiShellDeconvModel(phantom.gtab, response, sh_order_max=sh_order_max)
    with warnings.catch_warnings():
        # cvxpy warns per voxel; failed voxels come back NaN and score as misses.
        warnings.simplefilter("ignore")
        fit = model.fit(data[mask], verbose=False)
    shm_coeff = np.nan_to_num(legacy_to_descoteaux(fit.shm_coeff, sh_order_max))
    # DIPY orders the compartments (csf, gm, wm); fractions of the S0-scaled
    # responses, normalised to sum to one.
    csf_gm_wm = np.clip(np.nan_to_num(fit.volume_fractions), 0, None)
    total = csf_gm_wm.sum(axis=-1, keepdims=True)
    wm_gm_csf = np.divide(csf_gm_wm, total, out=np.zeros_like(csf_gm_wm),
                          where=total > 0)[..., ::-1]
    return MethodResult(_scatter(shm_coeff, mask), _scatter(wm_gm_csf, mask))


def _fit_network(model_class, phantom, mask, **settings):
    """Train an esdmri model on the phantom (its own scan), default settings
    unless ``settings`` override them.

    Tissue fractions are returned when the response has WM, GM and CSF.
    """
    model = model_class(phantom.gtab, phantom.response, verbose=False, **settings)
    fit = model.fit(phantom.data, mask=phantom.mask)
    keep = mask[..., None]
    shm_coeff = np.where(keep, fit.shm_coeff_descoteaux07, 0)
    by_tissue = fit.volume_fractions
    if not all(tissue in by_tissue for tissue in ("wm", "gm", "csf")):
        return MethodResult(shm_coeff)
    fractions = np.stack([by_tissue[t] for t in ("wm", "gm", "csf")], axis=-1)
    return MethodResult(shm_coeff, np.where(keep, fractions, 0))


@register_method("esd", "esdmri ESDModel (voxel-wise spherical U-Net) trained on the scan "
                 "(epochs=30, otherwise defaults), ground-truth responses",
                 estimated_description="esdmri ESDModel (voxel-wise spherical U-Net) "
                 "trained on the scan (epochs=30, otherwise defaults), estimated responses")
def fit_esd(phantom, mask):
    from esdmri import ESDModel
    return _fit_network(ESDModel, phantom, mask, **TRAINED)


@register_method("rtesd", "esdmri RTESDModel (E(3) x SO(3) stem + spherical U-Net) trained "
                 "on the scan (epochs=30, otherwise defaults), ground-truth responses",
                 estimated_description="esdmri RTESDModel (E(3) x SO(3) stem + spherical "
                 "U-Net) trained on the scan (epochs=30, otherwise defaults), estimated "
                 "responses")
def fit_rtesd(phantom, mask):
    from esdmri import RTESDModel
    return _fit_network(RTESDModel, phantom, mask, **TRAINED)


@register_method("cesd", "esdmri CESDModel (neighbours' signals as channels of a spherical "
                 "U-Net) trained on the scan (epochs=30, otherwise defaults), ground-truth "
                 "responses",
                 estimated_description="esdmri CESDModel (neighbours' signals as channels "
                 "of a spherical U-Net) trained on the scan (epochs=30, otherwise defaults), "
                 "estimated responses")
def fit_cesd(phantom, mask):
    from esdmri import CESDModel
    return _fit_network(CESDModel, phantom, mask, **TRAINED)


# Ablations: the trained network alone (no refinement), the same loss without
# a network (the linear prior refined, no training, no shipped weights), without the
# spatial coupling, and the linear prior alone.
_ABLATIONS = {
    "net": ({"refine_steps": 0, **TRAINED}, "the trained network alone (epochs=30, "
            "refine_steps=0)"),
    "prior+refine": ({"epochs": 0, "pretrained": False}, "the network-free fit (the defaults "
                     "before the shipped weights): no training, the linear prior refined on "
                     "the same loss with the spatially coupled refinement (epochs=0, "
                     "pretrained=False)"),
    "voxelwise": ({"epochs": 0, "refine_tv": 0.0, "pretrained": False}, "no training and no "
                  "spatial coupling: the linear prior refined voxel by voxel on the same loss "
                  "(epochs=0, refine_tv=0, pretrained=False)"),
}


def _register_ablations():
    from esdmri.reconst.models import MODEL_CLASSES

    labels = {"esd": "ESDModel", "rtesd": "RTESDModel", "cesd": "CESDModel"}
    for kind, label in labels.items():
        for suffix, (settings, text) in _ABLATIONS.items():
            def fit(phantom, mask, kind=kind, settings=settings):
                return _fit_network(MODEL_CLASSES[kind], phantom, mask, **settings)
            register_method(f"{kind}-{suffix}", f"esdmri {label}, {text}, otherwise "
                            "defaults")(fit)


_register_ablations()


# The pretrained correction of the prior (issue 27): each class's shipped
# weights, or the weights file (and refinement budget) benchmarks/pretrain.py
# puts here.
PRETRAINED = {"pretrained": True}


def _register_pretrained():
    from esdmri.reconst.models import MODEL_CLASSES

    for kind, model_class in MODEL_CLASSES.items():
        def alone(phantom, mask, model_class=model_class):
            return _fit_network(model_class, phantom, mask, **{**PRETRAINED, "refine_steps": 0})

        def refined(phantom, mask, model_class=model_class):
            return _fit_network(model_class, phantom, mask, **PRETRAINED)

        register_method(f"{kind}-pretrained", f"esdmri {model_class.__name__}, the linear prior "
                        "corrected by its pretrained network alone (pretrained=True, "
                        "refine_steps=0)")(alone)
        register_method(f"{kind}-pretrained+refine", f"esdmri {model_class.__name__}, the "
                        "linear prior corrected by its pretrained network, then refined "
                        "(pretrained=True, otherwise defaults)")(refined)


_register_pretrained()


@register_method("prior", "the networks' linear prior alone: regularised least-squares "
                 "deconvolution (epochs=0, refine_steps=0, pretrained=False; the same for ESD, "
                 "RT-ESD, C-ESD)")
def fit_prior(phantom, mask):
    from esdmri import RTESDModel
    return _fit_network(RTESDModel, phantom, mask, epochs=0, refine_steps=0, pretrained=False)


def _rumba_responses(response, gtab):
    """RUMBA-SD's parameters from a TissueResponse.

    WM: per shell, the axial and radial diffusivities of the axially symmetric
    tensor with the response's signal along and across its axis; GM and CSF:
    the mean diffusivity of their response at the lowest non-zero shell.
    """
    from dipy.core.gradients import unique_bvals_tolerance
    from scipy.special import eval_legendre

    shells = unique_bvals_tolerance(gtab.bvals)
    shells = shells[shells > gtab.b0_threshold]
    if response.bvals.size != shells.size + 1:
        raise NotApplicable(f"RUMBA-SD needs one response row per shell {shells}, got "
                            f"b-values {response.bvals}")
    wm = response["wm"]
    orders = np.arange(0, 2 * wm.shape[1], 2)
    # Zonal harmonic of order l at angle 0 and 90 degrees.
    norm = np.sqrt((2 * orders + 1) / (4 * np.pi))
    along = wm @ (norm * eval_legendre(orders, 1.0))
    across = wm @ (norm * eval_legendre(orders, 0.0))
    b = response.bvals[1:, None]
    axial = -np.log(along[1:, None] / along[0]) / b
    radial = -np.log(across[1:, None] / across[0]) / b
    evals = np.concatenate([axial, radial, radial], axis=1)

    def diffusivity(tissue):
        if tissue not in response.tissues:
            return None
        row = response[tissue][:, 0]
        return float(-np.log(row[1] / row[0]) / response.bvals[1])

    return np.clip(evals, 1e-5, None), diffusivity("gm"), diffusivity("csf")


def _fit_rumba(phantom, mask, voxelwise):
    """DIPY RUMBA-SD as DIPY's example runs it: fODFs on its sphere, peaks from those.

    ``shm_coeff`` (for tracking only) is the fODF projected on SH order 8 by
    least squares; the peaks come from the samples (:func:`peak_sweep`).
    """
    from dipy.data import get_sphere
    from dipy.reconst.rumba import RumbaSDModel
    from dipy.reconst.shm import sf_to_sh

    sphere = get_sphere(name="repulsion724")
    wm, gm, csf = _rumba_responses(phantom.response, phantom.gtab)
    model = RumbaSDModel(phantom.gtab, wm_response=wm, gm_response=gm, csf_response=csf,
                         voxelwise=voxelwise, use_tv=not voxelwise, sphere=sphere)
    data = phantom.data.astype(np.float64)
    if voxelwise:
        odf = _scatter(model.fit(data[mask]).odf(), mask)
    else:
        # The total-variation prior couples neighbours: fit the whole mask.
        odf = np.where(mask[..., None], model.fit(data, mask=phantom.mask).odf(), 0)
    shm_coeff = sf_to_sh(odf, sphere, sh_order_max=SH_ORDER_MAX, basis_type="descoteaux07",
                         legacy=False)
    return MethodResult(np.where(mask[..., None], shm_coeff, 0), odf=odf, sphere=sphere)


@register_method("rumba", "DIPY RUMBA-SD voxel-wise (600 iterations), WM response as "
                 "per-shell tensor eigenvalues and GM/CSF diffusivities from the estimated "
                 "responses; peaks from its fODF on its 724-direction sphere, as in DIPY's "
                 "example")
def fit_rumba(phantom, mask):
    return _fit_rumba(phantom, mask, voxelwise=True)


@register_method("rumba-tv", "DIPY RUMBA-SD with total variation (voxelwise=False, "
                 "use_tv=True, 600 iterations), WM response as per-shell tensor eigenvalues "
                 "and GM/CSF diffusivities from the estimated responses; peaks from its fODF "
                 "on its 724-direction sphere, as in DIPY's example")
def fit_rumba_tv(phantom, mask):
    return _fit_rumba(phantom, mask, voxelwise=False)


def _tournier_to_descoteaux(coefficients, sh_order_max):
    """MRtrix3's SH coefficients (DIPY's non-legacy ``tournier07``) in ``descoteaux07``.

    Both bases are real, orthonormal and span the same functions; the change of
    basis is exact from the samples on a sphere with more points than
    coefficients.
    """
    from dipy.data import get_sphere
    from dipy.reconst.shm import sh_to_sf_matrix

    sphere = get_sphere(name="repulsion724")
    tournier = sh_to_sf_matrix(sphere, sh_order_max=sh_order_max, basis_type="tournier07",
                               legacy=False, return_inv=False)
    _, descoteaux_inverse = sh_to_sf_matrix(sphere, sh_order_max=sh_order_max,
                                            basis_type="descoteaux07", legacy=False)
    return coefficients @ (tournier @ descoteaux_inverse)


@register_method("mrtrix3", "MRtrix3 `dwi2response dhollander` then `dwi2fod msmt_csd` "
                 "(their defaults, but for `-erode 0`: the phantoms' masks have no skull "
                 "edge to erode, and 3 passes leave a small phantom without its CSF), with "
                 "the phantom's mask; peaks by the shared extractor from its WM FOD",
                 requires=("program:dwi2response", "program:dwi2fod"), slow=True)
def fit_mrtrix3(phantom, mask):
    """MRtrix3's multi-tissue CSD with its own response estimation.

    The gradients go in MRtrix3's own format (``-grad``: directions in the
    scanner frame, which an identity affine makes the voxel frame), so no
    FSL bvec flip applies. ``dwi2response`` erodes the mask 3 times by
    default to keep skull-edge voxels out of the responses; a phantom's mask
    has no such edge, and on a 16^3 phantom the erosion removes its CSF
    corners, so the mask is not eroded (``-erode 0``).
    """
    import nibabel as nib

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        affine = np.eye(4)
        nib.save(nib.Nifti1Image(phantom.data.astype(np.float32), affine), folder / "dwi.nii")
        nib.save(nib.Nifti1Image(phantom.mask.astype(np.uint8), affine), folder / "mask.nii")
        grad = np.column_stack([phantom.gtab.bvecs, phantom.gtab.bvals])
        np.savetxt(folder / "grad.b", grad, fmt="%.8f")
        common = ["-grad", str(folder / "grad.b"), "-mask", str(folder / "mask.nii"),
                  "-nthreads", "1", "-quiet", "-force"]
        tissues = ("wm", "gm", "csf")
        responses = [str(folder / f"{t}.txt") for t in tissues]
        _run_program(["dwi2response", "dhollander", str(folder / "dwi.nii"), *responses,
                      "-erode", "0", "-scratch", str(folder), *common], folder)
        pairs = [item for t, r in zip(tissues, responses) for item in (r, str(folder / f"{t}.nii"))]
        _run_program(["dwi2fod", "msmt_csd", str(folder / "dwi.nii"), *pairs, *common], folder)
        fod = np.asarray(nib.load(folder / "wm.nii").dataobj, dtype=np.float64)
    from esdmri.peaks import sh_order_from_coeffs

    shm_coeff = _tournier_to_descoteaux(np.nan_to_num(fod), sh_order_from_coeffs(fod.shape[-1]))
    return MethodResult(np.where(mask[..., None], shm_coeff, 0))


def _run_program(command, folder):
    """Run an external program, raising with its output if it fails."""
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout)[-500:]}")


def peak_sweep(result, thresholds, mask, min_separation_angle=25, npeaks=5, subvertex=True):
    """A method's peaks at several relative thresholds, from one search.

    From its SH fODF (:func:`esdmri.peaks.peaks_threshold_sweep`), or, for a
    method that gives its fODF on its own sphere (``result.odf``), from
    those samples with DIPY's ``peak_directions`` and the same rule: a peak
    is kept at threshold ``t`` when its value above ``max(0, min fODF)`` is
    at least ``t`` times the largest one's. With ``subvertex`` every
    method's peak directions are refined below its sphere's vertex spacing
    by the same rule (:func:`esdmri.peaks.subvertex_directions`), an
    own-sphere method's on its own sphere from its own samples.

    Yields
    ------
    threshold : float
    directions : ndarray (X, Y, Z, npeaks, 3)
        NaN-padded.
    """
    from dipy.reconst.dirspeed import peak_directions

    from esdmri.peaks import peaks_threshold_sweep, subvertex_directions

    thresholds = np.asarray(thresholds, dtype=float)
    if result.odf is None:
        for threshold, directions, _ in peaks_threshold_sweep(
                result.shm_coeff, thresholds, min_separation_angle=min_separation_angle,
                npeaks=npeaks, mask=mask, subvertex=subvertex):
            yield threshold, directions
        return
    odf = result.odf.reshape(-1, result.odf.shape[-1])
    directions = np.full((len(odf), npeaks, 3), np.nan)
    above_floor = np.zeros((len(odf), npeaks))
    vertices = np.full((len(odf), npeaks), -1)
    for voxel in np.flatnonzero(mask.ravel() & (odf.max(axis=1) > 0)):
        found, values, indices = peak_directions(odf[voxel], result.sphere,
                                                 relative_peak_threshold=thresholds.min(),
                                                 min_separation_angle=min_separation_angle)
        n = min(npeaks, len(values))
        directions[voxel, :n] = found[:n]
        above_floor[voxel, :n] = values[:n] - max(odf[voxel].min(), 0.0)
        vertices[voxel, :n] = indices[:n]
    if subvertex:
        voxels, slots = np.nonzero(vertices >= 0)
        directions[voxels, slots] = subvertex_directions(odf[voxels], result.sphere,
                                                         vertices[voxels, slots])
    shape = mask.shape + (npeaks, 3)
    for threshold in thresholds:
        keep = ~np.isnan(directions[..., 0]) & (above_floor >= threshold * above_floor[:, :1])
        yield float(threshold), np.where(keep[..., None], directions, np.nan).reshape(shape)


def score_sweep(result, true_dirs, mask, thresholds, **options):
    """:func:`esdmri.metrics.threshold_sweep` of a method's result, wherever its peaks come from.

    ``options`` go to :func:`esdmri.metrics.evaluate_peaks`. Returns the
    same dict as ``threshold_sweep``.
    """
    from esdmri.metrics import evaluate_peaks, threshold_sweep

    thresholds = np.asarray(thresholds, dtype=float)
    if result.odf is None:
        return threshold_sweep(result.shm_coeff, true_dirs, mask, thresholds, **options)
    results = [evaluate_peaks(directions, true_dirs, mask, **options)
               for _, directions in peak_sweep(result, thresholds, mask)]
    success = np.nan_to_num([r["all"]["success_rate"] for r in results], nan=-np.inf)
    error = np.nan_to_num([r["all"]["angular_error"] for r in results], nan=np.inf)
    # threshold_sweep's choice: highest success, ties: lowest angular error.
    best = int(np.lexsort((error, -success))[0])
    return {"thresholds": thresholds, "results": results,
            "best_threshold": float(thresholds[best]), "best_index": best}
