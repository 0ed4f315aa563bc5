"""Fine-tuning the pretrained correction on the scan it fits (``epochs=N``, issue 27).

The shipped correction of the linear prior (:mod:`esdmri.reconst.pretrained`)
was trained on simulated scans. With ``epochs=N`` a model trains a copy of it
on the user's own scan by the scan's unsupervised loss, the objective that the
refinement then descends (:mod:`esdmri.reconst.refine`): per masked voxel, the
signal fit, the sparsity and non-negativity of the WM fODF, and the
refinement's total variation between face neighbours (``refine_tv`` scaled to
the scan's noise by :func:`coupling_weight`, ``refine_smoothing``; without
the signal-similarity weights of ``refine_similarity``). ``train_tv > 0``
puts that form and weight of the training loss in its place instead.

The trainer is the per-scan network's (:class:`esdmri.reconst.training.Trainer`):
batches of windows centred on masked voxels that cover every masked voxel
each epoch, the learning-rate warm-up, the plateau schedule, and the keep-best
rule, which scores the starting (pretrained) weights and every epoch's in
evaluation mode on the same masked voxels and keeps the starting weights,
saying so (``training_summary["fell_back"]``), unless an epoch lowered that
loss. The correction's per-voxel norm computes the same in training and at
inference, so that comparison is like with like.

That loss can be lowered by fitting the scan's noise, which the supervised
pretraining had learned to ignore, and keep-best on the same loss cannot see
it (docs/benchmarks.md, "Fine-tuning the shipped correction"). With
``holdout`` a share of every diffusion-weighted shell's volumes
(:func:`holdout_volumes`) stays out of the loss and of the prior the
correction reads, and the epoch kept is the one whose correction best
predicts those volumes (:class:`HeldOutError`): the q-space analogue of a
validation set, which a scan provides without ground truth.
"""

import copy

import numpy as np
import torch
from dipy.core.gradients import gradient_table
from torch import nn

from ..shm import ShellInterpolator, b0_mask, group_shells, n_coeffs
from .config import MAX_HOLDOUT
from .inputs import PreparedScan
from .losses import neighbour_pairs
from .network import build_fodf_sampler, build_forward_model
from .pretrained import apply_correction, resolve_weights, sha256_of
from .refine import (coupling_scale, noise_variance, pair_distances,
                     refine_coefficients)
from .subjects import ScanBlocks
from .training import Trainer

# Stream of the training seed that draws the held-out volumes (the weights and
# windows draw from the seed itself).
HOLDOUT_STREAM = 7


class ScanCorrection(nn.Module):
    """A pretrained correction bound to a scan's tissues: the trainer's network.

    Parameters
    ----------
    correction : esdmri.reconst.pretrained.PriorCorrection
        Trained in place.
    tissues : tuple of str
        The scan's response's tissues, WM first.
    n_wm_coeffs : int
        WM SH coefficients of the prior (the model's ``sh_order_max``).
    """

    def __init__(self, correction, tissues, n_wm_coeffs):
        super().__init__()
        self.correction = correction
        self.tissues = tuple(tissues)
        self.n_wm_coeffs = n_wm_coeffs
        # The grid's SH order and projection, for the trainer's conditioning check.
        self.sh_order_max = correction.order
        self.register_buffer("grid_to_sh", torch.linalg.pinv(correction.sh_to_grid),
                             persistent=False)

    def forward(self, prior):
        """The corrected coefficients of prior windows ``[B, C_total, X, Y, Z]``."""
        return self.correction(prior, self.tissues)


def coupling_weight(normalized, mask, total_variation):
    """The weight the refinement gives its total variation on a scan.

    :func:`esdmri.reconst.refine.refine_coefficients` (without signal
    similarity) adds ``total_variation`` times
    :func:`esdmri.reconst.refine.coupling_scale` times the summed smoothed
    norms of the neighbours' coefficient differences to the summed voxel
    losses, with the noise variance estimated from the neighbours' signals
    (:func:`esdmri.reconst.refine.noise_variance`).

    Parameters
    ----------
    normalized : ndarray, shape (X, Y, Z, N)
    mask : ndarray of bool, shape (X, Y, Z)
    total_variation : float
        ``refine_tv``.

    Returns
    -------
    weight : float
        0 when ``total_variation`` is 0 or no two masked voxels touch.
    """
    if not total_variation:
        return 0.0
    measured = torch.as_tensor(normalized[mask], dtype=torch.float32)
    first, second = neighbour_pairs(torch.as_tensor(mask))
    if not len(first):
        return 0.0
    variance = noise_variance(pair_distances(measured, first, second))
    return float(total_variation * coupling_scale(variance, measured.shape[1]))


