"""One deconvolution network trained on many scans, on one or many processes.

``model = train_group(subjects, out_file="model.pt")`` trains an RT-ESD (or
ESD, C-ESD) network on the blocks of every subject and returns the same kind
of model object as ``RTESDModel(...).fit``: ``load_model`` reads its file and
``esdmri_apply`` deconvolves new scans with it. Launched by
``torchrun --nproc_per_node=K script.py``, each of the K processes trains on
its share of the blocks under PyTorch's ``DistributedDataParallel`` (gloo on
CPU, NCCL on CUDA); launched with plain ``python``, it trains in this
process. Only rank 0 writes the checkpoint, the model file and the progress
bar. With ``checkpoint=...`` every epoch is saved (weights, optimiser,
schedule, random states), and ``resume=True`` continues an interrupted run to
the same weights an uninterrupted run reaches (same number of processes);
relaunching the same command after a crash, or torchrun's ``--max_restarts``,
therefore picks up where training stopped.
"""

import contextlib
import inspect
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .atomic import staged_output
from .reconst.inputs import resolve_device
from .reconst.models import MODEL_CLASSES, SAMPLING_NSIDE, config_to_dict
from .reconst.network import ForwardModel, stacked_forward_matrix
from .reconst.serialization import read_torch_file
from .reconst.subjects import SubjectBlocks, collate_blocks
from .reconst.training import coefficient_loss
from .response import TissueResponse, estimate_response
from .shm import sh_matrix
from .sphere import HealpixSphere

logger = logging.getLogger(__name__)

# Autocast dtypes of the precisions; None trains in float32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Bumped whenever the checkpoint layout changes.
CHECKPOINT_FORMAT = 1

# Hyperparameters that train_group sets itself rather than through model_options.
_RESERVED = ("gtab", "response", "epochs", "batch_size", "lr", "patience", "seed", "device",
             "verbose")


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


def train_group(subjects, response=None, *, model="rtesd", epochs=30, batch_size=4,
                lr=1.7e-3, patience=3, seed=0, device="cpu", precision="fp32", compile=False,
                num_workers=0, checkpoint=None, resume=False, out_file=None, force=False,
                verbose=True, **model_options):
    """Train one deconvolution network on the blocks of many scans.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the process group,
    wraps the network in ``DistributedDataParallel`` and gives each process
    its share of the blocks through a ``DistributedSampler``; the processes
    average their gradients after each step, so their weights stay
    identical. Each optimiser step sees ``batch_size`` blocks per process.

    Parameters
    ----------
    subjects : sequence of esdmri.reconst.subjects.Subject
        The scans; they need the same shells, their directions may differ.
    response : TissueResponse, optional
        Group response for every subject without its own
        ``Subject.response``. Default: each subject's responses are
        estimated with :func:`esdmri.response.estimate_response` (or its own
        are taken) and their b0-normalised average is the group response.
        The saved model keeps the group response.
    model : {"rtesd", "esd", "cesd"}
        Network kind, as :data:`esdmri.reconst.models.MODEL_CLASSES`.
    epochs, batch_size : int
        Passes over every subject's mask; blocks per process and step.
    lr : float
        Adam learning rate.
    patience : int
        Plateau epochs before the learning rate halves; twice as many stop
        training.
    seed : int
        Seeds the weights, the block offsets and the block order.
    device : str
        "cpu", "cuda" or "cuda:N"; under torchrun, process k uses
        ``cuda:LOCAL_RANK``.
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype of the network on CUDA (the loss stays float32; fp16
        adds a gradient scaler). On CPU training runs in float32: bf16
        autocast gave no speed-up there (the layers' spherical products
        dominate and are float32 sparse or custom kernels), so "bf16" falls
        back to float32 with a warning, and "fp16" is refused.
    compile : bool
        ``torch.compile`` the network (see docs/benchmarks.md for when it pays).
    num_workers : int
        DataLoader processes reading blocks (0: read in this process).
    checkpoint : str or Path, optional
        File rewritten (atomically) after every epoch.
    resume : bool
        Continue from ``checkpoint`` when it exists; an interrupted run
        resumed to the same ``epochs`` (with as many processes) ends with
        the weights of an uninterrupted one.
    out_file : str or Path, optional
        Model file written at the end (read by :func:`esdmri.load_model`).
    force : bool
        Overwrite an existing ``out_file`` (and ``checkpoint`` without
        ``resume``).
    verbose : bool
        Progress bar (rank 0 only).
    **model_options
        Network and loss hyperparameters of :class:`esdmri.RTESDModel`
        (``sh_order_max``, ``nside``, ``depth``, ``filter_start``,
        ``block_size``, ``sparsity``, ``total_variation``, ...).

    Returns
    -------
    model : RTESDModel, ESDModel or CESDModel
        Trained, in eval mode, with ``training_history``; its ``gtab`` is the
        first subject's. ``model.fit(data, mask)`` deconvolves a scan with
        that acquisition without training; ``load_model(file, gtab)`` gives
        it any other acquisition with the same shells.
    """
    context = DistributedContext.from_environment()
    device = _check_device(device, context)
    autocast_dtype = _check_precision(precision, device)
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    out_file = _check_output("out_file", out_file, force)
    checkpoint = _check_output("checkpoint", checkpoint, force or resume)
    if response is not None and not isinstance(response, TissueResponse):
        raise TypeError(f"response must be a TissueResponse or None, got "
                        f"{type(response).__name__}")
    deconvolution = _new_model(model, epochs, batch_size, lr, patience, seed, device, verbose,
                               model_options)
    dataset = SubjectBlocks(subjects, deconvolution.sphere, deconvolution.config.block_size)
    deconvolution.gtab = dataset.gtabs[0]
    _check_responses(dataset, response)

    if context.world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        state = _load_checkpoint(checkpoint, deconvolution, dataset) if resume else None
        if state is not None:
            group = _saved_response(state, response, checkpoint)
        else:
            group = response if response is not None else _estimated_response(dataset, context)
        deconvolution.response = group
        responses = [s.response if s.response is not None else group
                     for s in dataset.subjects]
        _check_group_tissues(dataset, group, responses)
        deconvolution._build(dataset.n_shells)
        trainer = _GroupTrainer(deconvolution, dataset, responses, context, autocast_dtype,
                                compile, num_workers)
        if state is not None:
            trainer.restore(state)
        trainer.run(checkpoint, verbose=verbose and context.is_main)
        deconvolution.training_history = trainer.history
        if out_file is not None and context.is_main:
            deconvolution.save(out_file, force=force)
        if context.world_size > 1:
            dist.barrier()  # every process returns once the model file is written
    finally:
        if context.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return deconvolution


