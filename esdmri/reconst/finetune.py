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
"""

import copy

import torch
from torch import nn

from ..shm import n_coeffs
from .losses import neighbour_pairs
from .network import build_fodf_sampler, build_forward_model
from .pretrained import resolve_weights, sha256_of
from .refine import coupling_scale, noise_variance, pair_distances
from .subjects import ScanBlocks
from .training import Trainer


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


def finetune_correction(correction, scan, prior, config, *, max_steps=None, device="cpu",
                        autocast_dtype=None, verbose=False):
    """Fine-tune a copy of a pretrained correction on one scan.

    Parameters
    ----------
    correction : esdmri.reconst.pretrained.PriorCorrection
        The starting weights (left as they are).
    scan : esdmri.reconst.inputs.PreparedScan
    prior : ndarray, shape (X, Y, Z, C_total)
        The scan's linear prior (``model.prior_coefficients(scan)``).
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

    Returns
    -------
    tuned : PriorCorrection
        In evaluation mode: the starting weights unless an epoch lowered the
        evaluation loss.
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
        autocast_dtype=autocast_dtype, verbose=verbose)
    history = trainer.run()
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