def finetuning_weights(config, normalized, mask):
    """The loss weights of fine-tuning: the refinement's objective, or ``train_tv``'s.

    Parameters
    ----------
    config : DeconvolutionConfig
    normalized : ndarray, shape (X, Y, Z, N)
    mask : ndarray of bool, shape (X, Y, Z)

    Returns
    -------
    weights : LossWeights
    """
    weights = config.training.loss_weights
    if weights.total_variation:
        return weights
    refinement = config.refinement
    return type(weights)(
        sparsity=weights.sparsity, nonnegativity=weights.nonnegativity,
        total_variation=coupling_weight(normalized, mask, refinement.refine_tv),
        tv_form="coupled", tv_smoothing=refinement.refine_smoothing)


def holdout_volumes(gtab, holdout, seed=0):
    """The diffusion-weighted volumes fine-tuning holds out, drawn per shell.

    Each diffusion-weighted shell of ``n`` volumes holds out
    ``floor(holdout * n)`` of them, drawn at random from ``seed``; b0
    volumes are never held out, so every shell keeps most of its directions
    (``holdout`` is at most :data:`~esdmri.reconst.config.MAX_HOLDOUT`).

    Parameters
    ----------
    gtab : GradientTable
    holdout : float
        Share of each shell, in (0, MAX_HOLDOUT].
    seed : int

    Returns
    -------
    held : ndarray of bool, shape (N,)
        The same for the same ``gtab``, ``holdout`` and ``seed``.

    Raises
    ------
    ValueError
        ``holdout`` outside (0, MAX_HOLDOUT], or no shell has enough
        directions to hold one out.
    """
    if not 0 < holdout <= MAX_HOLDOUT:
        raise ValueError(f"holdout must lie in (0, {MAX_HOLDOUT}], got {holdout!r}")
    _, shell_index = group_shells(gtab)
    weighted = ~b0_mask(gtab)
    rng = np.random.default_rng([seed, HOLDOUT_STREAM])
    held = np.zeros(len(shell_index), dtype=bool)
    sizes = []
    for shell in np.unique(shell_index[weighted]):
        volumes = np.flatnonzero((shell_index == shell) & weighted)
        sizes.append(len(volumes))
        held[rng.choice(volumes, int(np.floor(holdout * len(volumes))), replace=False)] = True
    if not held.any():
        raise ValueError(f"holdout={holdout} holds out no volume of this scan: its "
                         f"diffusion-weighted shells have {sizes} directions, and a shell of "
                         f"n holds out floor(holdout * n); give holdout >= "
                         f"{1 / max(sizes, default=1):.3g} or holdout=0")
    return held


def retained_scan(scan, held, vertices):
    """The scan without its held-out volumes: what fine-tuning fits.

    Parameters
    ----------
    scan : PreparedScan
    held : ndarray of bool, shape (N,)
        :func:`holdout_volumes`.
    vertices : ndarray, shape (V, 3)
        The model's grid (``model.sphere.vertices``), for the interpolator.

    Returns
    -------
    retained : PreparedScan
    """
    held = np.asarray(held)
    if held.dtype != bool or held.shape != scan.gtab.bvals.shape:
        raise ValueError(f"held must be a boolean array of one entry per volume "
                         f"({scan.gtab.bvals.shape}), got {held.dtype} of shape {held.shape}")
    keep = ~held
    gtab = gradient_table(np.asarray(scan.gtab.bvals)[keep],
                          bvecs=np.asarray(scan.gtab.bvecs)[keep],
                          b0_threshold=scan.gtab.b0_threshold)
    return PreparedScan(gtab, np.ascontiguousarray(scan.normalized[..., keep]), scan.mask,
                        scan.response, ShellInterpolator(gtab, vertices), scan.noise_sigma)


class HeldOutError:
    """How well a correction predicts the volumes fine-tuning held out.

    The correction of the retained volumes' prior, optionally refined for a
    few steps on the retained volumes (the model's refinement otherwise),
    predicts the held-out volumes through the forward model; the score is
    the mean squared error over masked voxels and held-out volumes.

    Parameters
    ----------
    scan : PreparedScan
        The whole scan.
    held : ndarray of bool, shape (N,)
        :func:`holdout_volumes`.
    prior : ndarray, shape (X, Y, Z, C_total)
        The linear prior of the retained volumes (:func:`retained_scan`).
    config : DeconvolutionConfig
        ``holdout_refine_steps`` and the refinement's options.
    device : torch.device
    """

    def __init__(self, scan, held, prior, config, device="cpu"):
        self.order = order = config.network.sh_order_max
        self.config, self.prior, self.mask = config, prior, scan.mask
        self.tissues = scan.response.tissues
        matrix = build_forward_model(scan.response, scan.gtab, order, device).matrix
        held = torch.as_tensor(np.asarray(held, dtype=bool), device=matrix.device)
        self.held_matrix, self.retained_matrix = matrix[:, held], matrix[:, ~held]
        self.measured = torch.as_tensor(scan.normalized[scan.mask][:, held.cpu().numpy()],
                                        dtype=torch.float32, device=matrix.device)
        self.retained_signal = scan.normalized[..., ~held.cpu().numpy()]
        self.sampler = build_fodf_sampler(order, device)

    def coefficients(self, correction):
        """The corrected prior, refined ``holdout_refine_steps`` steps on the retained volumes."""
        coefficients = apply_correction(correction, self.prior, self.mask, self.tissues)
        steps = self.config.training.holdout_refine_steps
        if not steps:
            return coefficients
        # A fixed number of steps (no tolerance), so that every epoch is scored alike.
        options = {**self.config.refinement.solver_options(), "steps": steps, "tolerance": 0.0,
                   "likelihood_tolerance": 0.0}
        coefficients, _ = refine_coefficients(
            coefficients, self.retained_signal, self.mask, self.retained_matrix, self.sampler,
            n_coeffs(self.order), self.order, self.config.training.loss_weights, **options,
            normalize=False, tissues=self.tissues)
        return coefficients

    def error(self, coefficients):
        """Mean squared error of coefficients' prediction of the held-out volumes."""
        voxels = torch.as_tensor(coefficients[self.mask], dtype=torch.float32,
                                 device=self.measured.device)
        return float(((voxels @ self.held_matrix - self.measured) ** 2).mean())

    def __call__(self, network):
        """The score of a :class:`ScanCorrection` (or a bare correction)."""
        if isinstance(network, ScanCorrection):
            network = network.correction
        return self.error(self.coefficients(network))


