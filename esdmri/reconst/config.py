"""Hyperparameters of the deconvolution models: one frozen, self-validating dataclass per stage.

- :class:`NetworkConfig`: the shape of the network (fixed once it is built);
- :class:`TrainingConfig`: how it is trained on blocks of the scans, and the
  blocks it is run on;
- :class:`RefinementConfig`: the descent of the loss from the network's
  output.

Their fields and defaults are the one source of the models' keyword options
(``RTESDModel(gtab, response, nside=8, epochs=10)``), of the options of the
command-line tools (``esdmri_fit``, ``esdmri_train``) and of the parameter
lists in the models' docstrings (:func:`options_docstring`).
:class:`DeconvolutionConfig` groups them with the convolution kind; it is
what a model holds and what its file stores (:meth:`DeconvolutionConfig.to_dict`).
A configuration never changes: :meth:`DeconvolutionConfig.replace` makes a
validated copy.
"""

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass, field
from numbers import Real
from typing import Optional

import numpy as np

from ..deprecation import renamed_options
from ..shm import n_coeffs, sh_matrix, sh_order_for_directions


def check_mask_fraction(fraction):
    """Raise ValueError unless ``fraction`` is a number in [0, 0.5]."""
    if isinstance(fraction, bool) or not isinstance(fraction, Real) \
            or not 0 <= fraction <= 0.5:
        raise ValueError(f"mask_fraction must be a number in [0, 0.5] (0: no masking), "
                         f"got {fraction!r}")


# The forms of the training loss's total variation (LossWeights.tv_form).
TV_FORMS = ("coefficients", "normalized_fodf", "coupled")
# Relative peak threshold of a fit's peaks (DeconvolutionFit.peaks, esdmri_fit,
# esdmri_apply), chosen for the default fit on the dev phantoms of
# benchmarks/devset.py (highest success over all five families). DIPY's 0.5 suits
# CSD's spurious lobes; the refined fODFs have few, and at 0.5 the default fit
# dropped the weaker fibre of 0.21-0.23 of the crossing fibres of the dispersed
# and stick-zeppelin dev phantoms (0.00-0.14 at 0.2; docs/benchmarks.md,
# "Where the remaining false negatives come from").
PEAK_THRESHOLD = 0.2
# The sparsity term's weight (LossWeights.sparsity) at SH orders up to 12; order 14 has
# its own (:data:`DETERMINED_14_SPARSITY`, :data:`HIGH_SHELL_SPARSITY`,
# :func:`default_sparsity`).
SPARSITY = 1e-4


@dataclass(frozen=True)
class LossWeights:
    """Weights of the four loss terms (and the form of the total variation).

    Parameters
    ----------
    intensity : float
        L2 between reconstructed and measured normalised signal.
    sparsity : float
        Cauchy penalty ``2 log(1 + f**2 / (2 sigma))`` on the WM fODF sampled
        on a dense sphere.
    nonnegativity : float
        L2 of the negative part of the sampled WM fODF.
    total_variation : float
        Spatial total variation between face-neighbouring voxels (0 switches
        it off), of the form ``tv_form`` names.
    tv_form : str
        ``"coefficients"``: mean over neighbour pairs of the Euclidean norm of
        the difference of the normalised tissue coefficients;
        ``"normalized_fodf"``: mean over neighbour pairs and over the dense
        sphere's vertices of the squared difference of the WM fODF samples,
        each voxel's samples scaled to unit L2 norm (the training loss of
        Elaldi et al. 2024's spatio-hemispherical deconvolution, weight 0.5
        there); ``"coupled"``: the refinement's term, the sum over neighbour
        pairs of ``sqrt(|c_i - c_j|^2 + tv_smoothing^2)`` per masked voxel, so
        that with the refinement's weight (:func:`esdmri.reconst.finetune.coupling_weight`)
        the loss is the refinement's objective per voxel. See
        :func:`esdmri.reconst.losses.total_variation_loss`.
    tv_smoothing : float
        ``delta`` of the smoothed norms of the ``"coefficients"`` and
        ``"coupled"`` forms (keeps their gradient finite where neighbours agree).
    gm_charge, csf_charge : float
        Linear charges on each voxel's GM and CSF coefficients (L1 priors on
        the non-negative fractions), in the refinement's objective; they act
        where the response has the tissue.
    """

    intensity: float = 1.0
    sparsity: float = SPARSITY
    nonnegativity: float = 0.1
    total_variation: float = 0.0
    tv_form: str = "coefficients"
    tv_smoothing: float = 1e-6
    gm_charge: float = 0.0
    csf_charge: float = 0.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if name != "tv_form" and not value >= 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {value}")
        if self.tv_form not in TV_FORMS:
            raise ValueError(f"train_tv_form must be one of {TV_FORMS}, got {self.tv_form!r}")



# What a fit does about the magnitudes' Rician noise floor (NetworkConfig.noise_floor):
# nothing, a debiasing of the magnitudes before the signal is normalised
# (esdmri.reconst.inputs.debias_magnitudes's methods), or a refinement whose data term
# predicts the magnitudes as Rician means (esdmri.reconst.rician).
DEBIAS_METHODS = ("power", "rician_mean")
RICIAN_MODEL = "model"
NOISE_FLOORS = (None, *DEBIAS_METHODS, RICIAN_MODEL)

# The refinement's solvers (esdmri.reconst.refine): L-BFGS is the default, Adam the
# former fixed-rate descent, kept for comparison.
REFINEMENT_METHODS = ("lbfgs", "adam")


