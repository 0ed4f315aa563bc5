"""Checks and normalisation of the scans a deconvolution model receives."""

import numpy as np
import torch


def check_data(data, gtab):
    """Validate a 4D dMRI volume against its gradient table.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    data : ndarray, shape (X, Y, Z, N)
        The same values as a float32 array.
    """
    if not hasattr(gtab, "bvals") or not hasattr(gtab, "b0s_mask"):
        raise TypeError(f"gtab must be a dipy GradientTable, got {type(gtab).__name__}")
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be a 4D array (X, Y, Z, N), got shape {data.shape}")
    if data.shape[-1] != len(gtab.bvals):
        raise ValueError(
            f"data has {data.shape[-1]} volumes but gtab has {len(gtab.bvals)} "
            "b-values: they must match")
    if not np.issubdtype(data.dtype, np.number):
        raise TypeError(f"data must be numeric, got dtype {data.dtype}")
    if not np.isfinite(data).all():
        raise ValueError("data contains NaN or inf values: mask or clean them first")
    if not gtab.b0s_mask.any():
        raise ValueError("gtab has no b0 volume (b <= b0_threshold): the signal cannot "
                         "be normalised")
    return data.astype(np.float32, copy=False)


def check_mask(mask, spatial_shape):
    """Validate a brain mask, defaulting to every voxel.

    Parameters
    ----------
    mask : ndarray or None, shape (X, Y, Z)
    spatial_shape : tuple of int

    Returns
    -------
    mask : ndarray of bool, shape (X, Y, Z)
    """
    if mask is None:
        return np.ones(spatial_shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != tuple(spatial_shape):
        raise ValueError(f"mask has shape {mask.shape} but data's voxel grid is "
                         f"{tuple(spatial_shape)}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty: it selects no voxel")
    return mask


def normalize_by_b0(data, gtab, mask):
    """Divide each voxel's signal by its mean b0 signal.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
    gtab : dipy.core.gradients.GradientTable
    mask : ndarray of bool, shape (X, Y, Z)

    Returns
    -------
    normalized : ndarray, float32, shape (X, Y, Z, N)
        Zero outside ``mask``.
    mask : ndarray of bool, shape (X, Y, Z)
        ``mask`` without the voxels whose mean b0 is not positive.
    """
    mean_b0 = data[..., gtab.b0s_mask].mean(axis=-1)
    mask = mask & (mean_b0 > 0)
    if not mask.any():
        raise ValueError("no voxel in mask has a positive mean b0 signal")
    normalized = np.zeros(data.shape, dtype=np.float32)
    normalized[mask] = data[mask] / mean_b0[mask, None]
    return normalized, mask


def resolve_device(device):
    """A ``torch.device`` for ``device``, checking that CUDA exists when asked."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available "
                         "on this machine: use device='cpu'")
    return resolved
