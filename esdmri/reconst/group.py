"""One deconvolution network trained on many scans, on one or many processes.

``model = train_group(subjects, out_file="model.pt")`` trains an RT-ESD (or
ESD, C-ESD) network on the blocks of every subject and returns the same kind
of model object as ``RTESDModel(...).fit``: :func:`esdmri.load_model` reads
its file and ``esdmri_apply`` deconvolves new scans with it. Launched by
``torchrun --nproc_per_node=K script.py``, each of the K processes trains on
its share of the blocks under PyTorch's ``DistributedDataParallel`` (gloo on
CPU, NCCL on CUDA); launched with plain ``python``, it trains in this
process. Only rank 0 writes the checkpoint, the model file and the progress
bar. With ``checkpoint=...`` every epoch is saved (weights, optimiser,
schedule, random states), and ``resume=True`` continues an interrupted run to
the same weights an uninterrupted run reaches (same number of processes);
relaunching the same command after a crash, or torchrun's ``--max_restarts``,
therefore picks up where training stopped. The training itself is the
single-scan fit's (:class:`esdmri.reconst.training.Trainer`).
"""

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..response import TissueResponse
from .config import GROUP_OPTIONS
from .inputs import resolve_device
from .models import MODEL_CLASSES
from .subjects import SubjectBlocks, check_subjects
from .training import DistributedContext, check_training_options


def train_group(subjects, response=None, *, model="rtesd", device="cpu", precision="fp32",
                compile=False, num_workers=0, checkpoint=None, resume=False, out_file=None,
                force=False, verbose=True, **options):
    """Train one deconvolution network on the blocks of many scans.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the process group,
    wraps the network in ``DistributedDataParallel`` and gives each process
    its share of each epoch's blocks; the processes average their gradients
    after each step, so their weights stay identical. Each optimiser step
    sees ``batch_size`` blocks per process.

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
    device : str
        "cpu", "cuda" or "cuda:N"; under torchrun, process k uses
        ``cuda:LOCAL_RANK``.
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype of the network on CUDA, as
        :meth:`esdmri.reconst.models.RTESDModel.train`.
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
    **options
        The options of :class:`esdmri.RTESDModel` (:mod:`esdmri.reconst.config`),
        with their defaults there except ``batch_size``, blocks per process
        and step, and ``epochs``, which default to :data:`GROUP_OPTIONS`'s.
        ``epochs`` are passes over every subject's mask; ``train_windows`` (a single-scan
        fit's budget) does not limit group training.

    Returns
    -------
    model : RTESDModel, ESDModel or CESDModel
        Trained, in eval mode, with ``training_history``; its ``gtab`` is the
        first subject's. ``model.fit(data, mask=mask)`` deconvolves a scan with
        that acquisition without training; ``model.with_gtab(gtab)`` (or
        ``load_model(file, gtab)``) gives it any other acquisition with the
        same shells.
    """
    context = DistributedContext.from_environment()
    device = _check_device(device, context)
    precision = check_training_options(precision, compile, num_workers, device)
    out_file = _check_output("out_file", out_file, force)
    checkpoint = _check_output("checkpoint", checkpoint, force or resume)
    if response is not None and not isinstance(response, TissueResponse):
        raise TypeError(f"response must be a TissueResponse or None, got "
                        f"{type(response).__name__}")
    if model not in MODEL_CLASSES:
        raise ValueError(f"model must be one of {', '.join(MODEL_CLASSES)}, got {model!r}")
    subjects = check_subjects(subjects)
    gtabs = [subject.load_gtab() for subject in subjects]
    _check_responses(subjects, gtabs, response)
    # The model's gtab is the first subject's: its shells are everyone's.
    deconvolution = MODEL_CLASSES[model](gtabs[0], response, device=device, verbose=verbose,
                                         **{**GROUP_OPTIONS, **options})
    dataset = SubjectBlocks(subjects, deconvolution.sphere,
                            deconvolution.config.training.block_size)
    if context.world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        deconvolution.train(dataset, precision=precision, compile=compile,
                            num_workers=num_workers, checkpoint=checkpoint, resume=resume,
                            context=context)
        if out_file is not None and context.is_main:
            deconvolution.save(out_file, force=force)
        if context.world_size > 1:
            dist.barrier()  # every process returns once the model file is written
    finally:
        if context.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return deconvolution


# -- checks before any training ---------------------------------------------
def _check_device(device, context):
    device = resolve_device(device)
    if device.type == "cuda" and context.world_size > 1:
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    return device


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


def _check_responses(subjects, gtabs, response):
    """Given responses must match the shells of the subjects they serve."""
    for index, (subject, gtab) in enumerate(zip(subjects, gtabs)):
        candidate = subject.response if subject.response is not None else response
        if candidate is None:
            continue
        try:
            candidate.validate(gtab)
        except ValueError as error:
            source = "its own response" if subject.response is not None else "response"
            raise ValueError(f"subjects[{index}] ({subject.dwi}) does not fit {source}: "
                             f"{error}") from None
