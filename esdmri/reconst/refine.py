"""Refinement of fODFs on the unsupervised loss, coupled between neighbouring voxels.

A network trained for a few thousand steps is an amortised, approximate
minimiser of the deconvolution loss (Elaldi et al., IPMI 2021): measured on the phantoms, the
minimum of the same loss resolves crossings that neither the network nor CSD
does (docs/benchmarks.md). The refinement starts from the linear prior's or
the network's coefficients and descends that loss on the measured signal (not
the grid interpolation), plus a total variation between face-neighbouring
voxels (``refine_tv``, on by default), so neighbours inform each fODF; with
``refine_tv=0`` each voxel is refined on its own signal.

The default solver is a projected limited-memory BFGS with a backtracking
line search on the whole coefficient field (:func:`refine_coefficients`,
``method="lbfgs"``): its scalars are Euclidean inner products of coefficient
fields, which a rotation acting orthogonally within each SH degree leaves
unchanged, so every step commutes with rotations. The fixed-rate alternative
(``method="adam"``, the default before) is Adam with its second moment shared
by the ``2l + 1`` coefficients of each SH degree (and per isotropic tissue):
the squared gradient norm of a degree is rotation invariant, so its updates
commute with rotations too, which plain Adam's per-coefficient scaling does
not. L-BFGS starts each step's inverse Hessian from the signal term's own
curvature (:func:`signal_preconditioner`, the same for every voxel), which
rotates with the gradient table. Both keep the model's equivariance up to
the sampling of the sparsity terms on the HEALPix grid; L-BFGS reaches a
lower objective in a third of Adam's evaluations, and its preconditioned form
in two thirds of the plain one's (docs/benchmarks.md). Voxels that have stopped
moving are held while L-BFGS goes on over the others (:class:`ActiveSet`), each
evaluation costing in proportion to the active voxels: on a clinical-size scan
the refinement took half the evaluation cost to a lower objective.
"""

import copy

import numpy as np
import torch
from tqdm.auto import tqdm

from ..peaks import sh_order_from_coeffs
from ..shm import sh_degrees
from ..threads import adapt_num_threads, sync_numba_threads
from . import fused_objective, fused_solver, sampler_parity
from .config import REFINEMENT_METHODS
from .fused_solver import (axpy_dot, finish_direction, held_coefficients, pair_difference,
                           start_direction, trial_point)
from .losses import CAUCHY_SIGMA, difference_operators, neighbour_pairs, total_variation
from .network import NORMALIZATION_FLOOR, volume_fractions_from_coefficients
from .rician import RicianVoxelLoss

# Adam's moment decay rates and the floor of its denominator.
_BETAS = (0.9, 0.999)
_EPSILON = 1e-8


def degree_groups(sh_order_max, n_isotropic):
    """Group of each coefficient: one per WM SH degree, one per isotropic tissue.

    Returns
    -------
    groups : ndarray of int, shape (C_wm + n_isotropic,)
    """
    degrees = sh_degrees(sh_order_max) // 2
    return np.concatenate([degrees, degrees.max() + 1 + np.arange(n_isotropic)])


class DegreeAdam:
    """Adam whose second moment is averaged within coefficient groups.

    Parameters
    ----------
    parameter : Tensor, shape (n, C)
        One row per voxel; updated in place by :meth:`step`.
    groups : ndarray of int, shape (C,)
        Group of each column (:func:`degree_groups`).
    lr : float
    """

    def __init__(self, parameter, groups, lr):
        self.parameter = parameter
        self.lr = lr
        self.groups = torch.as_tensor(groups, device=parameter.device)
        self.counts = torch.bincount(self.groups).to(parameter.dtype)
        self.first = torch.zeros_like(parameter)
        self.second = parameter.new_zeros((parameter.shape[0], len(self.counts)))
        self.steps = 0

    @torch.no_grad()
    def step(self, grad):
        """One update from ``grad``, shape (n, C)."""
        beta1, beta2 = _BETAS
        self.steps += 1
        self.first.mul_(beta1).add_(grad, alpha=1 - beta1)
        group_square = self.second.new_zeros(self.second.shape).index_add_(
            1, self.groups, grad * grad) / self.counts
        self.second.mul_(beta2).add_(group_square, alpha=1 - beta2)
        first = self.first / (1 - beta1**self.steps)
        second = (self.second / (1 - beta2**self.steps))[:, self.groups]
        self.parameter.sub_(self.lr * first / (second.sqrt() + _EPSILON))


def _squared_norms(rows):
    """Squared Euclidean norm of each row, in float64."""
    return torch.linalg.vector_norm(rows, dim=1).double().square_()


