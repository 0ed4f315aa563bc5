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
not. Both keep the model's equivariance up to the sampling of the sparsity
terms on the HEALPix grid; L-BFGS reaches a lower objective in a third of
Adam's evaluations (docs/benchmarks.md).
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from ..shm import sh_degrees
from .config import REFINEMENT_METHODS
from .losses import CAUCHY_SIGMA, neighbour_pairs, total_variation
from .network import NORMALIZATION_FLOOR, volume_fractions_from_coefficients

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


def voxel_loss_gradient(coefficients, measured, forward_matrix, fodf_sampler, n_wm_coeffs,
                        weights, return_loss=False):
    """Gradient of each voxel's loss (the ESD loss without total variation).

    Written out rather than taken by autograd: a few passes over the sampled
    fODFs instead of autograd's many (the refinement runs 2x faster). The
    loss is :func:`esdmri.reconst.training.coefficient_loss` summed over
    voxels (tests check one against the other).

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
        Only with ``return_loss``.
    """
    residual = coefficients @ forward_matrix - measured
    gradient = residual @ forward_matrix.T * (2 * weights.intensity / measured.shape[1])
    samples = coefficients[:, :n_wm_coeffs] @ fodf_sampler.T
    scale = 1.0 / fodf_sampler.shape[0]
    # d/df of 2 log(1 + f^2 / (2 sigma)) is 4 f / (2 sigma + f^2).
    sample_gradient = samples * (4 * weights.sparsity * scale) / (
        2 * CAUCHY_SIGMA + samples * samples)
    negative = torch.relu(-samples)
    sample_gradient -= negative * (2 * weights.nonnegativity * scale)
    gradient[:, :n_wm_coeffs] += sample_gradient @ fodf_sampler
    if not return_loss:
        return gradient
    loss = (weights.intensity * (residual * residual).mean(dim=1)
            + weights.sparsity * scale * (2 * torch.log1p(
                samples * samples / (2 * CAUCHY_SIGMA))).sum(dim=1)
            + weights.nonnegativity * scale * (negative * negative).sum(dim=1))
    return gradient, loss


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
    return ((signal_values[first] - signal_values[second]) ** 2).mean(dim=1)


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


class CoupledObjective:
    """The refinement's objective over the masked voxels and its gradient.

    The sum over voxels of :func:`voxel_loss_gradient` (evaluated in blocks
    of ``batch_voxels`` so the fODF samples of a block are all that is held)
    plus the weighted smoothed total variation between neighbour pairs
    (:func:`esdmri.reconst.losses.total_variation`) when ``pair_weights`` is given.

    Parameters
    ----------
    measured : Tensor, shape (n, N)
    forward_matrix, fodf_sampler, n_wm_coeffs, weights
        As in :func:`voxel_loss_gradient`.
    first, second : Tensor of int, shape (P,)
    pair_weights : Tensor, shape (P,), or None
        None: no spatial term.
    smoothing : float
    batch_voxels : int
    """

    def __init__(self, measured, forward_matrix, fodf_sampler, n_wm_coeffs, weights, first,
                 second, pair_weights, smoothing, batch_voxels):
        self.measured = measured
        self.arguments = (forward_matrix, fodf_sampler, n_wm_coeffs, weights)
        self.first, self.second, self.pair_weights = first, second, pair_weights
        self.smoothing = smoothing
        self.chunks = [slice(i, i + batch_voxels)
                       for i in range(0, len(measured), batch_voxels)]
        self.evaluations = 0

    def __call__(self, coefficients, with_value=True):
        """Gradient, shape (n, C), and the objective (a float; None without ``with_value``)."""
        self.evaluations += 1
        gradient = torch.empty_like(coefficients)
        value = 0.0
        for rows in self.chunks:
            result = voxel_loss_gradient(coefficients[rows], self.measured[rows],
                                         *self.arguments, return_loss=with_value)
            if with_value:
                gradient[rows], loss = result
                # In float64: the line search compares sums over a whole brain.
                value += float(loss.double().sum())
            else:
                gradient[rows] = result
        if self.pair_weights is not None:
            tv, tv_gradient = total_variation(coefficients, self.first, self.second,
                                              self.pair_weights, self.smoothing, gradient=True)
            gradient.add_(tv_gradient)
            value += float(tv)
        return (value if with_value else None), gradient


