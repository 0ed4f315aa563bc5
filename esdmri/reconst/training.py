"""The one trainer of the deconvolution networks: one scan or many, one process or many.

:class:`Trainer` runs Adam with a plateau schedule and early stopping over
the blocks of a *block source* (:mod:`esdmri.reconst.subjects`): a
single-scan fit (``model.fit``) trains on :class:`ScanBlocks`, group training
(:func:`esdmri.reconst.group.train_group`) on :class:`SubjectBlocks`, both
through :meth:`esdmri.reconst.models.RTESDModel.train`.

Launched by ``torchrun``, each process trains on its share of every epoch's
blocks under PyTorch's ``DistributedDataParallel``; the processes average
their gradients after each step and take every decision on all-reduced
losses, so their weights stay identical. :meth:`Trainer.state` holds
everything an identical continuation needs (weights, optimiser, schedule,
random states), so a run resumed from a checkpoint ends with the weights of
an uninterrupted one.
"""

import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..response import TissueResponse, estimate_response
from .config import MAX_GRID_CONDITION, carrying_nside
from .losses import (intensity_loss, nonnegativity_loss, sparsity_loss,
                     total_variation_loss)
from .selfsupervision import check_mask_fraction, hide_in_batch
from .tiling import inference_windows

logger = logging.getLogger(__name__)

# Most evaluation windows (each scoring its core voxels once); a larger scan
# is scored on this many, chosen at random once per run.
EVALUATION_BLOCKS = 256

# Relative improvement of the evaluation loss that counts as progress (for
# the plateau schedule, early stopping and the choice of the kept weights).
IMPROVEMENT = 1e-3

# Autocast dtypes of the precisions; None trains in float32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a torchrun launch (1 process, rank 0 without one)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @classmethod
    def from_environment(cls):
        """Read ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` as torchrun sets them."""
        try:
            world_size = int(os.environ.get("WORLD_SIZE", 1))
            rank = int(os.environ.get("RANK", 0))
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError as error:
            raise ValueError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers ({error})") \
                from None
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
        return cls(world_size, rank, local_rank)