def finetune_correction(correction, scan, prior, config, *, max_steps=None, device="cpu",
                        autocast_dtype=None, verbose=False, selection=None, on_epoch=None):
    """Fine-tune a copy of a pretrained correction on one scan.

    Parameters
    ----------
    correction : esdmri.reconst.pretrained.PriorCorrection
        The starting weights (left as they are).
    scan : esdmri.reconst.inputs.PreparedScan
        The volumes fitted (:func:`retained_scan` with ``holdout``).
    prior : ndarray, shape (X, Y, Z, C_total)
        Its linear prior (``model.prior_coefficients(scan)``).
    config : DeconvolutionConfig
        ``epochs``, ``batch_size`` and ``lr``
        (:meth:`~esdmri.reconst.config.TrainingConfig.recipe`), ``warmup_steps``,
        ``patience``, ``seed``, ``block_size`` and the loss weights
        (:func:`finetuning_weights`).
    max_steps : int, optional
        Most optimiser steps (``train_windows``; None: no limit).
    device : torch.device
    autocast_dtype : torch.dtype, optional
    verbose : bool
    selection : HeldOutError, optional
        Decides which weights are kept in place of the evaluation loss
        (:class:`esdmri.reconst.training.Trainer`).
    on_epoch : callable, optional
        Called after every epoch with :meth:`Trainer.state` (its
        ``"network"``: the weights of that epoch), e.g. to record them.

    Returns
    -------
    tuned : PriorCorrection
        In evaluation mode: the starting weights unless an epoch lowered the
        evaluation loss (the held-out error with ``selection``).
    history : list of dict
        :attr:`esdmri.reconst.training.Trainer.history`.
    summary : dict
        :attr:`esdmri.reconst.training.Trainer.summary`, with the loss
        weights used (``loss_weights``).
    """
    training = config.training
    recipe = training.recipe(finetune=True)
    order = config.network.sh_order_max
    tuned = copy.deepcopy(correction).to(device)
    blocks = ScanBlocks(scan.normalized, scan.mask, scan.gtab, None, training.block_size,
                        device, prior=prior)
    weights = finetuning_weights(config, scan.normalized, scan.mask)
    trainer = Trainer(
        ScanCorrection(tuned, scan.response.tissues, n_coeffs(order)).to(device), blocks,
        [build_forward_model(scan.response, scan.gtab, order, device)],
        build_fodf_sampler(order, device), weights, epochs=training.epochs,
        batch_size=recipe["batch_size"], lr=recipe["lr"], patience=training.patience,
        seed=training.seed,
        max_blocks=None if max_steps is None else max_steps * recipe["batch_size"],
        halo=tuned.halo, warmup_steps=training.warmup_steps,
        autocast_dtype=autocast_dtype, verbose=verbose, selection=selection)
    history = trainer.run(on_epoch)
    summary = {**trainer.summary, "loss_weights": {
        "sparsity": weights.sparsity, "nonnegativity": weights.nonnegativity,
        "total_variation": weights.total_variation, "tv_form": weights.tv_form,
        "tv_smoothing": weights.tv_smoothing}}
    return tuned.eval(), history, summary


def weights_origin(pretrained, kind):
    """Which weights a ``pretrained`` option names: their file and SHA-256.

    Parameters
    ----------
    pretrained : True, "default", str or Path
    kind : str
        The model class's ``conv_kind``, whose shipped weights True names.

    Returns
    -------
    origin : dict
        ``weights`` (the file, as a string) and ``sha256``.
    """
    path, expected = resolve_weights(pretrained, kind)
    return {"weights": str(path), "sha256": expected or sha256_of(path)}