class RefinementHistory(list):
    """The objective (per voxel) every ``check_every`` steps, from the start.

    A list, with why the refinement stopped.

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
    """

    stop_reason = "not run"
    steps = 0
    evaluations = 0


def _project(coefficients, n_wm_coeffs):
    """Clamp the isotropic tissues' coefficients (l = 0 constants) to be non-negative."""
    coefficients[:, n_wm_coeffs:].clamp_(min=0)
    return coefficients


def _stalled(history, tolerance):
    return (tolerance and len(history) > 1
            and history[-2] - history[-1] < tolerance * abs(history[-2]))


def _adam_descent(c, objective, n_wm_coeffs, groups, *, steps, lr, tolerance, check_every,
                  history, bar):
    """The fixed-rate degree-grouped Adam descent (``method="adam"``)."""
    optimizer = DegreeAdam(c, groups, lr)
    for step in range(steps + 1):
        check = step % check_every == 0 or step == steps
        value, gradient = objective(c, with_value=check)
        if check:
            history.append(value / len(c))
            bar.set_postfix(objective=f"{history[-1]:.6g}", refresh=False)
            if _stalled(history, tolerance):
                return step, f"converged at step {step}"
        if step == steps:
            return step, "step budget reached"
        optimizer.step(gradient)
        _project(c, n_wm_coeffs)
        bar.update(1)


# Sufficient decrease of the line search (Armijo), its backtracking factor and
# the most halvings of a step before the objective is taken as converged.
_ARMIJO = 1e-4
_BACKTRACK = 0.5
_MAX_HALVINGS = 30


def _lbfgs_descent(c, objective, n_wm_coeffs, *, steps, lr, memory, tolerance, check_every,
                   history, bar):
    """Projected L-BFGS with a backtracking (Armijo) line search (``method="lbfgs"``).

    The two-loop recursion (Nocedal & Wright, Algorithm 7.4) builds the
    search direction from inner products and linear combinations of whole
    coefficient fields, and every scalar in it (``rho``, ``alpha``, the
    initial scaling ``s.y / y.y``, the line search's slopes) is a Euclidean
    inner product or norm: a rotation acting orthogonally within each SH
    degree leaves them unchanged, so each step commutes with it. The
    isotropic coefficients are bounded below by 0: those at the bound whose
    gradient points outwards are held fixed (left out of the direction), and
    each trial point is projected onto the bound.
    """
    value, gradient = objective(c)
    history.append(value / len(c))
    pairs = []  # (s, y, 1 / s.y), oldest first
    # The first step moves the coefficients by ``lr`` in root mean square.
    scale = lr * c.numel() ** 0.5 / max(float(gradient.norm()), float(torch.finfo(c.dtype).tiny))
    for step in range(1, steps + 1):
        held = torch.zeros_like(c, dtype=torch.bool)
        held[:, n_wm_coeffs:] = (c[:, n_wm_coeffs:] <= 0) & (gradient[:, n_wm_coeffs:] > 0)
        direction = gradient.masked_fill(held, 0)
        alphas = []
        for s, y, rho in reversed(pairs):
            alpha = rho * float(torch.vdot(s.flatten(), direction.flatten()))
            direction.sub_(y, alpha=alpha)
            alphas.append(alpha)
        if pairs:
            s, y, _ = pairs[-1]
            scale = float(torch.vdot(s.flatten(), y.flatten())
                          / torch.vdot(y.flatten(), y.flatten()))
        direction.mul_(-scale)
        for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
            beta = rho * float(torch.vdot(y.flatten(), direction.flatten()))
            direction.add_(s, alpha=-alpha - beta)
        direction.masked_fill_(held, 0)
        if float(torch.vdot(gradient.flatten(), direction.flatten())) >= 0:
            # Not a descent direction (negative curvature on the nonconvex
            # sparsity term): restart from the scaled gradient.
            pairs.clear()
            direction = gradient.masked_fill(held, 0).mul_(-scale)
        length = 1.0
        for _ in range(_MAX_HALVINGS):
            trial = _project(torch.add(c, direction, alpha=length), n_wm_coeffs)
            trial_value, trial_gradient = objective(trial)
            decrease = float(torch.vdot(gradient.flatten(), (trial - c).flatten()))
            if trial_value <= value + _ARMIJO * decrease:
                break
            length *= _BACKTRACK
        else:
            # No step along the direction lowers the objective: a (local) minimum
            # to the precision of the line search.
            if (step - 1) % check_every:
                history.append(value / len(c))
            return step - 1, f"converged at step {step - 1}"
        s, y = trial.sub_(c), trial_gradient.sub(gradient)
        curvature = float(torch.vdot(s.flatten(), y.flatten()))
        c.add_(s)  # ``trial`` now holds the step, ``c`` the new point
        # Keep a pair only where the objective curves upwards along it, so
        # the implied Hessian stays positive definite.
        if curvature > 1e-10 * float(torch.vdot(y.flatten(), y.flatten())):
            pairs.append((s, y, 1.0 / curvature))
            if len(pairs) > memory:
                pairs.pop(0)
        value, gradient = trial_value, trial_gradient
        bar.update(1)
        if step % check_every == 0 or step == steps:
            history.append(value / len(c))
            bar.set_postfix(objective=f"{history[-1]:.6g}", refresh=False)
            if _stalled(history, tolerance):
                return step, f"converged at step {step}"
    return steps, "step budget reached"