def check_training_options(precision, compile, num_workers, device):
    """Validate the run options of training; returns the precision that will run.

    Parameters
    ----------
    precision : {"fp32", "bf16", "fp16"}
    compile : bool
    num_workers : int
    device : torch.device

    Returns
    -------
    precision : str
        "fp32" for "bf16" on CPU (with a warning: bf16 autocast gave no
        speed-up there, the layers' spherical products dominate and are
        float32 sparse or custom kernels).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if device.type != "cuda":
        if precision == "fp16":
            raise ValueError("precision='fp16' needs device='cuda': float16 autocast on CPU is "
                             "slow and loses the loss's small terms; use 'fp32' on CPU")
        if precision == "bf16":
            warnings.warn("precision='bf16' is for CUDA; training on CPU runs in float32",
                          stacklevel=3)
        return "fp32"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' is not supported by {torch.cuda.get_device_name()}: "
                         "use 'fp16'")
    return precision


# -- the loss ---------------------------------------------------------------
def coefficient_loss(coefficients, n_wm_coeffs, forward_model, fodf_sampler, signal, mask,
                     weights):
    """All loss terms of tissue coefficients a network has predicted.

    Parameters
    ----------
    coefficients : Tensor, shape [B, C_total, X, Y, Z]
    n_wm_coeffs : int
        Leading WM SH coefficients of ``coefficients``.
    forward_model : ForwardModel
    fodf_sampler : Tensor, shape [V_dense, C_wm]
    signal : Tensor, shape [B, N, X, Y, Z]
    mask : Tensor of bool, shape [B, X, Y, Z]
    weights : LossWeights

    Returns
    -------
    total : Tensor, scalar
    terms : dict of str -> float
    """
    predicted = forward_model(coefficients)
    wm = coefficients[:, :n_wm_coeffs]
    samples = torch.einsum("vc,bcxyz->bvxyz", fodf_sampler, wm)
    terms = {"intensity": intensity_loss(predicted, signal, mask)}
    if weights.sparsity:
        terms["sparsity"] = sparsity_loss(samples, mask)
    if weights.nonnegativity:
        terms["nonnegativity"] = nonnegativity_loss(samples, mask)
    if weights.total_variation:
        terms["total_variation"] = total_variation_loss(coefficients, samples, mask,
                                                        weights.tv_form, weights.tv_smoothing)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}


def batch_loss(coefficients, batch, n_wm_coeffs, forward_models, fodf_sampler, weights):
    """Loss of a batch's coefficients, each subject's blocks against its own forward model.

    Subjects weigh in by their share of the batch's masked voxels, so a
    one-subject batch gets exactly the loss of :func:`coefficient_loss`.

    Parameters
    ----------
    coefficients : Tensor, shape [B, C_total, X, Y, Z]
    batch : dict
        From a block source's ``read``, on the coefficients' device.
    n_wm_coeffs : int
    forward_models : list of ForwardModel
        One per subject of the source.
    fodf_sampler : Tensor, shape [V_dense, C_wm]
    weights : LossWeights

    Returns
    -------
    total : Tensor, scalar
    terms : dict of str -> float
    """
    mask = batch["mask"]
    voxels = mask.sum(dim=(1, 2, 3))
    all_voxels = voxels.sum().clamp_min(1)
    total, terms = 0.0, {}
    for group in batch["groups"]:
        rows = group["rows"]
        share = voxels[rows].sum() / all_voxels
        loss, group_terms = coefficient_loss(
            coefficients[rows], n_wm_coeffs, forward_models[group["subject"]], fodf_sampler,
            group["signal"], mask[rows], weights)
        total = total + share * loss
        share = float(share)
        for name, value in group_terms.items():
            terms[name] = terms.get(name, 0.0) + share * value
    return total, terms


# -- the trainer ------------------------------------------------------------
class Trainer:
    """Adam with warm-up, a plateau schedule and early stopping over the blocks of a source.

    Parameters
    ----------
    network : DeconvolutionNetwork
    source : ScanBlocks or SubjectBlocks
        A block source (:mod:`esdmri.reconst.subjects`).
    forward_models : list of ForwardModel
        One per subject of ``source``.
    fodf_sampler : Tensor, shape [V_dense, C_wm]
        SH matrix of a dense sphere, for the sparsity and non-negativity terms.
    weights : LossWeights
    epochs, batch_size : int
        Passes over every subject's mask; blocks per process and step.
    lr : float
        Adam's learning rate after the warm-up.
    patience : int
        Epochs without a 0.1% improvement of the evaluation loss before the
        learning rate is halved; twice that many before training stops.
    seed : int
        Seeds the block centres and order (the weights are seeded when
        built) and the voxels ``mask_fraction`` hides.
    max_blocks : int, optional
        Most blocks drawn over all epochs (None: no limit); the last epoch
        stops early when they are spent, so the cost of training does not
        grow with the scan. When it stops training before ``epochs``, a
        warning says so.
    mask_fraction : float
        Masked self-supervision (:mod:`esdmri.reconst.selfsupervision`): in
        every batch this share of the masked voxels gets the mean of its face
        neighbours as input and the loss covers only those voxels, in
        training and in the evaluation. 0 (the default): every voxel sees
        its own signal and is fitted.
    halo : int
        The network's receptive radius in voxels: the evaluation windows
        score only their core, the voxels at least ``halo`` from the window's
        edge, so each voxel is scored once with all the context inference
        gives it.
    warmup_steps : int
        Optimiser steps over which the learning rate rises linearly from
        ``lr / warmup_steps`` to ``lr`` (0: none). Adam's first steps move
        every weight by about ``lr`` whatever its gradient, away from the
        linear prior's fit the network starts at.
    context : DistributedContext
        This process in a torchrun launch (the process group is initialised).
    autocast_dtype : torch.dtype, optional
        Autocast dtype of the network on CUDA (the loss stays float32);
        float16 adds a gradient scaler.
    compile : bool
        ``torch.compile`` the network.
    num_workers : int
        DataLoader processes reading batches (0: read in this process).
    verbose : bool
        Show a tqdm progress bar with the loss terms.
    selection : callable, optional
        Scores the network (in evaluation mode) on data the loss does not
        see, lower is better: the held-out volumes of fine-tuning
        (:class:`esdmri.reconst.finetune.HeldOutError`). Given, it decides
        which weights are kept in the evaluation loss's place; the plateau
        schedule and early stopping still follow the evaluation loss (they
        steer the optimisation of that loss), so the path of training is the
        same whatever decides the kept weights.

    Attributes
    ----------
    history : list of dict
        Per epoch: the mean training-mode loss terms while the weights moved
        (``total`` and each term), ``eval_total`` (the evaluation loss at the
        epoch's end), ``selection`` (the ``selection`` score, when given),
        ``epoch`` and ``lr``.
    summary : dict
        After :meth:`run`: ``start_loss`` (evaluation loss of the starting
        weights), ``best_loss`` (of the kept weights) and ``best_epoch``
        (None if no epoch beat the start by 0.1 %), ``fell_back`` (True when
        the starting weights were kept), ``epochs_run``, ``steps`` and
        ``stopped_by`` (``"epochs"``, ``"plateau"`` or ``"max_blocks"``);
        with ``selection`` also ``start_selection`` and ``best_selection``.

    Notes
    -----
    Each epoch covers every subject's mask with windows centred on masked
    voxels in a random order (:func:`esdmri.reconst.tiling.training_windows`);
    with several processes, process k takes every k-th batch of blocks (the
    list padded, as ``DistributedSampler`` does, so that all take as many
    steps).

    Every decision compares like with like: after each epoch the network is
    scored in evaluation mode (as inference uses it) on fixed windows whose
    cores tile the mask (:func:`esdmri.reconst.tiling.inference_windows`),
    so each masked voxel counts once (at most :data:`EVALUATION_BLOCKS`
    windows); the starting weights are scored on the same voxels before
    training. The plateau schedule and early stopping follow that loss, and
    the weights with the lowest one are kept: the starting weights unless
    an epoch beat them, and ``summary["fell_back"]`` then says that training
    did not lower the loss (with a warning). The mean training loss of an
    epoch is logged beside it but decides nothing: it is taken in training
    mode (batch statistics) while the weights move.
    """

    def __init__(self, network, source, forward_models, fodf_sampler, weights, *, epochs,
                 batch_size, lr, patience, seed, max_blocks=None, mask_fraction=0.0, halo=0,
                 warmup_steps=0, context=None, autocast_dtype=None, compile=False,
                 num_workers=0, verbose=False, selection=None):
        self.network, self.source = network, source
        self.selection = selection
        self.forward_models, self.fodf_sampler, self.weights = (forward_models, fodf_sampler,
                                                                weights)
        self.epochs, self.batch_size, self.patience = epochs, batch_size, patience
        self.max_blocks = max_blocks
        check_mask_fraction(mask_fraction)
        self.mask_fraction, self.seed = mask_fraction, seed
        self.lr, self.warmup_steps = lr, int(warmup_steps)
        self.context = context if context is not None else DistributedContext()
        self.device = next(network.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.num_workers = num_workers
        self.verbose = verbose
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        # The training batches' hidden voxels; the evaluation draws its own
        # from the seed alone, so every evaluation hides the same voxels.
        self.hiding = torch.Generator(device=self.device).manual_seed(seed)
        self.optimizer = torch.optim.Adam(network.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=0.5, patience=patience, threshold=IMPROVEMENT)
        self.scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
        self.evaluation_blocks, core = evaluation_windows(source, halo,
                                                          np.random.default_rng([seed, 1]))
        self.evaluation_core = core.to(self.device)
        _warn_ill_conditioned(network)
        self.initial_state = _copied(network.state_dict())
        self.best_state = self.initial_state
        self.initial_loss = None  # measured when the run starts
        # The kept weights' evaluation loss, and the lowest one seen (which
        # early stopping follows); equal unless ``selection`` keeps the weights.
        self.initial_selection = self.best_eval = self.lowest_eval = None
        self.history, self.best, self.stale, self.next_epoch, self.used = [], math.inf, 0, 0, 0
        self.steps, self.best_epoch, self.summary = 0, None, None
        wrapped = network
        if self.context.world_size > 1:
            wrapped = DistributedDataParallel(
                network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # Compiling the DDP wrapper (not the bare module) lets TorchDynamo
        # split the graph at DDP's gradient buckets.
        self.forward = torch.compile(wrapped) if compile else wrapped

    @property
    def finished(self):
        """Every epoch run, training stopped on a plateau, or the block budget spent."""
        return self.stopped_by is not None

    @property
    def stopped_by(self):
        """Why training stops now: "epochs", "plateau", "max_blocks", or None (it goes on)."""
        if self.next_epoch >= self.epochs:
            return "epochs"
        if self.stale >= 2 * self.patience:
            return "plateau"
        if self.max_blocks is not None and self.used >= self.max_blocks:
            return "max_blocks"
        return None

    # -- checkpoints ------------------------------------------------------
    def state(self):
        """Everything an identical continuation needs, as a torch.save-able dict."""
        return {
            "world_size": self.context.world_size,
            "network": _copied(self.network.state_dict(), "cpu"),
            "initial_state": _copied(self.initial_state, "cpu"),
            "best_state": _copied(self.best_state, "cpu"),
            "initial_loss": self.initial_loss,
            "initial_selection": self.initial_selection, "best_eval": self.best_eval,
            "lowest_eval": self.lowest_eval,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "hiding_rng": self.hiding.get_state(),
            "cuda_rng": (torch.cuda.get_rng_state(self.device)
                         if self.device.type == "cuda" else None),
            "history": self.history, "best": self.best, "stale": self.stale,
            "next_epoch": self.next_epoch, "used": self.used, "steps": self.steps,
            "best_epoch": self.best_epoch,
        }

    def restore(self, state):
        """Continue from a :meth:`state`."""
        self.network.load_state_dict(state["network"])
        self.initial_state = _copied(state["initial_state"], self.device)
        self.best_state = _copied(state["best_state"], self.device)
        self.initial_loss = state["initial_loss"]
        # Absent from checkpoints of older esdmri (no selection then).
        self.initial_selection = state.get("initial_selection")
        self.best_eval = state.get("best_eval", state["best"])
        self.lowest_eval = state.get("lowest_eval", state["best"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty unless the run used fp16
            self.scaler.load_state_dict(state["scaler"])
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("hiding_rng") is not None:  # absent from checkpoints of older esdmri
            self.hiding.set_state(state["hiding_rng"])
        if self.device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = list(state["history"])
        self.best, self.stale = state["best"], state["stale"]
        self.next_epoch, self.used = state["next_epoch"], state["used"]
        # Absent from checkpoints of older esdmri (no warm-up then).
        self.steps = state.get("steps", self.warmup_steps)
        self.best_epoch = state.get("best_epoch")
        if state["world_size"] != self.context.world_size:
            logger.warning(f"resuming a {state['world_size']}-process run with "
                           f"{self.context.world_size} processes: training goes on, but the "
                           "blocks are shared out differently than in an uninterrupted run")

    # -- training ---------------------------------------------------------
    def run(self, save_state=None):
        """Train until :attr:`finished`, then keep the weights with the lowest evaluation loss.

        Or the lowest ``selection`` score, when the trainer has one.

        Parameters
        ----------
        save_state : callable, optional
            Called with :meth:`state` after every epoch on the main process
            (writes the checkpoint).

        Returns
        -------
        history : list of dict
            Per epoch: mean training loss terms, ``total``, ``eval_total``,
            ``epoch`` and ``lr`` (see :attr:`summary` for the outcome).
        """
        if self.initial_loss is None:
            self.initial_loss = self.best_eval = self.evaluate()["total"]
            self.best = self.lowest_eval = self.initial_loss
            if self.selection is not None:
                self.initial_selection = self.best = self._select()
        self.network.train()
        progress = tqdm(total=self.epochs, initial=min(self.next_epoch, self.epochs),
                        desc="training", unit="epoch",
                        disable=not (self.verbose and self.context.is_main))
        with progress:
            while not self.finished:
                record = self._epoch(self.next_epoch)
                record["eval_total"] = self.evaluate()["total"]
                if self.selection is not None:
                    record["selection"] = self._select()
                self.history.append(record)
                progress.update()
                progress.set_postfix({name: f"{value:.3g}" for name, value in record.items()
                                      if name != "epoch"})
                warmed_up = self.steps >= self.warmup_steps
                if warmed_up:  # the plateau schedule and stopping start after the warm-up
                    self.scheduler.step(record["eval_total"])
                self._keep_if_best(record)
                self.next_epoch += 1
                if self.context.is_main:
                    if save_state is not None:
                        save_state(self.state())
                    logger.info(f"epoch {record['epoch']}: training loss {record['total']:.4g}, "
                                f"evaluation loss {record['eval_total']:.4g} (start "
                                f"{self.initial_loss:.4g}), lr {record['lr']:.3g}")
            stopped_by = self.stopped_by
            if stopped_by != "epochs":
                progress.set_postfix_str(f"stopped by {stopped_by} after "
                                         f"{self.next_epoch} of {self.epochs} epochs")
        self._keep_best(stopped_by)
        return self.history

    def _keep_if_best(self, record):
        """Keep the epoch's weights if they beat the best; count plateau epochs."""
        if record["eval_total"] < self.lowest_eval * (1 - IMPROVEMENT):
            self.lowest_eval, self.stale = record["eval_total"], 0
        elif self.steps >= self.warmup_steps:  # stopping starts after the warm-up
            self.stale += 1
        score = record["selection"] if self.selection is not None else record["eval_total"]
        if score < self.best * (1 - IMPROVEMENT):
            self.best, self.best_eval = score, record["eval_total"]
            self.best_state = _copied(self.network.state_dict())
            self.best_epoch = record["epoch"]

    def _keep_best(self, stopped_by):
        """Load the weights of the lowest evaluation loss (the start's unless an epoch beat it)."""
        self.network.eval()
        self.network.load_state_dict(self.best_state)
        self._share_buffers()
        fell_back = self.best_epoch is None
        self.summary = {"start_loss": self.initial_loss, "best_loss": self.best_eval,
                        "best_epoch": self.best_epoch, "fell_back": fell_back,
                        "epochs_run": self.next_epoch, "steps": self.steps,
                        "stopped_by": stopped_by}
        if self.selection is not None:
            self.summary.update(start_selection=self.initial_selection,
                                best_selection=self.best)
        if not self.context.is_main:
            return
        if stopped_by == "max_blocks":
            warnings.warn(f"training stopped after {self.next_epoch} of {self.epochs} epochs "
                          f"({self.steps} steps): the block budget (train_windows) was spent; "
                          "raise train_windows to train all epochs", UserWarning, stacklevel=3)
        if fell_back and self.history:
            name, start, key = ("evaluation loss", self.initial_loss, "eval_total")
            if self.selection is not None:
                name, start, key = ("held-out error", self.initial_selection, "selection")
            last = self.history[-1][key]
            warnings.warn(f"training did not lower the {name} ({start:.4g} at the start, "
                          f"{last:.4g} after epoch {self.history[-1]['epoch']}): the starting "
                          "weights are kept", UserWarning, stacklevel=3)

    def _share_buffers(self):
        # DDP refreshes buffers from rank 0 before each forward pass, so
        # after the last step every process holds its own buffers; rank
        # 0's (the saved ones) become everyone's.
        if self.context.world_size > 1:
            for buffer in self.network.buffers():
                dist.broadcast(buffer, src=0)

    def _epoch(self, epoch):
        blocks = self.source.plan_epoch(self.rng)
        blocks = blocks[self.rng.permutation(len(blocks))]
        if self.max_blocks is not None:
            blocks = blocks[:self.max_blocks - self.used]
        self.used += len(blocks)
        sums = dict.fromkeys(self._term_names(), 0.0)
        batches = 0
        for batch in self._batches(self._share(blocks)):
            self._warm_up()
            total, terms, _ = self.loss(self.forward, batch, self.hiding)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.steps += 1
            terms["total"] = float(total.detach())
            for name, value in terms.items():
                sums[name] += value
            batches += 1
        record = self._mean(sums, batches)
        record["epoch"] = epoch
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        return record

    def _select(self):
        """The ``selection`` score of the network as it is now, in evaluation mode."""
        mode = self.network.training
        self.network.eval()
        with torch.no_grad():
            score = float(self.selection(self.network))
        self.network.train(mode)
        return score

    def _warm_up(self):
        """Set the learning rate of the next step during the warm-up."""
        if self.steps < self.warmup_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * (self.steps + 1) / self.warmup_steps

    @torch.no_grad()
    def evaluate(self):
        """Mean loss terms over the evaluation windows' cores, in evaluation mode.

        Each masked voxel (of at most :data:`EVALUATION_BLOCKS` windows)
        counts once, in a window giving it the network's whole receptive
        field. With ``mask_fraction`` the loss is the masked one of
        training; the hidden voxels are drawn from the seed alone, so every
        call hides the same voxels and the starting and trained weights meet
        the same loss.

        Returns
        -------
        terms : dict of str -> float
            As :func:`coefficient_loss`'s, with ``"total"``; equal on every
            process.
        """
        mode = self.network.training
        self.network.eval()
        context = self.context
        sums = dict.fromkeys(self._term_names(), 0.0)
        hiding = torch.Generator(device=self.device).manual_seed(self.seed)
        voxels = 0
        for batch in self._batches(self.evaluation_blocks[context.rank::context.world_size]):
            total, terms, count = self.loss(self.network, batch, hiding,
                                             core=self.evaluation_core)
            # Batches weigh in by their scored voxels: the mean over voxels.
            terms["total"] = float(total)
            for name, value in terms.items():
                sums[name] += value * count
            voxels += count
        self.network.train(mode)
        return self._mean(sums, voxels)

    def loss(self, network, batch, hiding, core=None):
        """The network's coefficients of a batch and their :func:`batch_loss`.

        With ``mask_fraction`` the batch's hidden voxels (drawn from the
        generator ``hiding``) get their neighbours' mean as input and are the
        only voxels fitted (:func:`esdmri.reconst.selfsupervision.hide_in_batch`).
        ``core`` (bool ``[X, Y, Z]``) limits the fitted voxels to a part of
        every window.

        Returns
        -------
        total : Tensor, scalar
        terms : dict of str -> float
        voxels : int
            The voxels the loss covers.
        """
        if self.mask_fraction:
            batch = hide_in_batch(batch, self.mask_fraction, hiding)
        if core is not None:
            batch = {**batch, "mask": batch["mask"] & core}
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            coefficients = network(batch["grid"])
        total, terms = batch_loss(coefficients.float(), batch, self.network.n_wm_coeffs,
                                  self.forward_models, self.fodf_sampler, self.weights)
        return total, terms, int(batch["mask"].sum())

    def _term_names(self):
        names = ["intensity"] + [name for name in ("sparsity", "nonnegativity",
                                                    "total_variation")
                                 if getattr(self.weights, name)]
        return names + ["total"]

    def _mean(self, sums, batches):
        """Means of summed terms over every process (``batches``: the count summed over)."""
        names = list(sums)
        totals = torch.tensor([sums[name] for name in names] + [batches],
                              dtype=torch.float64, device=self.device)
        if self.context.world_size > 1:
            # Every process takes the same scheduling and stopping decision.
            dist.all_reduce(totals)
        *values, batches = totals.tolist()
        return {name: value / batches if batches else math.nan
                for name, value in zip(names, values)}

    def _share(self, blocks):
        """This process's blocks: every world_size-th, padded so all get as many."""
        world_size, rank = self.context.world_size, self.context.rank
        if world_size == 1:
            return blocks
        padding = -len(blocks) % world_size
        blocks = np.concatenate([blocks, np.resize(blocks, (padding, 4))])
        return blocks[rank::world_size]

    def _batches(self, blocks):
        """The batches of ``blocks``, read here or by DataLoader workers, on the device."""
        chunks = [blocks[first:first + self.batch_size]
                  for first in range(0, len(blocks), self.batch_size)]
        if self.num_workers:
            batches = DataLoader(_Batches(self.source, chunks), batch_size=None,
                                 num_workers=self.num_workers, collate_fn=_unchanged,
                                 pin_memory=self.device.type == "cuda")
        else:
            batches = (self.source.read(chunk) for chunk in chunks)
        for batch in batches:
            yield _to_device(batch, self.device)


class _Batches(Dataset):
    """Batches of a block source for DataLoader workers."""

    def __init__(self, source, chunks):
        self.source, self.chunks = source, chunks

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, index):
        return self.source.read(self.chunks[index])