class VoxelLoss:
    """Each voxel's loss (the ESD loss without total variation) and its gradient, fused.

    The loss of a voxel with coefficients ``c`` and measured signal ``y``
    (:func:`esdmri.reconst.training.coefficient_loss` of one voxel; tests
    check one against the other) is

    ``w_i / N |F^T c - y|^2 + w_s / V sum_v 2 log(1 + f_v^2 / (2 sigma))
    + w_n / V sum_v min(f_v, 0)^2``,  ``f = S c_wm``,

    with ``F`` the forward matrix (``C x N``) and ``S`` the sampler (``V x
    C_wm``). The signal term goes through the reduced QR factorisation
    ``F^T = Q R`` (``Q``: ``N x k`` orthonormal, ``k = min(N, C)``):
    ``|F^T c - y|^2 = |R c - Q^T y|^2 + (|y|^2 - |Q^T y|^2)``, so each
    evaluation multiplies by the ``k x C`` matrix ``R`` instead of the ``N x
    C`` forward matrix, ``Q^T y`` and the constant are computed once per voxel
    (:meth:`project`), and the residual's norm keeps its precision (unlike
    the Gram form ``c^T F F^T c - 2 c^T F y + |y|^2``, whose terms cancel).
    ``R`` and the sampler are stacked into one ``C x (k + V)`` operator, so an
    evaluation is one matrix product forward, a few in-place passes over its
    result, and one product back. On a CPU the passes are one fused kernel
    (:func:`esdmri.reconst.fused_objective.voxel_terms`; ``fused``), and
    with the coefficients in the sampler's parity-class order
    (:func:`esdmri.reconst.sampler_parity.parity_order`) the products are
    split into quarter-size blocks (``split``). With the split, a caller that
    keeps a reference point per voxel (:meth:`reference_state`, passed as
    ``reference``) gets the residual's gradient and norm by increments from
    it, through the Gram matrix ``G = R^T R`` applied to the step: one
    product instead of two, and the norm's terms are small, so they do not
    cancel (``incremental``).

    Parameters
    ----------
    forward_matrix : Tensor, shape (C_total, N)
    fodf_sampler : Tensor, shape (V, C_wm)
        Its device and dtype are the evaluation's.
    n_wm_coeffs : int
    weights : LossWeights

    Attributes
    ----------
    fused : bool
        Whether evaluations run the fused CPU pass
        (:func:`esdmri.reconst.fused_objective.fused_on` at construction:
        on a CPU unless turned off); else torch's passes.
    split : ParitySplit or None
        The products by parity class
        (:meth:`esdmri.reconst.sampler_parity.ParitySplit.from_operator`):
        when ``fused`` and the sampler's classes are contiguous columns.
    incremental : bool
        Whether calls take a ``reference``: with ``split``, where ``G``'s
        product costs less than ``R``'s two (``C_total < 2 k``).
    """

    def __init__(self, forward_matrix, fodf_sampler, n_wm_coeffs, weights):
        device, dtype = fodf_sampler.device, fodf_sampler.dtype
        n_coefficients, self.n_measurements = forward_matrix.shape
        # In float64 (on the CPU: the matrix is small): the factors, then the signal's
        # projection, keep float32's digits.
        basis, triangle = torch.linalg.qr(forward_matrix.T.to("cpu", torch.float64),
                                          mode="reduced")
        self.basis = basis.to(device)
        self.rank = triangle.shape[0]
        self.n_samples = fodf_sampler.shape[0]
        operator = torch.zeros((n_coefficients, self.rank + self.n_samples), dtype=dtype,
                               device=device)
        operator[:, :self.rank] = triangle.T.to(dtype)
        operator[:n_wm_coeffs, self.rank:] = fodf_sampler.T
        self.operator, self.operator_t = operator, operator.T.contiguous()
        scale = 1.0 / self.n_samples
        self.residual_scale = 2 * weights.intensity / self.n_measurements
        # d/df of 2 log(1 + f^2 / (2 sigma)) is (2 / sigma) f / (1 + f^2 / (2 sigma)).
        self.sparsity_scale = 2 * weights.sparsity * scale / CAUCHY_SIGMA
        self.negative_scale = 2 * weights.nonnegativity * scale
        self.spread_scale = 0.5 / CAUCHY_SIGMA
        # The loss's weights of the squared residual, the squared negative part and the logs.
        self.loss_scales = (weights.intensity / self.n_measurements,
                            weights.nonnegativity * scale, 2 * weights.sparsity / self.n_samples)
        self.fused = fused_objective.fused_on(operator)
        # With the coefficients in parity-class order (refine_coefficients), the
        # sampler's products split into quarter-size blocks (esdmri.reconst.sampler_parity).
        self.split = (sampler_parity.ParitySplit.from_operator(operator, self.rank, n_wm_coeffs)
                      if self.fused and sampler_parity.ENABLED else None)
        self.incremental = self.split is not None and self.split.gram is not None

    def project(self, measured):
        """What the loss needs of the measured signal: ``Q^T y`` and the rest of ``|y|^2``.

        Parameters
        ----------
        measured : Tensor, shape (n, N)

        Returns
        -------
        projected : Tensor, shape (n, k)
            In the evaluation's dtype.
        constant : Tensor, float64, shape (n,)
            ``|y|^2 - |Q^T y|^2``, the squared residual no coefficients reach.
        """
        signal = measured.to(device=self.basis.device, dtype=torch.float64)
        projected = signal @ self.basis
        constant = ((signal * signal).sum(dim=1) - (projected * projected).sum(dim=1)).clamp_min(0)
        return projected.to(self.operator.dtype), constant

    def reference_state(self, coefficients, projected):
        """The state at ``coefficients`` that calls with ``reference`` start from.

        Only when :attr:`incremental`
        (:meth:`esdmri.reconst.sampler_parity.ParitySplit.reference_state`).

        Parameters
        ----------
        coefficients : Tensor, shape (n, C_total)
        projected : Tensor, shape (n, k)
            :meth:`project`'s first output.

        Returns
        -------
        reference : tuple of Tensor
            Shapes (n, C_total), (n, C_total) and (n,).
        """
        self._check_incremental()
        return self.split.reference_state(coefficients, projected)

    def _check_incremental(self):
        """A ValueError unless :attr:`incremental`: no reference state without ``G``."""
        if not self.incremental:
            raise ValueError("reference needs an incremental VoxelLoss (the fused CPU "
                             "evaluation with the parity split and C_total < 2 k); "
                             "this one evaluates from R: call it without reference")

    def __call__(self, coefficients, projected, constant, out=None, return_loss=False,
                 reference=None):
        """Gradient of each voxel's loss, and the loss.

        Parameters
        ----------
        coefficients : Tensor, shape (n, C_total)
        projected, constant : Tensor
            :meth:`project` of the voxels' measured signals.
        out : Tensor, shape (n, C_total), optional
            Where the gradient is written.
        return_loss : bool, optional
            Also return each voxel's loss.
        reference : tuple of Tensor, optional
            With :attr:`incremental`: the voxels' rows of a
            :meth:`reference_state`, from which the signal term is evaluated
            by increments (``projected`` is then not read); they move to
            ``coefficients``.

        Returns
        -------
        gradient : Tensor, shape (n, C_total)
        loss : Tensor, float64, shape (n,)
            Only with ``return_loss``.
        """
        if reference is not None:
            self._check_incremental()
            return self.split.evaluate_from(self, coefficients, reference, constant, out,
                                            return_loss)
        if self.split is not None:
            return self.split.evaluate(self, coefficients, projected, constant, out, return_loss)
        if self.fused:
            return fused_objective.evaluate_voxel_terms(self, coefficients, projected, constant,
                                                        out, return_loss)
        mapped = coefficients @ self.operator
        residual, samples = mapped[:, :self.rank], mapped[:, self.rank:]
        residual.sub_(projected)
        # 1 + f^2 / (2 sigma), the Cauchy penalty's argument.
        spread = torch.addcmul(torch.ones((), dtype=samples.dtype, device=samples.device),
                               samples, samples, value=self.spread_scale)
        negative = samples.clamp(max=0)
        if return_loss:
            residual_weight, negative_weight, log_weight = self.loss_scales
            loss = (residual_weight * (_squared_norms(residual) + constant)
                    + negative_weight * _squared_norms(negative))
        residual.mul_(self.residual_scale)
        torch.addcdiv(negative.mul_(self.negative_scale), samples, spread,
                      value=self.sparsity_scale, out=samples)
        gradient = torch.mm(mapped, self.operator_t, out=out)
        if not return_loss:
            return gradient
        loss += log_weight * spread.log_().sum(dim=1).double()
        return gradient, loss


def voxel_loss_gradient(coefficients, measured, forward_matrix, fodf_sampler, n_wm_coeffs,
                        weights, return_loss=False):
    """Gradient of each voxel's loss (the ESD loss without total variation).

    Written out rather than taken by autograd (:class:`VoxelLoss`).

    Parameters
    ----------
    coefficients : Tensor, shape (n, C_total)
    measured : Tensor, shape (n, N)
    forward_matrix : Tensor, shape (C_total, N)
    fodf_sampler : Tensor, shape (V_dense, C_wm)
    n_wm_coeffs : int
    weights : LossWeights
    return_loss : bool, optional
        Also return each voxel's loss.

    Returns
    -------
    gradient : Tensor, shape (n, C_total)
    loss : Tensor, shape (n,)
        Only with ``return_loss``; in the coefficients' dtype.
    """
    voxel_loss = VoxelLoss(forward_matrix, fodf_sampler, n_wm_coeffs, weights)
    result = voxel_loss(coefficients, *voxel_loss.project(measured), return_loss=return_loss)
    if not return_loss:
        return result
    return result[0], result[1].to(coefficients.dtype)


# Neighbour pairs per chunk of pair_distances.
_PAIR_CHUNK = 16384


def pair_distances(signal_values, first, second):
    """Mean squared difference of the measured signals of each neighbour pair.

    Parameters
    ----------
    signal_values : Tensor, shape (n, N)
    first, second : Tensor of int, shape (P,)

    Returns
    -------
    distances : Tensor, shape (P,)
    """
    distances = signal_values.new_empty(len(first))
    # In chunks of pairs: the brain's 650k pairs x 100 measurements in one go made four
    # 260 MB temporaries (0.35 s); each pair's mean is the same either way.
    for start in range(0, len(first), _PAIR_CHUNK):
        pairs = slice(start, start + _PAIR_CHUNK)
        torch.mean((signal_values[first[pairs]] - signal_values[second[pairs]]).square_(),
                   dim=1, out=distances[pairs])
    return distances