class _GroupTrainer:
    """Optimiser, schedule, random states and the epoch loop of one group run."""

    def __init__(self, model, dataset, responses, context, autocast_dtype, compile_network,
                 num_workers):
        config = model.config
        self.model, self.dataset, self.context = model, dataset, context
        self.device = model.device
        self.autocast_dtype = autocast_dtype
        self.num_workers = num_workers
        network = model.network
        self.optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=0.5, patience=config.patience, threshold=1e-3)
        self.scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
        self.forward_models = [
            ForwardModel(stacked_forward_matrix(response.normalized(), gtab,
                                                config.sh_order_max)).to(self.device)
            for response, gtab in zip(responses, dataset.gtabs)]
        sampling = HealpixSphere(SAMPLING_NSIDE, hemisphere=True)
        self.fodf_sampler = torch.as_tensor(sh_matrix(config.sh_order_max, sampling.vertices),
                                            dtype=torch.float32, device=self.device)
        self.rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        self.history, self.best, self.stale, self.next_epoch = [], math.inf, 0, 0
        wrapped = network
        if context.world_size > 1:
            wrapped = DistributedDataParallel(
                network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # Compiling the DDP wrapper (not the bare module) lets TorchDynamo
        # split the graph at DDP's gradient buckets.
        self.forward = torch.compile(wrapped) if compile_network else wrapped

    @property
    def stopped(self):
        return self.stale >= 2 * self.model.config.patience

    # -- checkpoints ------------------------------------------------------
    def state(self):
        """Everything an identical continuation needs, as a torch.save-able dict."""
        model = self.model
        return {
            "format": CHECKPOINT_FORMAT,
            "model": type(model).__name__,
            "config": config_to_dict(model.config),
            "subjects": [str(s.dwi) for s in self.dataset.subjects],
            "world_size": self.context.world_size,
            "response": model.response.to_dict(),
            "network": {name: tensor.detach().cpu()
                        for name, tensor in model.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": (torch.cuda.get_rng_state(self.device)
                         if self.device.type == "cuda" else None),
            "history": self.history, "best": self.best, "stale": self.stale,
            "next_epoch": self.next_epoch,
        }

    def restore(self, state):
        self.model.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty unless the run used fp16
            self.scaler.load_state_dict(state["scaler"])
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = list(state["history"])
        self.best, self.stale = state["best"], state["stale"]
        self.next_epoch = state["next_epoch"]
        if state["world_size"] != self.context.world_size:
            logger.warning(f"resuming a {state['world_size']}-process run with "
                           f"{self.context.world_size} processes: training goes on, but the "
                           "blocks are shared out differently than in an uninterrupted run")

    # -- training ---------------------------------------------------------
    def run(self, checkpoint, verbose):
        config = self.model.config
        network = self.model.network
        network.train()
        progress = tqdm(total=config.epochs, initial=min(self.next_epoch, config.epochs),
                        desc="group training", unit="epoch", disable=not verbose)
        with progress:
            while self.next_epoch < config.epochs and not self.stopped:
                record = self._epoch(self.next_epoch)
                self.history.append(record)
                progress.update()
                progress.set_postfix({name: f"{value:.3g}" for name, value in record.items()
                                      if name != "epoch"})
                self.scheduler.step(record["total"])
                if record["total"] < self.best * (1 - 1e-3):
                    self.best, self.stale = record["total"], 0
                else:
                    self.stale += 1
                self.next_epoch += 1
                if checkpoint is not None and self.context.is_main:
                    _save_checkpoint(self.state(), checkpoint)
                if self.context.is_main:
                    logger.info(f"epoch {record['epoch']}: loss {record['total']:.4g}, "
                                f"lr {record['lr']:.3g}")
        if self.context.world_size > 1:
            # DDP refreshes buffers from rank 0 before each forward pass, so
            # after the last step every process holds its own batch-norm
            # statistics; rank 0's (the saved ones) become everyone's.
            for buffer in network.buffers():
                dist.broadcast(buffer, src=0)
        network.eval()

    def _epoch(self, epoch):
        self.dataset.plan_epoch(self.rng)
        sampler = DistributedSampler(self.dataset, num_replicas=self.context.world_size,
                                     rank=self.context.rank, shuffle=True,
                                     seed=self.model.config.seed)
        sampler.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_size=self.model.config.batch_size,
                            sampler=sampler, collate_fn=collate_blocks,
                            num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        sums = {}
        for batch in loader:
            total, terms = self._loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            terms["total"] = float(total.detach())
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value
            sums["batches"] = sums.get("batches", 0) + 1
        names = list(sums)
        totals = torch.tensor([sums[name] for name in names], dtype=torch.float64,
                              device=self.device)
        if self.context.world_size > 1:
            # Every process takes the same scheduling and stopping decision.
            dist.all_reduce(totals)
        totals = dict(zip(names, totals.tolist()))
        batches = totals.pop("batches")
        record = {name: value / batches for name, value in totals.items()}
        record["epoch"] = epoch
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        return record

    def _loss(self, batch):
        """Loss of a batch: one network pass, then each subject's own forward model.

        Subjects weigh in by their share of the batch's masked voxels, so a
        one-subject batch gets exactly the loss of single-scan training.
        """
        device = self.device
        grid = batch["grid"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            coefficients = self.forward(grid)
        coefficients = coefficients.float()
        voxels = mask.sum(dim=(1, 2, 3))
        all_voxels = voxels.sum().clamp_min(1)
        total, terms = 0.0, {}
        for group in batch["groups"]:
            rows = group["rows"].to(device)
            signal = group["signal"].to(device, non_blocking=True)
            share = voxels[rows].sum() / all_voxels
            loss, group_terms = coefficient_loss(
                coefficients[rows], self.model.network.n_wm_coeffs,
                self.forward_models[group["subject"]], self.fodf_sampler, signal, mask[rows],
                self.model.config.loss_weights)
            total = total + share * loss
            share = float(share)
            for name, value in group_terms.items():
                terms[name] = terms.get(name, 0.0) + share * value
        return total, terms


# -- checks before any training ---------------------------------------------
def _check_device(device, context):
    device = resolve_device(device)
    if device.type == "cuda" and context.world_size > 1:
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    return device


def _check_precision(precision, device):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        if precision == "fp16":
            raise ValueError("precision='fp16' needs device='cuda': float16 autocast on CPU is "
                             "slow and loses the loss's small terms; use 'fp32' on CPU")
        if precision == "bf16":
            warnings.warn("precision='bf16' is for CUDA; training on CPU runs in float32",
                          stacklevel=3)
        return None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' is not supported by {torch.cuda.get_device_name()}: "
                         "use 'fp16'")
    return PRECISIONS[precision]


def _check_output(name, path, overwrite):
    """A writable output path (or None); refuses an existing file unless ``overwrite``."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder: give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"{name} {path} cannot be written: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path} cannot be written: folder {path.parent} is not "
                         "writable")
    if path.exists() and not overwrite:
        hint = " or resume=True" if name == "checkpoint" else ""
        raise FileExistsError(f"{name} {path} exists: pass force=True{hint}")
    return path


def _new_model(kind, epochs, batch_size, lr, patience, seed, device, verbose, options):
    """An untrained model of ``kind`` (validates every hyperparameter)."""
    if kind not in MODEL_CLASSES:
        raise ValueError(f"model must be one of {', '.join(MODEL_CLASSES)}, got {kind!r}")
    model_class = MODEL_CLASSES[kind]
    accepted = set(inspect.signature(model_class.__init__).parameters) - {"self", *_RESERVED}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown}; expected some of "
                        f"{sorted(accepted)}")
    # The gtab becomes the first subject's once the subjects are opened.
    return model_class(None, None, epochs=epochs, batch_size=batch_size, lr=lr,
                       patience=patience, seed=seed, device=device, verbose=verbose, **options)


def _check_responses(dataset, response):
    """Given responses must match the shells of the subjects they serve."""
    for index, (subject, gtab) in enumerate(zip(dataset.subjects, dataset.gtabs)):
        candidate = subject.response if subject.response is not None else response
        if candidate is None:
            continue
        try:
            candidate.validate(gtab)
        except ValueError as error:
            source = "its own response" if subject.response is not None else "response"
            raise ValueError(f"subjects[{index}] ({subject.dwi}) does not fit {source}: "
                             f"{error}") from None


def _check_group_tissues(dataset, group, responses):
    for index, (subject, response) in enumerate(zip(dataset.subjects, responses)):
        if response.tissues != group.tissues:
            raise ValueError(f"subjects[{index}] ({subject.dwi}) has a response of tissues "
                             f"{response.tissues} but the group's are {group.tissues}: one "
                             "network needs the same tissues for every subject")
        response.validate(dataset.gtabs[index])


# -- responses --------------------------------------------------------------
def _estimated_response(dataset, context):
    """Group response from each subject's own or estimated responses (rank 0 estimates)."""
    payload = [None]
    if context.is_main:
        responses = []
        for index, subject in enumerate(dataset.subjects):
            if subject.response is not None:
                responses.append(subject.response)
                continue
            data = dataset.load_subject(index)  # one scan in memory at a time
            responses.append(estimate_response(dataset.gtabs[index], data, dataset.masks[index]))
            del data
            logger.info(f"{subject.dwi}: estimated {responses[-1]}")
        payload = [TissueResponse.average([r.normalized() for r in responses]).to_dict()]
    if context.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    return TissueResponse.from_dict(payload[0])


def _saved_response(state, response, checkpoint):
    saved = TissueResponse.from_dict(state["response"])
    if response is not None and not _same_response(response, saved):
        raise ValueError(f"response differs from the one checkpoint {checkpoint} was trained "
                         "with: resume with the same response, or start afresh")
    return saved


def _same_response(a, b):
    return (a.tissues == b.tissues and np.allclose(a.bvals, b.bvals)
            and all(x.shape == y.shape and np.allclose(x, y)
                    for x, y in zip(a.coefficients, b.coefficients)))


# -- checkpoint files -------------------------------------------------------
def _save_checkpoint(payload, path):
    """torch.save through a temporary file renamed into place right away.

    Detached from any output transaction: an interrupted command keeps its
    last complete checkpoint, which is what ``resume`` continues from.
    """
    with staged_output(path, detached=True) as temporary:
        torch.save(payload, temporary)


def _load_checkpoint(path, model, dataset):
    """The saved state of ``path``, or None when there is none yet."""
    if path is None:
        raise ValueError("resume=True needs a checkpoint file")
    if not path.exists():
        return None
    state = read_torch_file(path, "an esdmri checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not an esdmri checkpoint of format "
                         f"{CHECKPOINT_FORMAT}")
    ours = config_to_dict(model.config)
    differing = sorted(name for name in ours
                       if name != "epochs" and state["config"].get(name) != ours[name])
    if state["model"] != type(model).__name__:
        differing.insert(0, "model")
    if state["subjects"] != [str(s.dwi) for s in dataset.subjects]:
        differing.append("subjects")
    if differing:
        raise ValueError(f"checkpoint {path} was written with other settings "
                         f"({', '.join(differing)}"
                         "): resume with the same settings (only epochs may change), or start "
                         "afresh without resume")
    return state