def _unchanged(batch):
    return batch


def _to_device(batch, device):
    move = dict(device=device, non_blocking=True)
    return {"grid": batch["grid"].to(**move), "mask": batch["mask"].to(**move),
            "groups": [{"subject": group["subject"], "rows": group["rows"].to(**move),
                        "signal": group["signal"].to(**move)} for group in batch["groups"]]}


def _copied(state, device=None):
    """A copy of a state dict (on ``device``, default: where each tensor is)."""
    return {name: value.detach().to(device or value.device, copy=True)
            for name, value in state.items()}


def _warn_ill_conditioned(network):
    """Warn when the grid cannot carry the SH order (condition above MAX_GRID_CONDITION).

    The U-Net's WM output is projected onto SH by the pseudo-inverse of the
    grid's SH matrix; order 12 on nside 4 (96 vertices for 91 coefficients)
    amplifies some output directions 2416-fold. Measured on a dev phantom,
    the first ten steps trained alike on nside 4 and 8 (docs/benchmarks.md,
    "Does the network learn?"), so training goes on, but says so.
    """
    condition = float(np.linalg.cond(network.grid_to_sh.detach().cpu().double().numpy()))
    if condition > MAX_GRID_CONDITION:
        warnings.warn(
            f"the network's grid cannot carry sh_order_max={network.sh_order_max}: its "
            f"grid-to-SH pseudo-inverse has condition number {condition:.0f} (> "
            f"{MAX_GRID_CONDITION:g}); nside={carrying_nside(network.sh_order_max)} conditions "
            "it (hemisphere grid)", UserWarning, stacklevel=4)