def noise_variance(distances):
    """Noise variance per measurement from neighbour-pair signal distances.

    Most face neighbours lie in the same tissue, where two signals differ by
    noise alone and their mean squared difference is about ``2 sigma^2``; the
    median over pairs ignores the borders. Measured on the dev phantoms
    (b0-normalised signal, SNR 10 / 20 / 30): 0.0087 / 0.0026 / 0.0012
    against 0.01 / 0.0025 / 0.0011 for ``(1 / SNR)^2``.

    Parameters
    ----------
    distances : Tensor, shape (P,)
        :func:`pair_distances`.

    Returns
    -------
    variance : float
    """
    return max(float(distances.median()) / 2, float(torch.finfo(distances.dtype).tiny))


def coupling_scale(variance, n_measurements):
    """The total variation's weight per unit ``refine_tv``: ``2 sigma^2 / N``.

    A voxel's signal term is its mean squared residual, ``2 sigma^2 / N``
    times the Gaussian negative log-likelihood: in those units the spatial
    term has weight ``refine_tv`` whatever the SNR and ``N``.

    Parameters
    ----------
    variance : float
        :func:`noise_variance`.
    n_measurements : int
        ``N``, the measurements per voxel.

    Returns
    -------
    scale : float
    """
    return 2 * variance / n_measurements


def signal_similarity(distances, variance):
    """Weight of each neighbour pair from how alike its two measured signals are.

    ``w = exp(-d^2 / (4 sigma^2))``: neighbours in the same tissue differ by
    noise alone (``d^2`` about ``2 sigma^2``, weight about ``exp(-1/2)``), a
    border between tissues or bundles differs by more and is coupled less.
    ``d`` is a norm over the measurements, so rotating the gradient table
    leaves the weights as they are.

    Parameters
    ----------
    distances : Tensor, shape (P,)
        :func:`pair_distances`.
    variance : float
        :func:`noise_variance`.

    Returns
    -------
    weights : Tensor, shape (P,)
    """
    return torch.exp(-distances / (4 * variance))


def signal_preconditioner(forward_matrix, weights, damping):
    """Inverse of the signal term's Hessian plus a damping: L-BFGS's initial inverse Hessian.

    Every voxel's signal term ``w_i / N |F^T c - y|^2`` has the Hessian ``H =
    2 w_i / N F F^T`` (``C x C``), the same in every voxel. Its eigenvalues
    span ten orders of magnitude (the deconvolution's ill-conditioning: on
    the dev acquisition 2e-10 to 6.4, mean diagonal 0.076); the largest
    belongs to the voxel's total signal (the WM l = 0 coefficient and the
    isotropic tissues together), a stiff direction that holds a plain L-BFGS
    back. ``(H + mu I)^-1`` with ``mu = damping * mean diag(H)`` damps the
    directions above ``mu`` (at the default damping, that one) and leaves the
    rest, where the sparsity and spatial terms set the curvature, at a
    multiple of the identity.

    Parameters
    ----------
    forward_matrix : Tensor, shape (C, N)
    weights : LossWeights
    damping : float
        ``mu`` in units of the mean diagonal of ``H``.

    Returns
    -------
    preconditioner : Tensor, float64, shape (C, C)
        Symmetric positive definite; on the CPU.

    Notes
    -----
    Rotating the gradient table rotates ``F F^T`` within each SH degree
    (``D F F^T D^T``, ``D`` orthogonal), and the preconditioner with it, so
    the solver still commutes with rotations of the scan.
    """
    matrix = forward_matrix.to("cpu", torch.float64)
    hessian = (2 * weights.intensity / matrix.shape[1]) * (matrix @ matrix.T)
    mu = damping * float(hessian.diagonal().mean())
    return torch.linalg.inv(hessian + mu * torch.eye(len(hessian), dtype=torch.float64))


def coefficient_degrees(n_wm_coeffs, n_coefficients):
    """Each coefficient column's SH degree: the WM fODF's, then 0 for each isotropic tissue.

    Parameters
    ----------
    n_wm_coeffs : int
        The WM fODF's coefficients, ``(L + 1)(L + 2) / 2`` for an even order ``L``.
    n_coefficients : int

    Returns
    -------
    degrees : ndarray of int, shape (n_coefficients,)
    """
    return np.concatenate([sh_degrees(sh_order_from_coeffs(n_wm_coeffs)),
                           np.zeros(n_coefficients - n_wm_coeffs, int)])


class Preconditioner:
    """L-BFGS's initial inverse Hessian ``P`` (:func:`signal_preconditioner`), voxel by voxel.

    ``P`` is a multiple of the identity but on the low SH degrees (the
    signal term's stiff directions: the total signal, then degree 2, 4, ...;
    the forward model's response falls with the degree), so with
    ``tolerance > 0`` it is applied as ``p (I - M)``: ``p`` its largest
    eigenvalue, ``M = I - P / p`` kept on the columns of the degrees where
    its diagonal exceeds ``tolerance`` somewhere (the isotropic tissues go
    with degree 0) and zero elsewhere. Each voxel's kept coefficients go
    through an ``r x r`` product instead of the ``C x C`` one (on a CPU one
    fused pass, :func:`esdmri.reconst.fused_solver.block_apply`). With
    ``tolerance=0`` the matrix itself is applied (a dense product).

    Parameters
    ----------
    matrix : Tensor, shape (C, C)
        Symmetric positive definite.
    tolerance : float, optional
        In ``[0, 1)``.
    degrees : array of int, shape (C,), optional
        Each column's SH degree (0 for the isotropic tissues); needed with
        ``tolerance > 0``.
    device, dtype : optional
        Those of the fields it is applied to (default: the matrix's).

    Attributes
    ----------
    rank : int or None
        ``r``, the kept columns (None with ``tolerance=0``).

    Notes
    -----
    A rotation of the gradient table rotates ``P`` within each SH degree and
    keeps its eigenvalues, and a permutation of the columns permutes it: the
    kept degrees, ``p`` and ``M``'s block follow exactly (no eigenvectors are
    chosen), so the solver still commutes with both.
    """

    def __init__(self, matrix, tolerance=0.0, degrees=None, device=None, dtype=None):
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        device = matrix.device if device is None else device
        dtype = matrix.dtype if dtype is None else dtype
        self.matrix = self.columns = self.block = None
        self.rank = None
        if tolerance == 0:
            self.matrix = matrix.to(device, dtype)
            return
        if degrees is None or len(degrees) != len(matrix):
            raise ValueError(f"degrees must give the SH degree of each of the {len(matrix)} "
                             "columns with tolerance > 0")
        matrix = matrix.to("cpu", torch.float64)
        self.scale = float(torch.linalg.eigvalsh(matrix).max())
        deficit = torch.eye(len(matrix), dtype=torch.float64) - matrix / self.scale  # M
        degrees = np.asarray(degrees)
        diagonal = deficit.diagonal().numpy()
        kept = np.isin(degrees, [d for d in np.unique(degrees)
                                 if diagonal[degrees == d].max() > tolerance])
        columns = torch.as_tensor(np.flatnonzero(kept))
        self.rank = len(columns)
        self.columns = columns.to(device)
        self.block = deficit[columns][:, columns].contiguous().to(device, dtype)

    def apply(self, field, out, alpha=1.0):
        """``alpha P field`` row by row, written to ``out`` (not ``field``); returns ``out``."""
        if self.matrix is not None:
            if alpha == 1.0:
                return torch.mm(field, self.matrix, out=out)
            return out.addmm_(field, self.matrix, beta=0, alpha=alpha)
        return fused_solver.block_apply(out, field, self.columns, self.block, alpha * self.scale)

    def quadratic(self, field, work):
        """``sum_i x_i . P x_i`` over the rows of ``field`` (``work``: a spare field)."""
        if self.matrix is not None:
            return torch.vdot(field.flatten(), self.apply(field, work).flatten())
        return self.scale * fused_solver.block_quadratic(field, self.columns, self.block)


