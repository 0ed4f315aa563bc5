"""The files esdmri writes with torch: model files, group checkpoints, segmentation networks.

Every such file is a dict written by ``torch.save`` through
:func:`write_torch_file` (atomic, permissions of a normal file) and read back
as plain tensors and Python types by :func:`read_torch_file`, which refuses
foreign, truncated or corrupt files in one line. The layouts:

- model file (:func:`write_model_file`, :func:`read_model_file`): a trained
  ESD, RT-ESD or C-ESD model, read by :func:`esdmri.load_model`;
- checkpoint (:func:`write_checkpoint`, :func:`read_checkpoint`): the state
  of an unfinished training run, from which ``resume`` continues;
- segmentation network (:func:`write_segmentation_file`,
  :func:`read_segmentation_file`): class name, constructor arguments and
  weights, read by :func:`esdmri.segmentation.load_network`.

Responses and gradient tables are stored as lists
(:meth:`esdmri.response.TissueResponse.to_dict`, :func:`gtab_to_dict`), so the
files load with ``weights_only=True``.
"""

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from dipy.core.gradients import gradient_table

from . import __version__
from .atomic import staged_output
from .response import TissueResponse

# Bumped whenever the saved layout or the network's parameter names change.
FORMAT_VERSION = 3

# Bumped whenever the checkpoint layout changes (2: best and starting weights).
CHECKPOINT_FORMAT = 2


def write_torch_file(payload, path, *, detached=False):
    """``torch.save`` a dict through a temporary file renamed into place.

    Parameters
    ----------
    payload : dict
    path : str or Path
        Final file; its folder must exist. An existing file is replaced.
    detached : bool
        Rename at once even inside :func:`esdmri.atomic.output_transaction`
        (checkpoints, which must outlive an interrupted command).
    """
    with staged_output(path, detached=detached) as temporary:
        torch.save(payload, temporary)


def read_torch_file(path, what):
    """The dict stored by ``torch.save`` in ``path``, loaded as plain tensors and types.

    Parameters
    ----------
    path : Path
    what : str
        What the file should be ("an esdmri model file"), for the message.

    Returns
    -------
    payload : dict

    Raises
    ------
    ValueError
        In one line, when ``path`` is not a torch file holding a dict (a
        foreign, truncated or corrupt file).
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise
    except (OSError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError,
            ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
        # torch's own text runs to pages of advice on weights_only; the
        # type of the error is enough to tell a truncated file from a foreign one.
        raise ValueError(f"{path} is not {what}: it is truncated, corrupt or not written "
                         f"by torch.save ({type(error).__name__})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not {what}: it holds a {type(payload).__name__}, "
                         "not a dict")
    return payload


def gtab_to_dict(gtab):
    """A GradientTable as lists: ``bvals``, ``bvecs`` and ``b0_threshold``."""
    return {"bvals": gtab.bvals.tolist(), "bvecs": gtab.bvecs.tolist(),
            "b0_threshold": float(gtab.b0_threshold)}


def gtab_from_dict(saved):
    """The GradientTable of :func:`gtab_to_dict`."""
    return gradient_table(np.asarray(saved["bvals"]), bvecs=np.asarray(saved["bvecs"]),
                          b0_threshold=saved["b0_threshold"])


def write_model_file(path, *, kind, config, response, gtab, halo, state_dict,
                     training_history, training_summary=None, correction=None, force=False):
    """Write a trained deconvolution model to one file.

    Parameters
    ----------
    path : str or Path
    kind : str
        Key of :data:`esdmri.reconst.models.MODEL_CLASSES`.
    config : dict
        The model's hyperparameters, as plain types.
    response : TissueResponse
    gtab : GradientTable
        The training acquisition.
    halo : int
        Receptive radius of the network, in voxels.
    state_dict : dict of str -> Tensor
        The per-scan network's weights, or the fine-tuned correction's.
    training_history : list of dict
    training_summary : dict, optional
        How training ended (:attr:`esdmri.reconst.training.Trainer.summary`:
        whether it fell back to the starting weights, ...).
    correction : dict, optional
        For a fine-tuned pretrained correction (``state_dict`` then holds
        its weights): ``weights`` (the file it started from), ``sha256``
        (that file's) and ``architecture``. Files without it hold a
        per-scan network (or an untrained one).
    force : bool
        Overwrite an existing file.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: pass force=True to overwrite it")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {path.parent} does not exist")
    write_torch_file({
        "format_version": FORMAT_VERSION,
        "esdmri_version": __version__,
        "torch_version": str(torch.__version__),
        "model": kind,
        "config": config,
        "halo": halo,
        "response": response.to_dict(),
        "gtab": gtab_to_dict(gtab),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in state_dict.items()},
        "training_history": training_history,
        "training_summary": training_summary,
        "correction": correction,
    }, path)


def read_model_file(path):
    """The contents of a model file of :func:`write_model_file`.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    saved : dict
        ``model`` (kind), ``config`` (dict), ``halo``, ``response``
        (TissueResponse), ``gtab`` (GradientTable), ``state_dict``,
        ``training_history``, and, in files that have them,
        ``training_summary`` and ``correction``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    payload = read_torch_file(path, "an esdmri model file")
    if "format_version" not in payload:
        raise ValueError(f"{path} is not an esdmri model file (no format_version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved by esdmri {payload.get('esdmri_version')} in model format "
            f"{payload['format_version']}; this esdmri {__version__} reads format "
            f"{FORMAT_VERSION} only: retrain the model or use a matching esdmri version")
    return {**payload, "response": TissueResponse.from_dict(payload["response"]),
            "gtab": gtab_from_dict(payload["gtab"])}


def write_checkpoint(state, path):
    """Write the state of a training run (rewritten after every epoch).

    Detached from any output transaction: an interrupted command keeps its
    last complete checkpoint, which is what ``resume`` continues from.

    Parameters
    ----------
    state : dict
        Trainer state plus the settings that identify the run (see
        :meth:`esdmri.reconst.models.RTESDModel.train`).
    path : str or Path
    """
    write_torch_file({**state, "format": CHECKPOINT_FORMAT}, path, detached=True)


def read_checkpoint(path):
    """The state written by :func:`write_checkpoint`.

    Parameters
    ----------
    path : Path

    Returns
    -------
    state : dict
    """
    state = read_torch_file(path, "an esdmri checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not an esdmri checkpoint of format "
                         f"{CHECKPOINT_FORMAT}")
    return state


def write_segmentation_file(path, *, network_class, config, state_dict):
    """Write a segmentation network to one file.

    Parameters
    ----------
    path : str or path-like
    network_class : str
        Class name in :data:`esdmri.segmentation.training.NETWORK_CLASSES`.
    config : dict
        Constructor arguments (plain Python types).
    state_dict : dict of str -> Tensor
    """
    write_torch_file({"class": network_class, "config": config,
                      "state_dict": {key: value.detach().cpu()
                                     for key, value in state_dict.items()}}, path)


def read_segmentation_file(path):
    """The contents of a file of :func:`write_segmentation_file`.

    Returns
    -------
    saved : dict
        ``class`` (str), ``config`` (dict) and ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no segmentation network file at {path}")
    what = "a segmentation network written by save_network"
    saved = read_torch_file(path, what)
    if not isinstance(saved.get("class"), str) or not {"config", "state_dict"} <= set(saved):
        raise ValueError(f"{path} is not {what}")
    return saved
