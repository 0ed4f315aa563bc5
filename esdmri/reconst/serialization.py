"""One-file persistence of trained deconvolution models."""

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from dipy.core.gradients import gradient_table

from .. import __version__
from ..atomic import staged_output
from ..response import TissueResponse
from .losses import LossWeights
from .models import MODEL_CLASSES, DeconvolutionConfig, config_to_dict

# Bumped whenever the saved layout or the network's parameter names change.
FORMAT_VERSION = 3


def save_model(model, path, force=False):
    """Write a trained model's weights, configuration, response and versions.

    The file is written next to ``path`` under a temporary name and renamed
    into place, so a failure never leaves a half-written model behind.

    Parameters
    ----------
    model : esdmri.reconst.models._DeconvolutionModel
    path : str or Path
    force : bool
        Overwrite an existing file.
    """
    if model.network is None:
        raise ValueError("the model has not been fitted yet: call model.fit(data, mask) first")
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: pass force=True to overwrite it")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {path.parent} does not exist")
    kind = next(name for name, cls in MODEL_CLASSES.items() if isinstance(model, cls))
    response = model.response
    payload = {
        "format_version": FORMAT_VERSION,
        "esdmri_version": __version__,
        "torch_version": str(torch.__version__),
        "model": kind,
        "config": config_to_dict(model.config),
        "halo": model.halo,
        "response": response.to_dict(),
        "gtab": {"bvals": model.gtab.bvals.tolist(), "bvecs": model.gtab.bvecs.tolist(),
                 "b0_threshold": float(model.gtab.b0_threshold)},
        "state_dict": {name: tensor.detach().cpu()
                       for name, tensor in model.network.state_dict().items()},
        "training_history": model.training_history,
    }
    with staged_output(path) as temporary:
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


def load_model(path, gtab=None, device="cpu", verbose=True):
    """Read a model written by :meth:`save`.

    Parameters
    ----------
    path : str or Path
    gtab : GradientTable, optional
        Gradient table of the scans the model will be applied to (default:
        the training scan's). Its shells must match the saved response's;
        its directions may differ, since signals are re-interpolated onto
        the HEALPix grid.
    device : str
    verbose : bool

    Returns
    -------
    model : ESDModel, RTESDModel or CESDModel
        Trained: ``model.fit(data, mask)`` only infers.
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
    response = TissueResponse(
        tuple(payload["response"]["tissues"]), np.asarray(payload["response"]["bvals"]),
        tuple(np.asarray(c) for c in payload["response"]["coefficients"]))
    if gtab is None:
        saved = payload["gtab"]
        gtab = gradient_table(np.asarray(saved["bvals"]), bvecs=np.asarray(saved["bvecs"]),
                              b0_threshold=saved["b0_threshold"])
    config = dict(payload["config"])
    weights = LossWeights(**config.pop("loss_weights"))
    config = DeconvolutionConfig(loss_weights=weights, **config)
    model_class = MODEL_CLASSES[payload["model"]]
    model = model_class(
        gtab, response, device=device, verbose=verbose,
        **{name: value for name, value in vars(config).items()
           if name not in ("conv_kind", "loss_weights")},
        sparsity=weights.sparsity, nonnegativity=weights.nonnegativity,
        total_variation=weights.total_variation)
    model._build()
    model.network.load_state_dict(payload["state_dict"])
    model.training_history = payload["training_history"]
    return model