class CoupledObjective:
    """The refinement's objective over the masked voxels and its gradient.

    The sum over voxels of :class:`VoxelLoss` (evaluated in blocks of
    ``batch_voxels`` so that a block's fODF samples stay in cache) plus the
    weighted smoothed total variation between neighbour pairs
    (:func:`esdmri.reconst.losses.total_variation`, through sparse difference
    operators) when ``pair_weights`` is given, plus linear charges on
    isotropic coefficients (``charges``);
    :meth:`restricted` gives it as a function of some voxels, the others
    held. On a CPU the voxel terms' passes and the total variation are fused kernels
    (:mod:`esdmri.reconst.fused_objective`): the total variation of a
    block's voxels is added to their gradient rows right after the block's
    voxel terms, while the rows are in cache. Where the voxel loss is
    ``incremental``, every evaluation starts from the point of the one
    before (the voxels' reference state, made at the first evaluation of
    this objective or of a restriction).

    Parameters
    ----------
    measured : Tensor, shape (n, N)
        Only its projection (:meth:`VoxelLoss.project`) is kept.
    forward_matrix, fodf_sampler, n_wm_coeffs, weights
        As in :class:`VoxelLoss`.
    first, second : Tensor of int, shape (P,)
    pair_weights : Tensor, shape (P,), or None
        None: no spatial term.
    smoothing : float
    batch_voxels : int
    noise_sigma : Tensor, shape (n,), optional
        Each voxel's noise level: the data term is :class:`RicianVoxelLoss`'s.
    charges : sequence of (int, float), optional
        ``(column, charge)``: ``charge`` times each voxel's coefficient in
        ``column`` is added to the objective (:func:`isotropic_charges`).
    """

    def __init__(self, measured, forward_matrix, fodf_sampler, n_wm_coeffs, weights, first,
                 second, pair_weights, smoothing, batch_voxels, noise_sigma=None,
                 charges=()):
        self.voxel_loss = (VoxelLoss(forward_matrix, fodf_sampler, n_wm_coeffs, weights)
                           if noise_sigma is None else RicianVoxelLoss(
                               forward_matrix, fodf_sampler, n_wm_coeffs, weights, noise_sigma,
                               VoxelLoss))
        self.projected, constant = self.voxel_loss.project(measured)
        self.constant = constant
        self.pair_weights = pair_weights
        self.first, self.second = first, second
        self.differences = self.pair_buffer = self.stencil = None
        self.fused = fused_objective.fused_on(fodf_sampler)
        if pair_weights is not None and self.fused:
            self.stencil = fused_objective.TotalVariationStencil(first, second, pair_weights,
                                                                 smoothing, len(measured))
        elif pair_weights is not None:
            self.differences = difference_operators(first, second, len(measured),
                                                    dtype=fodf_sampler.dtype)
            # The pairs' differences, reused by every evaluation (about 3 values per
            # voxel and coefficient: a fresh buffer's page faults cost more than its product).
            self.pair_buffer = torch.empty((len(first), len(forward_matrix)),
                                           dtype=fodf_sampler.dtype,
                                           device=fodf_sampler.device)
        self.smoothing = smoothing
        self.batch_voxels = batch_voxels
        self.charges = tuple(charges)
        self.chunks = [slice(i, i + batch_voxels)
                       for i in range(0, len(measured), batch_voxels)]
        # Evaluations, and voxels evaluated, by this objective and its restrictions.
        self.tally = [0, 0]
        # A restriction's whole local field (its rows, then their held neighbours)
        # and the held voxels' share of the objective (:meth:`restricted`).
        self.field, self.offset = None, 0.0
        # The voxel terms' reference state (VoxelLoss.reference_state), from the first call.
        self.reference = None

    @property
    def evaluations(self):
        """Evaluations made, by this objective and every restriction of it."""
        return self.tally[0]

    @property
    def evaluated_voxels(self):
        """Voxels evaluated, summed over :attr:`evaluations`."""
        return self.tally[1]

    def restricted(self, rows, field):
        """The objective as a function of some voxels, the others held at ``field``'s values.

        Its value is the whole objective's (the held voxels' terms and the
        total variation of the pairs between them are :attr:`offset`, which
        the caller sets); its gradient is the whole gradient's ``rows``. An
        evaluation costs in proportion to ``len(rows)``: the voxel terms of
        ``rows``, and the total variation of the pairs with an end in
        ``rows``, over a local field of ``rows`` followed by their held
        neighbours (:attr:`field`, whose first rows each call overwrites).

        Parameters
        ----------
        rows : Tensor of int, shape (k,)
            Increasing rows of this objective's voxels.
        field : Tensor, shape (n, C)
            The whole field: the held voxels' values.

        Returns
        -------
        restricted : CoupledObjective
            Called with the ``(k, C)`` coefficients of ``rows``; it shares
            :attr:`evaluations` with this objective.
        """
        part = copy.copy(self)
        k = len(rows)
        part.projected, part.constant = self.projected[rows], self.constant[rows]
        part.chunks = [slice(i, min(i + self.batch_voxels, k))
                       for i in range(0, k, self.batch_voxels)]
        part.field, part.offset = field[rows], 0.0
        part.reference = None
        if self.pair_weights is None:
            return part
        inside = torch.zeros(len(field), dtype=torch.bool, device=field.device)
        inside[rows] = True
        touched = inside[self.first] | inside[self.second]
        first, second = self.first[touched], self.second[touched]
        ends = torch.cat([first, second])
        held = torch.unique(ends[~inside[ends]])
        local = torch.empty(len(field), dtype=first.dtype, device=field.device)
        local[rows] = torch.arange(k, device=field.device)
        local[held] = torch.arange(k, k + len(held), device=field.device)
        part.field = torch.cat([part.field, field[held]])
        part.first, part.second = local[first], local[second]
        part.pair_weights = self.pair_weights[touched]
        if self.stencil is not None:
            # Only rows 0..k-1 are visited: a pair's norm is computed by its end in
            # rows (held neighbours come after them), the pairs between held voxels are out.
            part.stencil = fused_objective.TotalVariationStencil(
                part.first, part.second, part.pair_weights, self.smoothing, len(part.field))
        else:
            part.differences = difference_operators(part.first, part.second, len(part.field),
                                                    dtype=field.dtype)
            part.pair_buffer = self.pair_buffer.new_empty((len(part.first), field.shape[1]))
        return part

    def __call__(self, coefficients, with_value=True, out=None):
        """Gradient, shape (n, C), and the objective (a float; None without ``with_value``).

        The gradient is written to ``out`` when given (a buffer the solver
        reuses: at brain size a fresh field's page faults cost more than a
        pass over it).
        """
        self.tally[0] += 1
        self.tally[1] += len(coefficients)
        adapt_num_threads()  # the threads that the other processes' load leaves (esdmri.threads)
        if self.fused:
            sync_numba_threads()
        gradient = torch.empty_like(coefficients) if out is None else out
        # What the total variation reads and where torch's adds its gradient: the
        # whole field, or a restriction's local one with its held neighbours.
        field, whole_gradient = coefficients, gradient
        if self.field is not None:
            field = self.field
            field[:len(coefficients)].copy_(coefficients)
            if self.differences is not None:
                whole_gradient = torch.zeros_like(field)
        value = 0.0
        # Only an incremental voxel loss takes a reference (a Rician one has none).
        reference = {}
        if self.voxel_loss.incremental and self.reference is None:
            self.reference = self.voxel_loss.reference_state(coefficients, self.projected)
        for rows in self.chunks:
            if self.reference is not None:
                reference["reference"] = tuple(part[rows] for part in self.reference)
            result = self.voxel_loss(coefficients[rows], self.projected[rows],
                                     self.constant[rows], out=whole_gradient[rows],
                                     return_loss=with_value, **reference)
            if with_value:
                # In float64: the line search compares sums over a whole brain.
                value += float(result[1].sum())
            if self.stencil is not None:
                value += self.stencil.add_gradient(field, gradient, rows)
        if self.differences is not None:
            tv, _ = total_variation(field, self.first, self.second, self.pair_weights,
                                    self.smoothing, gradient=True, operators=self.differences,
                                    differences=self.pair_buffer, add_to=whole_gradient)
            value += float(tv)
            if whole_gradient is not gradient:
                gradient.copy_(whole_gradient[:len(gradient)])
        for column, charge in self.charges:
            # Linear in the coefficient: a constant gradient (one column's pass).
            gradient[:, column] += charge
            if with_value:
                value += charge * float(coefficients[:, column].sum(dtype=torch.float64))
        if self.field is not None:
            value += self.offset
        return (value if with_value else None), gradient