# What ``refine_tv=None`` stands for (:func:`default_refine_tv`), and the least SH order
# and the sparsity weight of a single shell above b = 1500 with 45 directions or more
# (:func:`default_sh_order`, :func:`default_sparsity`,
# esdmri.reconst.inputs.super_resolved_shell), chosen on the dev phantoms
# (docs/benchmarks.md, "Single-shell defaults" and "Order 14 on one shell above b = 1500").
REFINE_TV = 10.0
SINGLE_SHELL_REFINE_TV = 5.0
HIGH_SHELL_SH_ORDER = 14
HIGH_SHELL_SPARSITY = 3e-4
# The highest SH order the directions may determine by default, and the sparsity
# weight of a fit at that order on several shells (:func:`default_sparsity`; docs/
# benchmarks.md, "Order 14 where the directions determine it").
MAX_DEFAULT_SH_ORDER = 14
DETERMINED_14_SPARSITY = 1.5e-4
# One shell at b <= 1500 with 30 axes or more (esdmri.response.low_shell): WM, GM
# and CSF (esdmri.response.estimate_response's default tissues there), SH order 12, a
# stronger sparsity and charges on the GM and CSF fractions
# (:func:`default_isotropic_charges`), chosen on the dev phantoms (docs/benchmarks.md,
# "One shell at b <= 1500: three tissues, the isotropic ones charged").
LOW_SHELL_SH_ORDER = 12
LOW_SHELL_SPARSITY = 4e-4
GM_CHARGE = 5e-3
CSF_CHARGE = 2e-2