def refine_coefficients(coefficients, signal, mask, forward_matrix, fodf_sampler, n_wm_coeffs,
                        sh_order_max, weights, *, steps, lr=1e-3, total_variation=0.0,
                        smoothing=1e-3, similarity=False, tolerance=0.0, check_every=10,
                        normalize=True, batch_voxels=1024, verbose=False, method="lbfgs",
                        memory=5):
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
        the last ``check_every`` steps (0: run all ``steps``).
    check_every : int, optional
    normalize : bool, optional
        Scale the result so the tissue fractions sum to 1, like the network.
    batch_voxels : int, optional
        Voxels whose fODF samples are held at once (each buffer holds about
        ``batch_voxels * V_dense`` values): the default keeps a block's
        buffers (1.5 MB at 384 samples, float32) in cache, which on one
        thread evaluates the loss 2.5x faster than blocks of 32768 voxels
        (docs/benchmarks.md).
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
    device, dtype = fodf_sampler.device, fodf_sampler.dtype
    indices = np.flatnonzero(mask)
    start_values = coefficients.reshape(-1, coefficients.shape[-1])
    signal_values = signal.reshape(-1, signal.shape[-1])
    c = torch.as_tensor(start_values[indices], dtype=dtype, device=device).clone()
    measured = torch.as_tensor(signal_values[indices], dtype=dtype, device=device)
    first, second = neighbour_pairs(torch.as_tensor(mask, device=device))
    pair_weights = None
    if total_variation > 0 and len(first) > 0:
        distances = pair_distances(measured, first, second)
        variance = noise_variance(distances)
        pair_weights = (signal_similarity(distances, variance) if similarity
                        else torch.ones_like(distances))
        # The signal term of a voxel is its mean squared residual, 2 sigma^2 / N
        # times the Gaussian negative log-likelihood: in those units the
        # spatial term has weight ``total_variation`` whatever the SNR and N.
        pair_weights *= total_variation * 2 * variance / measured.shape[1]
    objective = CoupledObjective(measured, forward_matrix, fodf_sampler, n_wm_coeffs, weights,
                                 first, second, pair_weights, smoothing, batch_voxels)
    history = RefinementHistory()
    if len(indices):
        bar = tqdm(total=steps, desc="refining", unit="step", disable=not verbose)
        with torch.no_grad(), bar:
            options = dict(steps=steps, lr=lr, tolerance=tolerance, check_every=check_every,
                           history=history, bar=bar)
            if method == "lbfgs":
                history.steps, history.stop_reason = _lbfgs_descent(
                    _project(c, n_wm_coeffs), objective, n_wm_coeffs, memory=memory, **options)
            else:
                groups = degree_groups(sh_order_max, coefficients.shape[-1] - n_wm_coeffs)
                history.steps, history.stop_reason = _adam_descent(
                    c, objective, n_wm_coeffs, groups, **options)
            bar.set_postfix_str(history.stop_reason)
        history.evaluations = objective.evaluations
    if normalize:
        total = volume_fractions_from_coefficients(c, n_wm_coeffs).sum(-1)
        c = c / total.clamp_min(NORMALIZATION_FLOOR).unsqueeze(1)
    refined = np.zeros_like(start_values, dtype=np.float32)
    refined[indices] = c.cpu().numpy()
    return refined.reshape(coefficients.shape), history