class RefinementHistory(list):
    """The objective (per voxel) every ``check_every`` steps, from the start.

    A list, with why the refinement stopped. L-BFGS also records it where it
    stopped or woke held voxels, and after a wake counts the checks from there.

    Attributes
    ----------
    stop_reason : str
        ``"converged at step N"`` (the tolerance was met, or no step along
        the search direction lowered the objective) or ``"step budget
        reached"``.
    steps : int
        Optimiser steps taken.
    evaluations : int
        Evaluations of the objective and its gradient (a line search may
        take more than one per step).
    evaluations_at : list of int
        The evaluations made when each value was recorded (what a stop at
        that check would have cost).
    full_evaluations : float
        The evaluations weighted by the share of the voxels each evaluated
        (:attr:`evaluations` without an active set).
    active_sizes : list of tuple
        With an active set: ``(evaluations, active voxels)`` at its start
        and at each change (:class:`ActiveSet`); else empty.
    """

    stop_reason = "not run"
    steps = 0
    evaluations = 0
    full_evaluations = 0.0

    def __init__(self):
        super().__init__()
        self.evaluations_at = []
        self.active_sizes = []

    def record(self, value, evaluations):
        """Append ``value``, made after ``evaluations`` evaluations."""
        self.append(value)
        self.evaluations_at.append(evaluations)


def _project(coefficients, n_wm_coeffs):
    """Clamp the isotropic tissues' coefficients (l = 0 constants) to be non-negative."""
    coefficients[:, n_wm_coeffs:].clamp_(min=0)
    return coefficients


def _stalled(history, tolerance, least_fall=0.0):
    """Whether the objective fell too little over the last check window.

    Too little: by less than ``tolerance`` times its value, or by less than
    ``least_fall`` per voxel (the likelihood rule's threshold, in the
    objective's units); either test is off at 0.
    """
    if len(history) < 2 or not (tolerance or least_fall):
        return False
    fall = history[-2] - history[-1]
    return fall < tolerance * abs(history[-2]) or fall < least_fall


def _adam_descent(c, objective, n_wm_coeffs, groups, *, steps, lr, tolerance, least_fall,
                  check_every, history, bar):
    """The fixed-rate degree-grouped Adam descent (``method="adam"``)."""
    optimizer = DegreeAdam(c, groups, lr)
    for step in range(steps + 1):
        check = step % check_every == 0 or step == steps
        value, gradient = objective(c, with_value=check)
        if check:
            history.record(value / len(c), objective.evaluations)
            bar.set_postfix(objective=f"{history[-1]:.6g}", refresh=False)
            if _stalled(history, tolerance, least_fall):
                return step, f"converged at step {step}"
        if step == steps:
            return step, "step budget reached"
        optimizer.step(gradient)
        _project(c, n_wm_coeffs)
        bar.update(1)


# Voxels per block of the per-voxel loss on a CPU, per thread (each thread's share
# stays in its core's cache), and on other devices.
_CPU_BLOCK = 1024
_DEVICE_BLOCK = 65536

# Damping of the L-BFGS preconditioner, in units of the mean diagonal of the
# signal term's Hessian (chosen on the 20^3 and 40^3 dev phantoms, SNR 20: 1 / 3 /
# 10 / 30 took 126 / 125 / 111 / 121 evaluations at 20^3, none 172; 3 / 10 / 30
# took 165 / 113 / 124 at 40^3, none 173; docs/benchmarks.md).
_DAMPING = 10.0

# Preconditioner's tolerance: the SH degrees where I - P / p has a diagonal entry above
# it are kept. On the dev and clinical acquisitions at order 12: degrees 0 (with the
# isotropic tissues), 2 and 4 (17 of 93 columns; degree 4 peaks at 3e-3-5e-3, degree 6
# at 1e-4-2e-4); what is dropped changes P by 1e-4-7e-4 of p (docs/benchmarks.md).
_PRECONDITIONER_TOLERANCE = 1e-3

# Sufficient decrease of the line search (Armijo), its backtracking factor and
# the most halvings of a step before the objective is taken as converged.
_ARMIJO = 1e-4
_BACKTRACK = 0.5
_MAX_HALVINGS = 30

# The active set (ActiveSet) shrinks when at most this share of its voxels still
# moves: a restriction is worth its set-up only if it saves that much.
_SHRINK = 0.8


def _projected_gradient_norms(c, gradient, n_wm_coeffs):
    """Each voxel's gradient norm with the held isotropic coefficients left out."""
    free = gradient.clone()
    free[:, n_wm_coeffs:].masked_fill_(held_coefficients(c, gradient, n_wm_coeffs), 0)
    return torch.linalg.vector_norm(free, dim=1)


class ActiveSet:
    """The voxels that the refinement's L-BFGS still moves (``active_set``).

    At each check the voxels whose coefficients moved by less than
    ``threshold`` times their norm over the last window are held (when at
    most ``_SHRINK`` of the active ones still move); the solver goes on over
    the others, on :meth:`CoupledObjective.restricted`, whose evaluations cost
    in proportion to them. When the stop rule ends the restricted descent, one
    evaluation of the whole objective wakes the held voxels whose projected
    gradient exceeds every active voxel's (so no held voxel is further from
    rest, by that measure, than the active part), and the descent goes on
    until a stop wakes none (waking those above the active voxels' median
    instead woke most of the field again on the 40^3 dev phantom: 147 full
    evaluations against the full solve's 113). Movements and gradients enter as
    Euclidean norms of each voxel's coefficients, compared with thresholds:
    the sets commute with rotations of the scan and of the voxel grid.

    Parameters
    ----------
    objective : CoupledObjective
        The whole objective.
    field : Tensor, shape (n, C)
        The starting field; this object keeps it and writes the iterates'
        active rows back to it (:meth:`gather`).
    threshold : float
        Relative movement per check window below which a voxel is held.
    n_wm_coeffs : int

    Attributes
    ----------
    rows : Tensor of int or None
        The active voxels' rows (None: all).
    sizes : list of tuple
        ``(evaluations, active voxels)`` at each change of the set.
    """

    def __init__(self, objective, field, threshold, n_wm_coeffs):
        self.objective, self.field = objective, field
        self.threshold, self.n_wm_coeffs = threshold, n_wm_coeffs
        self.rows = None
        self.snapshot = field.clone()
        self.sizes = [(objective.evaluations, len(field))]

    def gather(self, c):
        """The whole field with the active rows ``c`` written into it."""
        if self.rows is None:
            return c
        self.field[self.rows] = c
        return self.field

    def shrink(self, c):
        """At a check: which active rows stay active (bool, shape (k,)), or None.

        None when more than ``_SHRINK`` of them, or none, moved by at least the
        threshold since the last check (a set at rest is left to the stop
        rule); otherwise the set shrinks to those and the held rows keep
        ``c``'s values.
        """
        movement = torch.linalg.vector_norm(c - self.snapshot, dim=1)
        moving = movement >= self.threshold * torch.linalg.vector_norm(c, dim=1)
        self.snapshot.copy_(c)
        if not 0 < int(moving.sum()) <= _SHRINK * len(c):
            return None
        self.field = self.gather(c)
        everyone = torch.arange(len(self.field), device=c.device)
        self.rows = (everyone if self.rows is None else self.rows)[moving]
        self.snapshot = self.snapshot[moving]
        self.sizes.append((self.objective.evaluations, len(self.rows)))
        return moving

    def wake(self, c):
        """At a stop of the restricted descent: the rows to go on with, or None.

        One evaluation of the whole objective at the whole field; the held
        voxels whose projected gradient exceeds the largest of the active
        ones' join them (None when none does).
        """
        field = self.gather(c)
        _, gradient = self.objective(field, with_value=False)
        norms = _projected_gradient_norms(field, gradient, self.n_wm_coeffs)
        woken = norms > norms[self.rows].max()
        woken[self.rows] = True
        if int(woken.sum()) == len(self.rows):
            return None
        self.rows = torch.nonzero(woken).flatten()
        self.snapshot = field[self.rows]
        self.sizes.append((self.objective.evaluations, len(self.rows)))
        return self.rows

    def objective_at(self, c, value):
        """The restricted objective of the active rows ``c`` (taken at the whole
        objective's ``value``), with its gradient there."""
        part = self.objective.restricted(self.rows, self.field)
        raw, gradient = part(c)
        part.offset = value - raw
        return part, gradient