def check_integer(name, value, low):
    """Refuse anything but an integer >= ``low`` (bools too), naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class NetworkConfig:
    """The shape of a deconvolution network.

    Parameters
    ----------
    sh_order_max : int or None
        Even SH order of the WM fODF. None (default): the highest of 14, 12,
        10 and 8 whose coefficients the scan's distinct (shell, gradient
        direction) measurements determine (14 from 120 on, 12 from 91: each
        shell weighs the SH degrees by its own response, so three shells of
        the same 64 directions count 192), else 8 as in DIPY's CSD, and 14 on
        one shell above b = 1500 of 45 directions or more
        (:func:`default_sh_order`).
        On straight 45-degree crossings with
        three shells of 64 directions, 8 merged the two fibres (issue 26).
        Chosen on the dev phantoms: 12 cut their crossing-voxel error by
        39 % at SNR 20 and 18 % at SNR 10 against 8 (docs/benchmarks.md,
        "SH order of the models"); 16 and 18 need nside 8 and gave more
        false peaks at SNR 10.
    nside : int
        HEALPix resolution of the grid (a power of 2). The models raise it
        to the smallest that holds the default SH order's coefficients (8
        for order 14).
    hemisphere : bool
        Use one vertex per antipodal pair (half the cost, same result).
    depth : int
        U-Net levels; each level halves nside.
    filter_start : int
        Channels of the first level, doubled at each level.
    kernel_size : int
        Number of Chebyshev polynomials of the spherical filters.
    spatial_kernel_size : int
        Odd edge of the isotropic spatial kernel.
    spatial_layers : int
        E(3) x SO(3) convolutions before the spherical U-Net; the network
        sees ``spatial_layers * (spatial_kernel_size // 2)`` voxels around
        each voxel (the published patch of 3 is 1 layer of kernel 3).
    normalize : bool or None
        Scale the tissue coefficients to volume fractions summing to 1.
        None (default): with two or more tissues and two or more
        diffusion-weighted shells; single-shell fits keep their scale (see
        ``RTESDModel.normalizes``).
    linear_prior : bool
        The network corrects a regularised least-squares deconvolution of the
        signal instead of producing the fODFs from scratch (its head starts at
        zero, so training starts from a fit that explains the signal).
        Trained from scratch (False), the networks underfit on a CPU budget;
        see docs/benchmarks.md.
    norm : {"batch", "voxel"}
        Normalisation after each convolution: batch norm, as published, or
        a per-voxel layer norm over channels and vertices that computes the
        same in training and at inference and ignores a window's padding
        (:class:`esdmri.nn.unet.VoxelNorm`). Measured on a dev phantom
        (docs/benchmarks.md, "Does the network learn?"): with batch norm the
        evaluation loss jumped back to the prior's twice while the training
        loss fell; with "voxel" it fell every epoch, to within 1 % of batch
        norm's end loss. Model files without this option hold "batch".
    pretrained : bool, str or None
        A pretrained, acquisition-agnostic network that corrects the linear
        prior's WM fODF before the refinement
        (:mod:`esdmri.reconst.pretrained`): True or "default" for the weights
        shipped with esdmri, a path for other weights, False for the
        network-free fit. None (the default): the model class's shipped
        weights for RT-ESD and C-ESD, the network-free fit for ESD (whose
        voxel-wise weights lost to it on the dev set). With
        ``epochs=N`` those weights are fine-tuned on the scan
        (:mod:`esdmri.reconst.finetune`), and the model (and its file)
        records which weights they started from; ``pretrained=False,
        epochs=N`` trains a per-scan network from scratch instead. Chosen on the dev set of five
        phantom families (docs/benchmarks.md, "Pretrained network"): with the
        shipped weights the default fit's crossing error was lower on nine of
        the ten dev phantoms and 0.1 degree higher on the tenth, with no more
        false negatives on any. Model files record it; files written before
        it existed hold False.
    noise_floor : str or None
        What the fit does about the Rician noise floor of the magnitudes
        (along a fibre at high b the signal lies under it at low SNR).
        None (the default): nothing, the magnitudes are the signal.
        ``"power"`` (``sqrt(max(M^2 - 2 sigma^2, 0))``) or ``"rician_mean"``
        (the signal whose Rician mean is the magnitude): the magnitudes are
        debiased with the scan's noise level, once, before the signal is
        normalised (:func:`esdmri.reconst.inputs.debias_magnitudes`), so the
        prior, the network and the refinement all see the debiased signal;
        a response the model estimates is then fitted to the magnitudes as
        Rician means (``estimate_response(rician=True)``). ``"model"``: the
        magnitudes are left as they are, an estimated response is fitted
        as Rician means, and the refinement's data term compares the
        Rician mean of the forward signal with them, with the scan's noise
        level (:class:`esdmri.reconst.rician.RicianVoxelLoss`; fine-tuning,
        ``epochs=N``, keeps its least-squares loss). Measured on the dev set:
        docs/benchmarks.md, "Debiasing the noise floor".
        Model files record it; files written before it existed hold None.
    """

    sh_order_max: Optional[int] = None
    nside: int = 4
    hemisphere: bool = True
    depth: int = 2
    filter_start: int = 8
    kernel_size: int = 3
    spatial_kernel_size: int = 3
    spatial_layers: int = 1
    normalize: Optional[bool] = None
    linear_prior: bool = True
    norm: str = "voxel"
    pretrained: object = None
    noise_floor: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.pretrained, os.PathLike):
            object.__setattr__(self, "pretrained", os.fspath(self.pretrained))
        if self.pretrained is not None and not isinstance(self.pretrained, (bool, str)):
            raise TypeError(f"pretrained must be None, True, False, 'default' or a path, got "
                            f"{type(self.pretrained).__name__}")
        order = self.sh_order_max
        if order is not None and (isinstance(order, bool) or not isinstance(
                order, (int, np.integer)) or order < 2 or order % 2):
            raise ValueError(f"sh_order_max must be an even integer >= 2 or None, got "
                             f"{order!r}")
        if self.normalize not in (None, True, False):
            raise ValueError(f"normalize must be None, True or False, got {self.normalize!r}")
        if self.noise_floor not in NOISE_FLOORS:
            raise ValueError(f"noise_floor must be one of {NOISE_FLOORS}, got "
                             f"{self.noise_floor!r}")
        from ..nn.unet import NORMS  # torch: only once a configuration is built

        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        sphere = self.sphere()
        sphere.pyramid(self.depth)  # raises if nside is too small for the depth
        # The grid must hold more samples than coefficients for the least-squares
        # projection of the WM function onto SH to be well posed.
        if order is not None and n_coeffs(order) > sphere.n_vertices:
            raise ValueError(
                f"sh_order_max={self.sh_order_max} needs {n_coeffs(self.sh_order_max)} "
                f"coefficients but the grid (nside={self.nside}, hemisphere="
                f"{self.hemisphere}) has only {sphere.n_vertices} vertices: raise nside")

    def sphere(self):
        """The HEALPix grid of the network.

        Returns
        -------
        sphere : esdmri.sphere.HealpixSphere
        """
        # healpy (and astropy) load on first use, not with the option defaults
        # that every command's --help reads.
        from ..sphere import HealpixSphere

        return HealpixSphere(self.nside, hemisphere=self.hemisphere)


# Largest condition number of the grid's SH matrix (the U-Net's output is
# projected onto SH by its pseudo-inverse) that training accepts without a warning.
# HEALPix hemispheres: 1.0-1.4 for every order up to 12 that fits the grid
# except order 12 on nside 4 (96 vertices for 91 coefficients): 2416.
MAX_GRID_CONDITION = 10.0


def grid_condition_number(sh_order_max, vertices):
    """Condition number of the SH matrix of a grid (that of its pseudo-inverse too).

    Parameters
    ----------
    sh_order_max : int
    vertices : ndarray, shape (V, 3)

    Returns
    -------
    condition : float
        ``inf`` where the grid has fewer vertices than coefficients.
    """
    if n_coeffs(sh_order_max) > len(vertices):
        return np.inf
    return float(np.linalg.cond(sh_matrix(sh_order_max, vertices)))


def carrying_nside(sh_order_max, hemisphere=True):
    """Smallest HEALPix nside whose grid carries an SH order (:data:`MAX_GRID_CONDITION`).

    Parameters
    ----------
    sh_order_max : int
    hemisphere : bool

    Returns
    -------
    nside : int
    """
    nside = 1
    from ..sphere import HealpixSphere  # healpy: only when a grid is chosen

    while grid_condition_number(sh_order_max, HealpixSphere(
            nside, hemisphere=hemisphere).vertices) > MAX_GRID_CONDITION:
        nside *= 2
    return nside


def default_sh_order(n_directions, super_resolved=False, low_shell=False):
    """The SH order ``sh_order_max=None`` stands for.

    Parameters
    ----------
    n_directions : int
        Distinct diffusion-weighted measurements of the scan: gradient axes
        per shell (antipodal directions count once), summed over shells
        (:func:`esdmri.reconst.inputs.count_weighted_measurements`).
    super_resolved : bool, optional
        The scan's diffusion weighting is one shell above b = 1500 with 45
        distinct axes or more (:func:`esdmri.reconst.inputs.super_resolved_shell`).
    low_shell : bool, optional
        The scan's diffusion weighting is one shell at b <= 1500 with 30
        distinct axes or more (:func:`esdmri.response.low_shell`).

    Returns
    -------
    sh_order_max : int
        The highest order up to 14 (:data:`MAX_DEFAULT_SH_ORDER`) whose
        coefficients the directions determine
        (:func:`esdmri.shm.sh_order_for_directions`: 14 from 120 directions
        on, 12 from 91, 10 from 66), and never below 8, as in DIPY's CSD;
        14 where the directions determine it (with a sparsity of 1.5e-4,
        :func:`default_sparsity`) cut the crossing error of the dispersed dev
        phantoms by up to 1 degree (docs/benchmarks.md, "Order 14 where the
        directions determine it"). One
        shell above b = 1500 with 45 axes or more gets 14
        (:data:`HIGH_SHELL_SH_ORDER`), beyond what its directions determine,
        the non-negativity and sparsity terms carrying the rest (as
        super-resolved CSD does [1]_; with :func:`default_sparsity`'s
        stronger sparsity): there order 8 merged 45-degree crossings of
        fibres of FA 0.7 and order 10 40-degree crossings of fibres of FA
        0.8 (dev phantoms at SNR 10 / 20, one shell of b = 2500 x 64:
        crossing error 12.1 / 12.0 degrees, false negatives 0.29 / 0.28 at
        order 10 against 3.7 / 2.7 and 0.00 at 14; docs/benchmarks.md,
        "Order 14 on one shell above b = 1500"). One shell at b <= 1500
        with 30 axes or more gets 12 (:data:`LOW_SHELL_SH_ORDER`) with three
        tissues and charges on the isotropic ones
        (:func:`default_isotropic_charges`): with WM and CSF alone order 12
        resolved 45-degree crossings that order 8 merges but added spurious
        peaks where grey matter shares the voxel.

    References
    ----------
    .. [1] Tournier, J.-D., Calamante, F., Connelly, A. (2007). Robust
       determination of the fibre orientation distribution in diffusion MRI:
       non-negativity constrained super-resolved spherical deconvolution.
       NeuroImage 35, 1459-1472.
    """
    order = max(8, sh_order_for_directions(n_directions, cap=MAX_DEFAULT_SH_ORDER))
    if super_resolved:
        order = max(order, HIGH_SHELL_SH_ORDER)
    if low_shell:
        order = max(order, LOW_SHELL_SH_ORDER)
    return order


def default_sparsity(super_resolved, sh_order_max, low_shell=False):
    """The weight of the fODF's sparsity term ``sparsity=None`` stands for.

    Parameters
    ----------
    super_resolved : bool
        The scan's diffusion weighting is one shell above b = 1500 with 45
        distinct axes or more (:func:`esdmri.reconst.inputs.super_resolved_shell`),
        fitted at :data:`HIGH_SHELL_SH_ORDER`.
    sh_order_max : int
        The fit's SH order.
    low_shell : bool, optional
        One shell at b <= 1500 with 30 axes or more
        (:func:`esdmri.response.low_shell`), fitted at
        :data:`LOW_SHELL_SH_ORDER`.

    Returns
    -------
    sparsity : float
        :data:`SPARSITY` (1e-4); :data:`DETERMINED_14_SPARSITY` (1.5e-4) at
        order 14 on several shells, where 1e-4 added spurious peaks on
        dispersed dev bundles at SNR 10 (all-voxel false positives +0.04) and
        1.25e-4 too (+0.03) (docs/benchmarks.md, "Order 14 where the
        directions determine it"); :data:`HIGH_SHELL_SPARSITY` (3e-4) with
        the super-resolved order, chosen on the dev phantoms
        (docs/benchmarks.md, "Order 14 on one shell above b = 1500"): at
        order 14 with 1e-4 dispersed bundles on b = 2500 x 64 carried more
        spurious peaks than at order 10 (all-voxel false positives 0.57 /
        0.46 at SNR 10 / 20 against 0.50 / 0.39), with 3e-4 fewer (0.45 /
        0.38), the crossings still resolved; :data:`LOW_SHELL_SPARSITY`
        (4e-4) at order 12 on one shell at b <= 1500 (3e-4 and 6e-4 resolved
        fewer 45-degree crossings; docs/benchmarks.md, "One shell at b <=
        1500").
    """
    if super_resolved:
        return HIGH_SHELL_SPARSITY
    if low_shell and sh_order_max == LOW_SHELL_SH_ORDER:
        return LOW_SHELL_SPARSITY
    return DETERMINED_14_SPARSITY if sh_order_max >= MAX_DEFAULT_SH_ORDER else SPARSITY


def default_isotropic_charges(low_shell):
    """The charges on the GM and CSF fractions ``gm_charge=None`` and ``csf_charge=None``
    stand for.

    Parameters
    ----------
    low_shell : bool
        One shell at b <= 1500 with 30 axes or more
        (:func:`esdmri.response.low_shell`).

    Returns
    -------
    gm_charge, csf_charge : float
        :data:`GM_CHARGE` (5e-3) and :data:`CSF_CHARGE` (2e-2) on such a
        shell, 0 elsewhere. On b0 and one shell at b ~ 1000, grey matter's
        isotropic signal and a WM fODF's mean are nearly the same column of
        the forward model, and WM's mean plus CSF can stand for GM: the three
        tissues are one equation short. Without GM the WM fODF carried grey
        matter's partial volume, which the sparsity term broke into spurious
        lobes (dispersed dev bundles: two extra peaks per partial-volume
        voxel); with GM free the fit moved the WM signal of 45-degree
        crossings into GM and merged them; with CSF free, into CSF (a WM
        fODF of FA 0.55 lost 0.8 degrees). A charge per unit of coefficient
        takes isotropic signal to a tissue only where the WM fODF would pay
        more for it; a true CSF or GM voxel, which the WM fODF cannot
        explain, keeps its tissue (the charge is small next to the misfit).
        Chosen on the dev phantoms, GM among 0, 1e-3, 2e-3, 3e-3, 5e-3 and
        1e-2, then CSF among 0, 1e-2, 2e-2 and 5e-2, the smallest whose every
        dev phantom kept within the switch rule (docs/benchmarks.md, "One
        shell at b <= 1500"). Their unit is the objective's (the signal term
        is a mean squared residual per measurement), so they do not depend
        on the number of measurements, and the trade they set (WM's sparsity
        against the charge, the signal term being the same) not on the noise.
    """
    return (GM_CHARGE, CSF_CHARGE) if low_shell else (0.0, 0.0)


def default_refine_tv(single_shell):
    """The refinement's coupling ``refine_tv=None`` stands for.

    Parameters
    ----------
    single_shell : bool
        The scan has one diffusion-weighted shell
        (:func:`esdmri.shm.count_weighted_shells`).

    Returns
    -------
    refine_tv : float
        :data:`REFINE_TV` (10), or :data:`SINGLE_SHELL_REFINE_TV` (5) on a
        single shell, chosen on the dev phantoms (docs/benchmarks.md,
        "Single-shell defaults"): on one shell the coupling that suits
        several shells smoothed crossings away (dispersed bundles on b =
        1000 x 60 at SNR 10 / 20: crossing error 22.9 / 13.0 degrees at 10
        against 16.8 / 9.4 at 5, with fewer spurious peaks), and with the order 10 of a
        shell above b = 1500 a coupling of 10 also lost 45-degree crossings
        and added spurious peaks (one shell of b = 3000 x 64 at SNR 10:
        crossing error 9.3 degrees, false negatives 0.08, all-voxel false
        positives 0.20, against 1.9, 0.00 and 0.04 at 5). Across several
        shells 5 lost crossings (straight bundles on DIPY's 3-shell table at
        SNR 10: +3.5 degrees).
    """
    return SINGLE_SHELL_REFINE_TV if single_shell else REFINE_TV


# What ``lr=None`` and ``batch_size=None`` stand for (TrainingConfig.recipe): a
# network trained on a scan from scratch, and the pretrained correction
# fine-tuned on it (chosen on the dev phantoms, docs/benchmarks.md, "Does the
# network learn?"). Inference runs blocks of the scratch batch size.
SCRATCH_RECIPE = {"lr": 1.7e-3, "batch_size": 1}
FINETUNE_RECIPE = {"lr": 1e-3, "batch_size": 4}
# Largest share of a shell that fine-tuning may hold out (``holdout``).
MAX_HOLDOUT = 0.5


@dataclass(frozen=True)
class TrainingConfig:
    """How a network is trained on blocks of the scans, and the blocks it runs on.

    Parameters
    ----------
    block_size : int
        Edge of the training windows and of the inference core blocks.
    epochs : int
        Training passes over the mask. The default 0 trains nothing: the
        fODFs are the linear prior's regularised least-squares fit refined
        by the spatially coupled descent of the loss (needs
        ``linear_prior=True``; ESD, RT-ESD and C-ESD then give the same
        fit). On the held-out phantoms every trained setting measured was
        less accurate than that at SNR 10 and 20, on the CPU budget
        (``epochs=30``, the former default: crossing-voxel error 15.8 and
        11.5 degrees against 10.8 and 6.9) and on a GPU at the published
        regime (15.1 and 8.4 against 11.2 and 6.6), while it removed false
        peaks at SNR 10 (docs/benchmarks.md, "Held-out accuracy" and
        "published compute regime"); those runs predate the training changes
        of issue 25, after which the network alone beat the prior on a 12^3
        dev phantom (order 8, SNR 20: crossing-voxel error 19.3 against 23.4
        degrees after 25 epochs; "Does the network learn?"), and the full
        fit (network then refinement) has not been measured again.
        With the pretrained correction (``pretrained`` not False, the
        default) ``epochs=N`` fine-tunes it on the scan
        (:mod:`esdmri.reconst.finetune`; 10 epochs on the dev and test
        phantoms: docs/benchmarks.md, "Fine-tuning the shipped correction");
        with ``pretrained=False`` it trains a network on the scan from
        scratch as the papers do; group training defaults to 30
        (:data:`GROUP_OPTIONS`).
    train_windows : int
        Most optimiser steps over all epochs of a single-scan fit, so that
        the cost of training a large scan is bounded; a warning says when it
        stops training before ``epochs``. On a 12^3 dev phantom 528 steps
        (25 epochs) won 70 % of the gap between the linear prior's loss
        and the per-voxel minimum and were still descending
        (docs/benchmarks.md, "Does the network learn?"); the former cap of
        100 steps of one window stopped most fits inside a few epochs.
    mask_fraction : float
        Masked (J-invariant) self-supervision, in [0, 0.5]: in each training
        block this share of the masked voxels, drawn on one colour of a 3D
        checkerboard so no two touch, gets the mean of its face neighbours'
        signals as input, and the loss fits only those voxels' measured
        signals, so the network learns to predict a voxel from its
        neighbourhood rather than to reproduce its noise
        (:mod:`esdmri.reconst.selfsupervision`). The check that keeps the
        starting weights when training did not lower the loss uses the same
        masked loss. Inference uses every voxel's own signal. 0: no masking,
        every voxel is fitted to its own input. Applies to single-scan and
        group training alike. Measured on the dev phantoms, no setting beat
        ``epochs=0`` at both SNR 10 and 20 (docs/benchmarks.md, "Training
        that uses the neighbours"), hence the default 0.
    batch_size : int or None
        Windows per optimiser step (and per network pass at inference).
        Training windows are centred on masked voxels and cover every masked
        voxel once per epoch (:func:`esdmri.reconst.tiling.training_windows`).
        None: :data:`SCRATCH_RECIPE`'s or :data:`FINETUNE_RECIPE`'s
        (:meth:`recipe`).
    lr : float or None
        Adam learning rate (after the warm-up). None: 1.7e-3 for a network
        trained from scratch (on the dev phantom at equal epochs, batches of
        1 window at 1.7e-3 went further than batches of 4 at 1e-3;
        docs/benchmarks.md, "Does the network learn?"), and
        :data:`FINETUNE_RECIPE`'s rate for fine-tuning the pretrained
        correction, chosen on the dev phantoms (same section).
    warmup_steps : int
        Optimiser steps over which the learning rate rises linearly to
        ``lr`` (0: none), so that Adam's first steps, which move every
        weight by about ``lr`` whatever its gradient, do not throw the
        network far from the linear prior's fit it starts at. Measured on
        the 12^3 dev phantom at order 12 on nside 4, one step at 1.7e-3
        without warm-up raised the evaluation loss by 13 % and ten steps
        lowered it by 10 % (docs/benchmarks.md, "Does the network learn?").
    patience : int
        Plateau epochs before halving the learning rate; twice as many stop
        training.
    seed : int
        Seeds the weights and the window order (training is deterministic on CPU).
    sparsity : float or None
        Weight of the fODF's sparsity term (the signal fit has weight 1), in
        training and in the refinement. None (default): the models resolve
        it from the scan's gtab (:func:`default_sparsity`): 1e-4, 1.5e-4 at
        SH order 14 on several shells, 3e-4 on one shell above b = 1500
        fitted at the super-resolved order.
    nonnegativity : float
        Weight of the fODF's non-negativity term, in training and in the
        refinement.
    train_tv : float
        Weight of the total variation between neighbouring voxels'
        coefficients in the training loss (the refinement's own is
        ``refine_tv``). Was ``total_variation`` (still accepted, deprecated).
    train_tv_form : str
        What that total variation measures: ``"coefficients"`` (the norm of
        the tissue coefficients' difference) or ``"normalized_fodf"`` (the
        squared difference of L2-normalised WM fODF samples, the form of
        Elaldi et al. 2024, who weight it 0.5); see :class:`LossWeights`.
        On the 12^3 dev phantom ``train_tv=0.5`` in that form took the
        trained network's crossing error from 19.3 to 13.5 degrees at SNR 20
        and from 25.6 to 24.9 at SNR 10 (docs/benchmarks.md, "TV inside the
        training loss").
    gm_charge : float or None
        A linear charge on each voxel's GM coefficient in the refinement's
        objective (:class:`LossWeights`), where the response has GM. None
        (default): resolved from the scan's gtab
        (:func:`default_isotropic_charges`): 5e-3 on one shell at b <= 1500
        with 30 axes or more, 0 elsewhere.
    csf_charge : float or None
        The same on the CSF coefficient: 2e-2 on such a shell, 0 elsewhere.
    holdout : float
        Fine-tuning the pretrained correction only (``epochs=N``): the share
        of each diffusion-weighted shell's volumes held out of the
        fine-tuning loss (drawn once from ``seed``, b0s never held out;
        :func:`esdmri.reconst.finetune.holdout_volumes`); a scan whose
        shells are too small to hold one out is refused. The kept epoch is
        the one whose correction best predicts the held-out volumes (the
        starting weights unless an epoch predicts them better), so a
        fine-tuning that fits the noise of the scan, rather than its fibres,
        is caught by directions it never saw. 0: every volume is fitted and
        the evaluation loss decides, which on the 12^3 dev phantoms kept the
        last epoch and made the full fit worse than the default on 9 of 10
        runs (by up to 1.2 degrees); with 0.125 and 30 refinement steps it
        was worse on none (docs/benchmarks.md, "Fine-tuning that never
        makes the fit worse").
    holdout_refine_steps : int
        Steps of the refinement (on the retained volumes) between the
        correction and its prediction of the held-out volumes; 0: the
        correction's output predicts them. Chosen on dev: after 0 or 10
        steps the held-out error still kept epochs whose full fit was worse
        (6 and 4 of 10 dev runs), after 30 none.
    """

    block_size: int = 8
    epochs: int = 0
    train_windows: int = 1000
    mask_fraction: float = 0.0
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: int = 20
    patience: int = 3
    seed: int = 0
    sparsity: Optional[float] = None
    nonnegativity: float = LossWeights.nonnegativity
    train_tv: float = LossWeights.total_variation
    train_tv_form: str = LossWeights.tv_form
    gm_charge: Optional[float] = None
    csf_charge: Optional[float] = None
    holdout: float = 0.125
    holdout_refine_steps: int = 30

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        check_integer("epochs", self.epochs, 0)
        check_integer("train_windows", self.train_windows, 1)
        check_integer("warmup_steps", self.warmup_steps, 0)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 or None, got {self.lr!r}")
        check_mask_fraction(self.mask_fraction)
        if not 0 <= self.holdout <= MAX_HOLDOUT:
            raise ValueError(f"holdout must lie in [0, {MAX_HOLDOUT}] (the share of each "
                             f"diffusion-weighted shell held out), got {self.holdout!r}")
        check_integer("holdout_refine_steps", self.holdout_refine_steps, 0)
        # LossWeights refuses negative weights (None: resolved from the scan later).
        self._loss_weights(*(default if value is None else value for value, default in
                             ((self.sparsity, SPARSITY), (self.gm_charge, 0.0),
                              (self.csf_charge, 0.0))))

    def recipe(self, finetune):
        """The learning rate and batch size that train, None resolved.

        Parameters
        ----------
        finetune : bool
            Fine-tuning the pretrained correction (:data:`FINETUNE_RECIPE`),
            or a network trained from scratch (:data:`SCRATCH_RECIPE`).

        Returns
        -------
        recipe : dict
            ``lr`` and ``batch_size``.
        """
        defaults = FINETUNE_RECIPE if finetune else SCRATCH_RECIPE
        return {name: defaults[name] if getattr(self, name) is None else getattr(self, name)
                for name in ("lr", "batch_size")}

    @property
    def loss_weights(self):
        """The weights of the loss terms, as :class:`LossWeights`."""
        for name in ("sparsity", "gm_charge", "csf_charge"):
            if getattr(self, name) is None:
                raise ValueError(f"{name}=None stands for the scan's default: resolve it with "
                                 "esdmri.reconst.models.scan_defaults(config, gtab) (the "
                                 "models do) or give a weight")
        return self._loss_weights(self.sparsity, self.gm_charge, self.csf_charge)

    def _loss_weights(self, sparsity, gm_charge, csf_charge):
        return LossWeights(sparsity=sparsity, nonnegativity=self.nonnegativity,
                           total_variation=self.train_tv, tv_form=self.train_tv_form,
                           gm_charge=gm_charge, csf_charge=csf_charge)


@dataclass(frozen=True)
class RefinementConfig:
    """The descent of the loss from the network's output (:mod:`esdmri.reconst.refine`).

    Parameters
    ----------
    refine_steps : int
        Most steps of descent of the same loss, plus a total variation
        between neighbouring voxels (``refine_tv``), from the network's
        output (rotation equivariant). 0 keeps the network's output as is.
        Where the accuracy comes from: docs/benchmarks.md, "Spatial context"
        (dev phantoms) and the held-out section (the old voxel-wise
        refinement's test scores).
    refine_lr : float
        ``refine_method="adam"``: its step size; ``"lbfgs"``: the root mean
        square change of the coefficients in its first step.
    refine_tv : float or None
        Weight of the total variation between neighbouring voxels' tissue
        coefficients inside the refinement, relative to the Gaussian
        likelihood of the signal with a noise level estimated from the data
        (so one value serves every SNR; 0: voxel by voxel). None (default):
        the models resolve it from the scan's gtab
        (:func:`default_refine_tv`): 10, chosen on the dev set of five
        phantom families (docs/benchmarks.md, "Accuracy per phantom
        family"): at the objective's minimum, 20 merged crossing voxels into
        their single-fibre neighbours at SNR 10 (where the likelihood scaling
        makes the coupling 4x stronger than at SNR 20); 5 on a single shell.
    refine_smoothing : float
        Coefficient-difference scale below which that total variation is
        quadratic (it is linear above).
    refine_similarity : bool
        Couple neighbours less where their measured signals differ by more
        than noise (:func:`esdmri.reconst.refine.signal_similarity`).
    refine_tolerance : float
        Stop the refinement once its objective falls by less than this
        fraction in 10 steps (0: always ``refine_steps`` steps). 1e-3 stopped
        at steps 70-90 on the dev phantoms, before the fODFs had settled.
    refine_likelihood_tolerance : float
        Stop the refinement also once its objective falls by less than this
        many nats of Gaussian log-likelihood per voxel in 10 steps, with the
        noise level estimated from the data
        (:func:`esdmri.reconst.refine.refine_coefficients`'s
        ``likelihood_tolerance``; 0: the relative ``refine_tolerance`` alone,
        the rule before issue 28's fifth stop). 0.01, chosen on the dev set
        (docs/benchmarks.md, "Refinement solver and stage profile"): every
        dev cell's crossing error within 0.1 degree and false-negative rate
        within 0.005 of the relative rule's, or better; 0.02 and 0.05 lost
        45-degree crossings at SNR 10. The relative rule asks a scan for a
        fall of about ``refine_tolerance * N / 2`` nats per voxel (``N``
        measurements), 0.01 on the dev acquisition, 0.005 on a 100-volume
        clinical one, where this rule stops first.
    refine_method : str
        Solver of the refinement: ``"lbfgs"`` (limited-memory BFGS with a
        line search) or ``"adam"`` (the fixed-rate Adam with a second moment
        per SH degree); see :func:`esdmri.reconst.refine.refine_coefficients`.
    refine_active_set : float
        Hold the voxels whose coefficients moved by less than this fraction
        of their norm in 10 steps, and go on over the others
        (:func:`esdmri.reconst.refine.refine_coefficients`'s ``active_set``,
        in ``[0, 1)``; 0: every voxel every step). 1e-3 was chosen on the 40^3
        dev phantom (docs/benchmarks.md, "Active set"): its refinement took
        0.81x the full solve's CPU time (one thread) to the same objective,
        crossing error within 0.02 degree; on the clinical-size scan the fit
        took 0.45-0.56x the full solve's time (two threads, idle machine) to a
        lower objective with the same crossing scores; the dev switch rule
        passed.
    """

    refine_steps: int = 300
    refine_lr: float = 1e-3
    refine_tv: Optional[float] = None
    refine_smoothing: float = 1e-3
    refine_similarity: bool = False
    refine_tolerance: float = 1e-4
    refine_likelihood_tolerance: float = 0.01
    refine_method: str = "lbfgs"
    refine_active_set: float = 1e-3

    def solver_options(self):
        """These settings as :func:`esdmri.reconst.refine.refine_coefficients`'s options.

        Returns
        -------
        options : dict
            ``steps``, ``lr``, ``total_variation``, ``smoothing``,
            ``similarity``, ``tolerance``, ``likelihood_tolerance``, ``method`` and
            ``active_set``.
        """
        if self.refine_tv is None:
            raise ValueError("refine_tv=None stands for the scan's default: resolve it with "
                             "esdmri.reconst.models.scan_defaults(config, gtab) first")
        return dict(steps=self.refine_steps, lr=self.refine_lr, total_variation=self.refine_tv,
                    smoothing=self.refine_smoothing, similarity=self.refine_similarity,
                    tolerance=self.refine_tolerance,
                    likelihood_tolerance=self.refine_likelihood_tolerance,
                    method=self.refine_method, active_set=self.refine_active_set)

    def __post_init__(self):
        check_integer("refine_steps", self.refine_steps, 0)
        if self.refine_method not in REFINEMENT_METHODS:
            raise ValueError(f"refine_method must be one of {REFINEMENT_METHODS}, "
                             f"got {self.refine_method!r}")
        if not self.refine_lr > 0:
            raise ValueError(f"refine_lr must be > 0, got {self.refine_lr}")
        for name in ("refine_tv", "refine_tolerance", "refine_likelihood_tolerance"):
            if name == "refine_tv" and self.refine_tv is None:
                continue
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.refine_smoothing > 0:
            raise ValueError(f"refine_smoothing must be > 0, got {self.refine_smoothing}")
        if not 0 <= self.refine_active_set < 1:
            raise ValueError(f"refine_active_set must be in [0, 1), got {self.refine_active_set}")


# Options whose group-training defaults (esdmri.reconst.group.train_group)
# differ from a single-scan fit's: a single-scan fit trains nothing by default
# (TrainingConfig.epochs), while group training is asked for by name; a cohort
# has blocks enough for larger steps; it trains a network from scratch (the
# pretrained correction is fine-tuned on one scan only).
GROUP_OPTIONS = {"epochs": 30, "batch_size": 4, "pretrained": False}

# Option name -> the part of DeconvolutionConfig that holds it.
_PARTS = {"network": NetworkConfig, "training": TrainingConfig, "refinement": RefinementConfig}
OPTION_PARTS = {f.name: part for part, cls in _PARTS.items() for f in dataclasses.fields(cls)}


def option_defaults():
    """Default of every keyword option of the models.

    Returns
    -------
    defaults : dict of str -> object
        Option name -> default, network options first, then training and
        refinement.
    """
    return {f.name: f.default for cls in _PARTS.values() for f in dataclasses.fields(cls)}


# Former names of the models' convolution kinds, which model files and
# checkpoints written before esdmri 0.2 hold: RT-ESD's was "mixed", then
# "mixed-stem" (UNet's "mixed", now "e3so3", has E(3) x SO(3) convolutions
# at every level, RT-ESD only in its stem).
FORMER_CONV_KINDS = {"mixed": "e3so3-stem", "mixed-stem": "e3so3-stem"}


def canonical_conv_kind(conv_kind):
    """The current name of a model's convolution kind (see :data:`FORMER_CONV_KINDS`)."""
    return FORMER_CONV_KINDS.get(conv_kind, conv_kind)


@dataclass(frozen=True)
class DeconvolutionConfig:
    """Hyperparameters of a deconvolution model (saved with its weights).

    Parameters
    ----------
    conv_kind : str
        Convolution of the network (the model class's).
    network : NetworkConfig
    training : TrainingConfig
    refinement : RefinementConfig
    """

    conv_kind: str
    network: NetworkConfig = field(default_factory=NetworkConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)

    def __post_init__(self):
        object.__setattr__(self, "conv_kind", canonical_conv_kind(self.conv_kind))
        if self.training.epochs == 0 and not self.network.linear_prior:
            raise ValueError("epochs=0 (the default) needs linear_prior=True: an untrained "
                             "network without the prior outputs noise; give epochs=N to "
                             "train it")

    @classmethod
    def from_options(cls, conv_kind, **options):
        """The configuration of some keyword options, defaults for the others.

        Parameters
        ----------
        conv_kind : str
        **options
            Fields of :class:`NetworkConfig`, :class:`TrainingConfig` and
            :class:`RefinementConfig`.

        Returns
        -------
        config : DeconvolutionConfig
        """
        return cls(conv_kind).replace(**options)

    def replace(self, **options):
        """A validated copy with some options changed.

        Parameters
        ----------
        **options
            Fields of :class:`NetworkConfig`, :class:`TrainingConfig` and
            :class:`RefinementConfig`.

        Returns
        -------
        config : DeconvolutionConfig

        Raises
        ------
        TypeError
            For a name that is no option.
        """
        options = renamed_options(options, RENAMED_OPTIONS, since="0.2", stacklevel=4)
        unknown = sorted(set(options) - set(OPTION_PARTS))
        if unknown:
            raise TypeError(f"unknown model option(s) {unknown}; expected some of "
                            f"{sorted(OPTION_PARTS)}")
        parts = {}
        for part in _PARTS:
            changes = {name: value for name, value in options.items()
                       if OPTION_PARTS[name] == part}
            parts[part] = dataclasses.replace(getattr(self, part), **changes)
        return dataclasses.replace(self, **parts)

    def options(self):
        """Every option with its value.

        Returns
        -------
        options : dict of str -> object
        """
        return {name: getattr(getattr(self, part), name) for name, part in OPTION_PARTS.items()}

    def to_dict(self):
        """The configuration as the plain dict model files and checkpoints store.

        Options sit at the top level next to ``conv_kind``, the loss weights
        under ``loss_weights`` (the layout of model format 3).

        Returns
        -------
        saved : dict
        """
        saved = {"conv_kind": self.conv_kind}
        saved.update((name, value) for name, value in self.options().items()
                     if name not in LOSS_WEIGHT_OPTIONS)
        saved["loss_weights"] = dataclasses.asdict(self.training.loss_weights)
        return saved

    @classmethod
    def from_dict(cls, saved):
        """The configuration of :meth:`to_dict`.

        Options the dict lacks take their defaults, so files written before
        an option existed (``mask_fraction``: trained without it) still load.

        Parameters
        ----------
        saved : dict

        Returns
        -------
        config : DeconvolutionConfig
        """
        saved = dict(saved)
        weights = saved.pop("loss_weights")  # intensity is always 1
        # Networks saved before the option existed have batch norm's weights.
        saved.setdefault("norm", "batch")
        # Fits of files saved before the shipped weights existed stay network-free.
        saved.setdefault("pretrained", False)
        # Corrections fine-tuned before the hold-out existed kept the evaluation loss's pick.
        saved.setdefault("holdout", 0.0)
        # Fits saved before the charges on the isotropic fractions existed had none.
        weights = {"gm_charge": 0.0, "csf_charge": 0.0, **weights}
        return cls.from_options(saved.pop("conv_kind"), **saved,
                                **{name: weights[weight]
                                   for name, weight in LOSS_WEIGHT_OPTIONS.items()
                                   if weight in weights})


# Training options that become the loss weights: option -> LossWeights field.
LOSS_WEIGHT_OPTIONS = {"sparsity": "sparsity", "nonnegativity": "nonnegativity",
                       "train_tv": "total_variation", "train_tv_form": "tv_form",
                       "gm_charge": "gm_charge", "csf_charge": "csf_charge"}

# Deprecated option names -> their names now.
RENAMED_OPTIONS = {"total_variation": "train_tv"}


def options_docstring():
    """The numpydoc entries of every option, from the configuration classes' docstrings.

    Returns
    -------
    text : str
        The Parameters entries of :class:`NetworkConfig`,
        :class:`TrainingConfig` and :class:`RefinementConfig`, each type
        followed by its default, indented for a class docstring.
    """
    defaults = option_defaults()

    def with_default(match):
        names = match.group(1).split(", ")
        values = ", ".join(repr(defaults[name]) for name in names)
        return f"{match.group(0)}, default{'s' if len(names) > 1 else ''} {values}"

    entries = []
    for cls in _PARTS.values():
        doc = inspect.cleandoc(cls.__doc__)
        section = re.search(r"Parameters\n-+\n(.*)", doc, re.S).group(1).rstrip()
        entries.append(re.sub(r"^(\w+(?:, \w+)*) : [^\n]+", with_default, section, flags=re.M))
    return "\n".join(entries).replace("\n", "\n    ")
