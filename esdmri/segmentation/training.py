"""Training, prediction and single-file save/load of segmentation networks."""

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from esdmri.serialization import read_segmentation_file, write_segmentation_file
from esdmri.segmentation.network import CNN3DBaseline, PQSegmentationNetwork

# Networks that save_network / load_network know, by class name.
NETWORK_CLASSES = {cls.__name__: cls for cls in (PQSegmentationNetwork, CNN3DBaseline)}

# Normalised signals are clipped to this: noise in voxels with a tiny b0
# would otherwise give huge values.
_MAX_NORMALISED_SIGNAL = 2.0


def signal_to_input(data, gtab, mask=None):
    """Network input from dMRI volumes: signal divided by the voxel's mean b0.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N) or (B, X, Y, Z, N)
        Diffusion-weighted signal of one volume or a batch of volumes.
    gtab : dipy.core.gradients.GradientTable
        Acquisition of the N measurements (with at least one b0).
    mask : ndarray, shape (X, Y, Z) or (B, X, Y, Z), optional
        Voxels to keep; others are set to 0.

    Returns
    -------
    inputs : torch.Tensor, shape (B, 1, N, X, Y, Z), float32
        Normalised signal, clipped to [0, 2].
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 4:
        data = data[None]
        mask = None if mask is None else np.asarray(mask)[None]
    if data.ndim != 5 or data.shape[-1] != len(gtab.bvals):
        raise ValueError(
            f"data must have shape (X, Y, Z, N) or (B, X, Y, Z, N) with N = {len(gtab.bvals)} "
            f"measurements, got {data.shape}")
    b0s = np.asarray(gtab.b0s_mask, dtype=bool)
    if not b0s.any():
        raise ValueError("gtab must contain at least one b0 measurement to normalise the signal")
    b0 = data[..., b0s].mean(axis=-1, keepdims=True)
    normalised = np.divide(data, b0, out=np.zeros_like(data), where=b0 > 0)
    normalised = np.clip(normalised, 0, _MAX_NORMALISED_SIGNAL)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape[:-1]:
            raise ValueError(f"mask must have shape {data.shape[:-1]}, got {mask.shape}")
        normalised = normalised * mask[..., None]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(normalised, -1, 1)[:, None]))


def segmentation_loss(logits, labels, mask=None, bce_weight=1.0, dice_weight=1.0):
    """Binary cross-entropy plus soft Dice loss over the masked voxels.

    Parameters
    ----------
    logits : torch.Tensor, shape (B, X, Y, Z)
    labels : torch.Tensor, shape (B, X, Y, Z)
        0/1 ground truth.
    mask : torch.Tensor, shape (B, X, Y, Z), optional
        Voxels that count.
    bce_weight, dice_weight : float, optional

    Returns
    -------
    loss : torch.Tensor (scalar)
        ``bce_weight * BCE + dice_weight * (1 - 2 sum(p y) / (sum(p) + sum(y)))``.
    """
    labels = labels.to(logits.dtype)
    weights = torch.ones_like(logits) if mask is None else mask.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, labels, weight=weights, reduction="sum")
    bce = bce / weights.sum().clamp_min(1)
    probabilities = torch.sigmoid(logits) * weights
    overlap = (probabilities * labels).sum()
    dice = 1 - (2 * overlap + 1) / (probabilities.sum() + (labels * weights).sum() + 1)
    return bce_weight * bce + dice_weight * dice


def _as_tensor(array, dtype=None):
    tensor = torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array)
    return tensor if dtype is None else tensor.to(dtype)


def _model_device(model, device):
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def train_segmentation(model, inputs, labels, masks=None, *, epochs=20, batch_size=2,
                       learning_rate=1e-3, bce_weight=1.0, dice_weight=1.0, device=None,
                       seed=0, verbose=True):
    """Train a segmentation network with Adam on BCE + Dice.

    Parameters
    ----------
    model : PQSegmentationNetwork or CNN3DBaseline
        Trained in place (moved to ``device``).
    inputs : torch.Tensor or ndarray, shape (N, 1, Q, X, Y, Z)
        Training volumes (:func:`signal_to_input`).
    labels : torch.Tensor or ndarray, shape (N, X, Y, Z)
        0/1 lesion labels.
    masks : torch.Tensor or ndarray, shape (N, X, Y, Z), optional
        Voxels that count in the loss.
    epochs : int, optional
    batch_size : int, optional
    learning_rate : float, optional
    bce_weight, dice_weight : float, optional
        See :func:`segmentation_loss`.
    device : str or torch.device, optional
        The model's device if None (e.g. ``"cuda"``).
    seed : int, optional
        Seed of the shuffling.
    verbose : bool, optional
        Show a tqdm progress bar over epochs.

    Returns
    -------
    history : list of float
        Mean training loss of each epoch.
    """
    inputs = _as_tensor(inputs, torch.get_default_dtype())
    labels = _as_tensor(labels)
    if inputs.ndim != 6:
        raise ValueError(f"inputs must have shape (N, 1, Q, X, Y, Z), got {tuple(inputs.shape)}")
    if tuple(labels.shape) != (inputs.shape[0],) + tuple(inputs.shape[3:]):
        raise ValueError(
            f"labels must have shape {(inputs.shape[0],) + tuple(inputs.shape[3:])}, "
            f"got {tuple(labels.shape)}")
    if masks is not None:
        masks = _as_tensor(masks)
        if masks.shape != labels.shape:
            raise ValueError(
                f"masks must have shape {tuple(labels.shape)}, got {tuple(masks.shape)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    device = _model_device(model, device)
    model.to(device)
    parameter = next(model.parameters())
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    history = []
    progress = tqdm(range(epochs), desc=f"training {type(model).__name__}", disable=not verbose)
    for _ in progress:
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            x = inputs[batch].to(device=device, dtype=parameter.dtype)
            y = labels[batch].to(device)
            m = None if masks is None else masks[batch].to(device)
            optimiser.zero_grad()
            loss = segmentation_loss(model.logits(x), y, m, bce_weight, dice_weight)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
            count += len(batch)
        history.append(total / count)
        progress.set_postfix(loss=f"{history[-1]:.4f}")
    return history


@torch.no_grad()
def predict_segmentation(model, inputs, batch_size=2, device=None):
    """Lesion probabilities of volumes, in eval mode.

    Parameters
    ----------
    model : PQSegmentationNetwork or CNN3DBaseline
    inputs : torch.Tensor or ndarray, shape (N, 1, Q, X, Y, Z)
    batch_size : int, optional
    device : str or torch.device, optional

    Returns
    -------
    probabilities : ndarray, shape (N, X, Y, Z), float32
    """
    inputs = _as_tensor(inputs)
    device = _model_device(model, device)
    model.to(device).eval()
    dtype = next(model.parameters()).dtype
    outputs = [model(inputs[start:start + batch_size].to(device=device, dtype=dtype)).cpu()
               for start in range(0, len(inputs), batch_size)]
    return torch.cat(outputs).to(torch.float32).numpy()


def save_network(network, path):
    """Write a segmentation network (class, constructor arguments, weights) to one file.

    The layout is :func:`esdmri.serialization.write_segmentation_file`'s.

    Parameters
    ----------
    network : PQSegmentationNetwork or CNN3DBaseline
    path : str or path-like
    """
    name = type(network).__name__
    if name not in NETWORK_CLASSES:
        raise TypeError(f"network must be one of {sorted(NETWORK_CLASSES)}, got {name}")
    write_segmentation_file(path, network_class=name, config=network.config,
                            state_dict=network.state_dict())


def load_network(path, device=None):
    """Read a network written by :func:`save_network`.

    Parameters
    ----------
    path : str or path-like
    device : str or torch.device, optional
        Where to put the network (CPU if None).

    Returns
    -------
    network : PQSegmentationNetwork or CNN3DBaseline
        In eval mode, with the saved weights and dtype.
    """
    saved = read_segmentation_file(path)
    if saved["class"] not in NETWORK_CLASSES:
        raise ValueError(f"{path} holds a {saved['class']}, not one of "
                         f"{sorted(NETWORK_CLASSES)}")
    network = NETWORK_CLASSES[saved["class"]](**saved["config"])
    dtype = next(value.dtype for value in saved["state_dict"].values()
                 if value.is_floating_point())
    network.to(dtype=dtype)
    network.load_state_dict(saved["state_dict"])
    return network.to(device or "cpu").eval()