def _lbfgs_descent(c, objective, n_wm_coeffs, *, steps, lr, memory, tolerance, least_fall,
                   check_every, history, bar, preconditioner=None, active_set=0.0):
    """Projected L-BFGS with a backtracking (Armijo) line search (``method="lbfgs"``).

    The two-loop recursion (Nocedal & Wright, Algorithm 7.4) builds the
    search direction from inner products and linear combinations of whole
    coefficient fields, and every scalar in it (``rho``, ``alpha``, the
    initial scaling ``s.y / y.P y``, the line search's slopes) is a Euclidean
    inner product or norm: a rotation acting orthogonally within each SH
    degree leaves them unchanged, so each step commutes with it. The initial
    inverse Hessian is that scaling times ``P`` (``preconditioner``, a
    :class:`Preconditioner` applied to every voxel: :func:`signal_preconditioner`,
    which rotates with the gradient table; the identity when None). The
    isotropic coefficients are bounded below by 0: those at the bound whose
    gradient points outwards are held fixed (left out of the direction), and
    each trial point is projected onto the bound. The step pairs, the trial
    point, the gradients and the direction live in buffers reused from step
    to step (the iterates are those of fresh tensors, to the last bit). Each
    pass over the fields is one of :mod:`esdmri.reconst.fused_solver`'s, which
    on a CPU fuses an update with the inner product that the next one needs
    (numba kernels: 60 fields moved per step at memory 5 instead of 76) and
    elsewhere runs torch's operations.

    With ``active_set`` > 0 the voxels that have stopped moving are held and
    the descent goes on over the others (:class:`ActiveSet`): at a shrink the
    step pairs are restricted to the kept voxels, at a wake the memory
    restarts; the history records the whole objective.

    Returns
    -------
    c : Tensor
        The minimiser found (not necessarily the tensor passed in).
    steps : int
    stop_reason : str
    """
    n_voxels = len(c)
    value, gradient = objective(c)
    history.record(value / n_voxels, objective.evaluations)
    # The objective (per voxel) after each step, and the step that starts the check
    # cycle: the stop rule tests the window of ``check_every`` steps that ends at
    # every step (L-BFGS has the objective at hand), not only at the checks, and a
    # wake of the active set starts a new cycle.
    values, cycle, recorded = [history[-1]], 0, 0
    active = None
    if active_set:
        active = ActiveSet(objective, c, active_set, n_wm_coeffs)
        history.active_sizes = active.sizes
    # pairs: (s, y, 1 / s.y, s.y as computed), oldest first; spare: free buffers
    pairs, spare = [], []
    # Every field the loop writes lives in a buffer reused from step to step: at
    # brain size (84 MB a field) a fresh one's page faults cost more than a pass.
    trial, trial_gradient, direction, work = (torch.empty_like(c) for _ in range(4))

    def apply(field, out):
        """``P field``, written to ``out`` (``field`` itself without a preconditioner)."""
        return field if preconditioner is None else preconditioner.apply(field, out)

    def scaled_direction(field, spare, scale):
        """``-scale P field`` in one of the two buffers; returns it and the other one."""
        if preconditioner is None:
            return field.mul_(-scale), spare
        # The scale in the product's own multiplier: one pass over the field fewer.
        return preconditioner.apply(field, spare, -scale), field

    # The first step moves the coefficients by ``lr`` in root mean square.
    scale = lr * c.numel() ** 0.5 / max(float(apply(gradient, work).norm()),
                                        float(torch.finfo(c.dtype).tiny))
    for step in range(1, steps + 1):
        # The two-loop recursion, each pass fused with the inner product the next
        # one needs (esdmri.reconst.fused_solver: one pass over memory each on a CPU).
        following = start_direction(direction, gradient, c, n_wm_coeffs,
                                    pairs[-1][0] if pairs else None)
        alphas = []
        for index in range(len(pairs) - 1, -1, -1):
            _, y, rho, _ = pairs[index]
            alpha = rho * following
            following = axpy_dot(direction, -alpha, y, pairs[index - 1][0] if index else None)
            alphas.append(alpha)
        if pairs:
            # s.y as computed when the pair was stored (the same float: one pass fewer).
            _, y, _, s_dot_y = pairs[-1]
            curvature = (torch.vdot(y.flatten(), y.flatten()) if preconditioner is None
                         else preconditioner.quadratic(y, work))
            scale = float(s_dot_y / curvature)
        direction, work = scaled_direction(direction, work, scale)
        if pairs:
            following = float(torch.vdot(pairs[0][1].flatten(), direction.flatten()))
        for index, ((s, _, rho, _), alpha) in enumerate(zip(pairs, reversed(alphas))):
            beta = rho * following
            if index + 1 < len(pairs):
                following = axpy_dot(direction, -alpha - beta, s, pairs[index + 1][1])
            else:
                slope = finish_direction(direction, gradient, c, n_wm_coeffs, -alpha - beta, s)
        if not pairs:
            slope = finish_direction(direction, gradient, c, n_wm_coeffs)
        if slope >= 0:
            # Not a descent direction (negative curvature on the nonconvex
            # sparsity term): restart from the scaled gradient.
            spare.extend(buffer for s, y, _, _ in pairs for buffer in (s, y))
            pairs.clear()
            start_direction(direction, gradient, c, n_wm_coeffs)
            direction, work = scaled_direction(direction, work, scale)
            finish_direction(direction, gradient, c, n_wm_coeffs)
        length = 1.0
        s = spare.pop() if spare else torch.empty_like(c)
        for _ in range(_MAX_HALVINGS):
            decrease = trial_point(trial, s, c, direction, length, gradient, n_wm_coeffs)
            trial_value, _ = objective(trial, out=trial_gradient)
            if trial_value <= value + _ARMIJO * decrease:
                break
            length *= _BACKTRACK
        else:
            # No step along the direction lowers the objective: a (local) minimum
            # to the precision of the line search.
            if recorded != step - 1:
                history.record(value / n_voxels, objective.evaluations)
            if active is not None:
                c = active.gather(c)
            return c, step - 1, f"converged at step {step - 1}"
        y = spare.pop() if spare else torch.empty_like(c)
        product, y_dot_y = pair_difference(y, trial_gradient, gradient, s)
        curvature = float(product)
        c, trial = trial, c
        gradient, trial_gradient = trial_gradient, gradient
        # Keep a pair only where the objective curves upwards along it, so
        # the implied Hessian stays positive definite.
        if curvature > 1e-10 * y_dot_y:
            pairs.append((s, y, 1.0 / curvature, product))
            if len(pairs) > memory:
                spare.extend(pairs.pop(0)[:2])
        else:
            spare.extend((s, y))
        value = trial_value
        values.append(value / n_voxels)
        bar.update(1)
        check = (step - cycle) % check_every == 0 or step == steps
        stalled = (step - cycle >= check_every
                   and _stalled([values[step - check_every], values[step]], tolerance,
                                least_fall))
        if check or stalled:
            history.record(values[-1], objective.evaluations)
            recorded = step
            bar.set_postfix(objective=f"{history[-1]:.6g}", refresh=False)
        if active is None or step == steps:
            if stalled:
                return (c if active is None else active.gather(c)), step, \
                    f"converged at step {step}"
            continue
        if stalled:
            # A stop of the restricted descent: go on only where the whole
            # objective's gradient says the held voxels are not at rest.
            if active.rows is None or active.wake(c) is None:
                return active.gather(c), step, f"converged at step {step}"
            cycle, kept = step, None
        elif check:
            kept = active.shrink(c)
            if kept is None:
                continue
        else:
            continue
        # The whole field's buffers go before the restricted ones are made: at
        # brain size each is 84 MB, and holding both sets raised the peak.
        spare.clear()
        trial = trial_gradient = direction = work = gradient = None
        pairs = _restricted_pairs(pairs, kept) if kept is not None else []
        c = active.field[active.rows]
        objective, gradient = active.objective_at(c, value)
        trial, trial_gradient, direction, work = (torch.empty_like(c) for _ in range(4))
    if active is not None:
        c = active.gather(c)
    return c, steps, "step budget reached"