def evaluation_windows(source, halo, rng):
    """Windows whose cores tile every subject's mask, and the core of a window.

    Parameters
    ----------
    source : ScanBlocks or SubjectBlocks
    halo : int
        Margin of a window outside its core (the network's receptive radius).
    rng : numpy.random.Generator
        Chooses :data:`EVALUATION_BLOCKS` windows where there are more.

    Returns
    -------
    blocks : ndarray of int, shape (n_blocks, 4)
        Subject index and window corner (a window may extend past the volume).
    core : Tensor of bool, shape [S, S, S]
        The voxels of a window of edge ``S = source.block_size`` that are scored.
    """
    size = source.block_size
    core_size = size - 2 * halo
    if core_size < 1:
        raise ValueError(f"block_size={size} leaves no core inside the network's receptive "
                         f"radius {halo}: use block_size > {2 * halo}")
    blocks = []
    for index, mask in enumerate(source.masks):
        starts, _ = inference_windows(mask.shape, mask, core_size, halo)
        blocks.append(np.column_stack([np.full(len(starts), index), starts - halo]))
    blocks = np.concatenate(blocks).astype(np.int64)
    if len(blocks) > EVALUATION_BLOCKS:
        blocks = blocks[np.sort(rng.permutation(len(blocks))[:EVALUATION_BLOCKS])]
    core = torch.zeros((size,) * 3, dtype=torch.bool)
    core[halo:halo + core_size, halo:halo + core_size, halo:halo + core_size] = True
    return blocks, core


# -- the group response -----------------------------------------------------
def group_response(source, context):
    """Average of the subjects' own or estimated responses (the main process estimates).

    Parameters
    ----------
    source : SubjectBlocks
        A block source with ``load_subject`` (the whole scan of a subject).
    context : DistributedContext

    Returns
    -------
    response : TissueResponse
        The same on every process.
    """
    payload = [None]
    if context.is_main:
        responses = []
        for index, own in enumerate(source.responses):
            if own is not None:
                responses.append(own)
                continue
            data = source.load_subject(index)  # one scan in memory at a time
            responses.append(estimate_response(source.gtabs[index], data, source.masks[index]))
            del data
            logger.info(f"{source.names[index]}: estimated {responses[-1]}")
        payload = [TissueResponse.average([r.normalized() for r in responses]).to_dict()]
    if context.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    return TissueResponse.from_dict(payload[0])