def _restricted_pairs(pairs, kept):
    """L-BFGS's step pairs restricted to the ``kept`` rows (bool), those that still curve up.

    ``pairs`` is emptied.

    Kept rather than restarted: at ``active_set=3e-3`` on the 40^3 dev phantom
    the restricted pairs stopped after 120 evaluations (88.7 full-field
    equivalents); a restart took about 95 equivalents to the same objective and
    stopped after 140 (100.2) (docs/benchmarks.md).
    """
    restricted = []
    while pairs:
        # Taken off ``pairs`` one by one, so each whole pair is freed as its rows are copied.
        s, y, _, _ = pairs.pop(0)
        s, y = s[kept], y[kept]
        product = torch.vdot(s.flatten(), y.flatten())
        curvature = float(product)
        if curvature > 1e-10 * float(torch.vdot(y.flatten(), y.flatten())):
            restricted.append((s, y, 1.0 / curvature, product))
    return restricted


def isotropic_charges(tissues, n_wm_coeffs, weights):
    """The charged columns among WM SH coefficients then one per isotropic tissue.

    Parameters
    ----------
    tissues : sequence of str
        The response's tissues, WM first (``TissueResponse.tissues``).
    n_wm_coeffs : int
    weights : LossWeights
        ``gm_charge`` and ``csf_charge``.

    Returns
    -------
    charges : tuple of (int, float)
        ``(column, charge)`` of each tissue with a charge above 0.
    """
    isotropic = [t for t in tissues if t != "wm"]
    named = {"gm": weights.gm_charge, "csf": weights.csf_charge}
    return tuple((n_wm_coeffs + index, named[tissue]) for index, tissue in enumerate(isotropic)
                 if named.get(tissue, 0.0) > 0)


def refine_coefficients(coefficients, signal, mask, forward_matrix, fodf_sampler, n_wm_coeffs,
                        sh_order_max, weights, *, steps, lr=1e-3, total_variation=0.0,
                        smoothing=1e-3, similarity=False, tolerance=0.0, check_every=10,
                        normalize=True, batch_voxels=None, verbose=False, method="lbfgs",
                        memory=5, damping=_DAMPING,
                        preconditioner_tolerance=_PRECONDITIONER_TOLERANCE,
                        likelihood_tolerance=0.0, noise_sigma=None, active_set=0.0,
                        tissues=None):
    """Minimise the deconvolution loss from given coefficients, optionally coupled in space.

    The objective is the sum over masked voxels of each voxel's loss
    (:func:`voxel_loss_gradient`) plus ``total_variation`` times the smoothed
    total variation of the coefficient field between face-neighbouring
    voxels (:func:`esdmri.reconst.losses.total_variation`), weighted by signal similarity
    when ``similarity``, with the isotropic tissues' coefficients kept
    non-negative. With ``total_variation=0`` every voxel is refined on its
    own signal.

    Parameters
    ----------
    coefficients : ndarray, shape (X, Y, Z, C_total)
        Starting point (the network's output): WM SH coefficients then one
        l = 0 coefficient per isotropic tissue.
    signal : ndarray, shape (X, Y, Z, N)
        Measured signal divided by the mean b0.
    mask : ndarray of bool, shape (X, Y, Z)
    forward_matrix : Tensor, shape (C_total, N)
        Coefficients to the measured signal (``ForwardModel.matrix``).
    fodf_sampler : Tensor, shape (V_dense, C_wm)
        SH matrix of the sphere on which the sparsity terms sample the fODF;
        its device and dtype (float32 from the models) are the solver's.
    n_wm_coeffs, sh_order_max : int
    weights : LossWeights
        Weights of the per-voxel terms.
    steps : int
        Most optimiser steps.
    lr : float, optional
        ``method="adam"``: the step size. ``method="lbfgs"``: the root mean
        square change of the coefficients in the first step (later steps
        take their scale from the curvature the solver has seen).
    total_variation : float, optional
        Weight of the spatial term relative to the Gaussian negative
        log-likelihood of the signal (0: each voxel on its own): the term
        added to the summed voxel losses is ``total_variation * 2 sigma^2 / N``
        times the total variation, with ``sigma^2`` the noise variance
        estimated from the data (:func:`noise_variance`) and ``N`` the
        number of measurements, so one setting serves every SNR and
        acquisition.
    smoothing : float, optional
        ``delta`` of the smoothed total variation.
    similarity : bool, optional
        Weight each neighbour pair by :func:`signal_similarity`.
    tolerance : float, optional
        Stop once the objective has fallen by less than this fraction over
        the last ``check_every`` steps (0: off). ``method="lbfgs"``, which has
        the objective at every step, tests the window that ends at every
        step; ``"adam"`` at each check.
    check_every : int, optional
    normalize : bool, optional
        Scale the result so the tissue fractions sum to 1, like the network.
    batch_voxels : int, optional
        Voxels evaluated at once (each buffer holds about ``batch_voxels *
        V_dense`` values). Default: 1024 per torch thread on a CPU, so that
        each thread's share of a block's buffers (2 MB at order 12, float32)
        stays in the L3 cache, and the threads meet once per operation on a
        larger block (the brain's refinement on two
        threads, block sizes interleaved in one process: 38.9-40.8 s at 1024,
        40.6-43.2 s at 512, 768 and 1536 between; docs/benchmarks.md); 65536 on
        other devices, where each block is a few kernel launches.
    verbose : bool, optional
        Show a progress bar; it ends with why the refinement stopped.
    method : {"lbfgs", "adam"}, optional
        ``"lbfgs"``: limited-memory BFGS on the whole field with a
        backtracking line search, projected onto the non-negative isotropic
        coefficients; on the dev phantoms it passes the objective of Adam's
        300 steps after about 40 evaluations and stops (``tolerance``) at a
        lower one after about 100 (docs/benchmarks.md).
        ``"adam"``: the fixed-rate Adam with a second moment per SH degree
        (:class:`DegreeAdam`). Both commute with rotations within each SH
        degree.
    memory : int, optional
        Step pairs kept by L-BFGS (each pair holds two coefficient fields;
        5 reaches the objective of 8 on the dev phantoms with less memory).
    damping : float or None, optional
        L-BFGS's initial inverse Hessian is a multiple of
        :func:`signal_preconditioner` with this damping (None: of the
        identity, the plain L-BFGS). The default (10) stopped the 40^3 dev
        fit after 113 evaluations instead of 173, at a lower objective
        (docs/benchmarks.md). ``method="lbfgs"`` only.
    preconditioner_tolerance : float, optional
        :class:`Preconditioner`'s ``tolerance``: the preconditioner is a
        multiple of the identity but on the SH degrees where it departs from
        that by more than this fraction (0: the whole matrix, a ``C x C``
        product per voxel and application).
    likelihood_tolerance : float, optional
        Stop also once the objective has fallen by less than this many nats
        of Gaussian log-likelihood per voxel over the last ``check_every``
        steps: by less than ``likelihood_tolerance * 2 w_i sigma^2 / N`` per
        voxel, the signal term's change when each voxel's negative
        log-likelihood ``|F^T c - y|^2 / (2 sigma^2)`` changes by that much
        (``sigma^2``: :func:`noise_variance`; ``w_i``: the signal term's
        weight). The unit is the same whatever the SNR, the number of
        measurements or the scan's size, where a relative ``tolerance``
        asks for a fall of about ``tolerance * N / 2`` nats per voxel (the
        objective near its minimum is about ``N / 2`` nats per voxel). A
        small fall per window is not a small distance to the minimum: a
        slow phase can precede a further fall (docs/benchmarks.md, where
        the default 0.01 was chosen on dev data). 0: off; off also without
        neighbour pairs (a single voxel), which estimate ``sigma^2``. With
        both tolerances 0 the refinement runs all ``steps``.
    noise_sigma : ndarray, shape (X, Y, Z), optional
        Noise level of each voxel's normalised signal: the data term compares
        the Rician mean of the forward signal with it (:class:`RicianVoxelLoss`,
        ``noise_floor="model"``). None: least squares.
    active_set : float, optional
        ``method="lbfgs"``: hold the voxels whose coefficients moved by less
        than this fraction of their norm over the last ``check_every``
        steps, and go on over the others, waking held voxels whose gradient
        grows before the stop (:class:`ActiveSet`). 0: every voxel every
        step (the model's default, ``refine_active_set``, is 1e-3).
    tissues : sequence of str, optional
        The response's tissues (WM first): the isotropic coefficients of GM
        and CSF are charged ``weights.gm_charge`` and ``weights.csf_charge``
        per unit (:func:`isotropic_charges`). None: no charges.

    Returns
    -------
    refined : ndarray, float32, shape (X, Y, Z, C_total)
        Zero outside the mask.
    history : RefinementHistory
        The objective (per voxel) every ``check_every`` steps, from the
        start, with ``stop_reason``, ``steps`` and ``evaluations``.
    """
    if method not in REFINEMENT_METHODS:
        raise ValueError(f"method must be one of {REFINEMENT_METHODS}, got {method!r}")
    if memory < 1:
        raise ValueError(f"memory must be >= 1, got {memory}")
    if damping is not None and not damping > 0:
        raise ValueError(f"damping must be None or > 0, got {damping!r}")
    if not likelihood_tolerance >= 0:
        raise ValueError(f"likelihood_tolerance must be >= 0, got {likelihood_tolerance!r}")
    if not 0 <= active_set < 1:
        raise ValueError(f"active_set must be in [0, 1), got {active_set!r}")
    if not 0 <= preconditioner_tolerance < 1:
        raise ValueError("preconditioner_tolerance must be in [0, 1), "
                         f"got {preconditioner_tolerance!r}")
    device, dtype = fodf_sampler.device, fodf_sampler.dtype
    if batch_voxels is None:
        batch_voxels = (_CPU_BLOCK * torch.get_num_threads() if device.type == "cpu"
                        else _DEVICE_BLOCK)
    indices = np.flatnonzero(mask)
    start_values = coefficients.reshape(-1, coefficients.shape[-1])
    signal_values = signal.reshape(-1, signal.shape[-1])
    # The solver works on the coefficients in the sampler's parity-class order where
    # the fused CPU evaluation splits its products by class (VoxelLoss.split): every
    # coefficient-indexed input is reordered once here and the result back at the end.
    order = None
    if fused_objective.fused_on(fodf_sampler) and sampler_parity.ENABLED:
        order = sampler_parity.parity_order(fodf_sampler, start_values.shape[-1])
    c = torch.as_tensor(start_values[indices], dtype=dtype, device=device).clone()
    if order is not None:
        c = c[:, order]
        forward_matrix, fodf_sampler = forward_matrix[order], fodf_sampler[:, order[:n_wm_coeffs]]
    measured = torch.as_tensor(signal_values[indices], dtype=dtype, device=device)
    first, second = neighbour_pairs(torch.as_tensor(mask, device=device))
    pair_weights, least_fall = None, 0.0
    if (total_variation > 0 or likelihood_tolerance > 0) and len(first) > 0:
        distances = pair_distances(measured, first, second)
        variance = noise_variance(distances)
        least_fall = (likelihood_tolerance * weights.intensity
                      * coupling_scale(variance, measured.shape[1]))
    if total_variation > 0 and len(first) > 0:
        pair_weights = (signal_similarity(distances, variance) if similarity
                        else torch.ones_like(distances))
        pair_weights *= total_variation * coupling_scale(variance, measured.shape[1])
    voxel_sigma = None if noise_sigma is None else np.asarray(noise_sigma).reshape(-1)[indices]
    # The isotropic columns stay last in the parity order: the charged columns are unchanged.
    objective = CoupledObjective(measured, forward_matrix, fodf_sampler, n_wm_coeffs, weights,
                                 first, second, pair_weights, smoothing, batch_voxels, voxel_sigma,
                                 isotropic_charges(tissues or (), n_wm_coeffs, weights))
    preconditioner = None
    if damping is not None:
        degrees = coefficient_degrees(n_wm_coeffs, start_values.shape[-1])
        preconditioner = Preconditioner(
            signal_preconditioner(forward_matrix, weights, damping), preconditioner_tolerance,
            degrees if order is None else degrees[order.numpy()], device, dtype)
    history = RefinementHistory()
    if len(indices):
        bar = tqdm(total=steps, desc="refining", unit="step", disable=not verbose)
        with torch.no_grad(), bar:
            options = dict(steps=steps, lr=lr, tolerance=tolerance, least_fall=least_fall,
                           check_every=check_every, history=history, bar=bar)
            if method == "lbfgs":
                c, history.steps, history.stop_reason = _lbfgs_descent(
                    _project(c, n_wm_coeffs), objective, n_wm_coeffs, memory=memory,
                    preconditioner=preconditioner, active_set=active_set, **options)
            else:
                groups = degree_groups(sh_order_max, coefficients.shape[-1] - n_wm_coeffs)
                if order is not None:
                    groups = groups[order.numpy()]
                history.steps, history.stop_reason = _adam_descent(
                    c, objective, n_wm_coeffs, groups, **options)
            bar.set_postfix_str(history.stop_reason)
        history.evaluations = objective.evaluations
        history.full_evaluations = objective.evaluated_voxels / len(indices)
    if order is not None:
        c = c[:, torch.argsort(order).to(device)]
    if normalize:
        total = volume_fractions_from_coefficients(c, n_wm_coeffs).sum(-1)
        c = c / total.clamp_min(NORMALIZATION_FLOOR).unsqueeze(1)
    # np.zeros, not zeros_like: its pages are zeroed lazily, the masked rows' once.
    refined = np.zeros(start_values.shape, dtype=np.float32)
    refined[indices] = c.cpu().numpy()
    return refined.reshape(coefficients.shape), history
