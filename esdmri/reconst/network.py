"""From grid signals to tissue SH coefficients and back to the signal.

``DeconvolutionNetwork`` wraps a U-Net from :mod:`esdmri.nn.unet`: the U-Net
outputs one spherical function per tissue on the HEALPix grid; the WM
function becomes even SH coefficients by least squares on the grid, GM and
CSF become isotropic (l = 0) coefficients, and ``ForwardModel`` convolves
them with the response functions to predict the measured signal.

With a linear prior (the default of the models) the U-Net's output is a
signed correction added to the regularised least-squares deconvolution of
the grid signal (:func:`linear_deconvolution_operator`), and its head starts
at zero: training starts from a fit that already explains the signal and
only has to sharpen it, instead of from a random network.
"""

import math

import numpy as np
import torch
from dipy.core.gradients import gradient_table
from torch import nn

from ..nn.chebyshev import ChebyshevOperator
from ..nn.e3so3 import E3SO3Conv
from ..nn.unet import ConvBlock, UNet
from ..shm import n_coeffs, sh_matrix
from ..sphere import HealpixSphere
from .config import canonical_conv_kind

SQRT_4PI = math.sqrt(4 * math.pi)

# Smallest tissue-fraction sum the normalisation divides by. Signals are
# divided by their b0, so a voxel's fractions sum to about 1; a signed
# correction can drive the sum of a voxel to zero or below during training,
# and dividing by it then blew the coefficients up a million-fold (measured:
# losses of 1e8 that wrecked RT-ESD's training).
NORMALIZATION_FLOOR = 0.1

# Dense sphere on which the sparsity and non-negativity terms sample the fODF.
SAMPLING_NSIDE = 8


def build_unet(conv_kind, sphere, in_channels, out_channels, *, depth, filter_start,
               kernel_size, spatial_kernel_size, spatial_layers, layout="dense",
               signed_output=False, norm="batch"):
    """The U-Net of one model kind, with a bounded spatial reach.

    Parameters
    ----------
    conv_kind : {"spherical", "e3so3-stem", "concat"}
        ESD (voxel-wise), RT-ESD (a stem of E(3) x SO(3) convolutions, see Notes)
        and C-ESD.
    sphere : HealpixSphere
    in_channels, out_channels : int
        Shells (b0 included) and tissues.
    depth, filter_start, kernel_size : int
        U-Net levels, first-level channels, Chebyshev kernel size.
    spatial_kernel_size : int
        Odd edge of the isotropic 3D kernel (e3so3-stem) or of the concatenated
        neighbourhood (concat).
    spatial_layers : int
        Number of E(3) x SO(3) convolutions (e3so3-stem only).
    signed_output : bool, optional
        No Softplus: the U-Net outputs a correction (see
        :class:`DeconvolutionNetwork`).
    norm : {"batch", "voxel"}, optional
        Normalisation after each convolution (:class:`esdmri.nn.unet.ConvBlock`).

    Returns
    -------
    torch.nn.Module
        ``[B, in_channels, V, X, Y, Z]`` -> ``[B, out_channels, V, X, Y, Z]``,
        >= 0 unless ``signed_output``.

    Notes
    -----
    The published RT-ESD networks see a patch of 3 to 5 voxels around each
    voxel. Here the RT-ESD network starts with ``spatial_layers`` E(3) x SO(3)
    convolutions at full resolution (each reaching one more voxel for a
    kernel of 3) followed by a spherical U-Net, so its receptive radius is
    ``spatial_layers * (spatial_kernel_size // 2)`` voxels and block-wise
    inference only needs a halo that wide. Every layer stays equivariant to
    grid translations, rotations and reflections and to sphere rotations.
    """
    if conv_kind in ("spherical", "concat"):
        return UNet(in_channels, out_channels, sphere, depth=depth, filter_start=filter_start,
                    conv=conv_kind, kernel_size=kernel_size,
                    spatial_kernel_size=spatial_kernel_size, layout=layout,
                    non_negative=not signed_output, norm=norm)
    conv_kind = canonical_conv_kind(conv_kind)
    if conv_kind != "e3so3-stem":
        raise ValueError(f"conv_kind must be 'spherical', 'e3so3-stem' or 'concat', "
                         f"got {conv_kind!r}")
    if spatial_layers < 1:
        raise ValueError(f"spatial_layers must be >= 1 for RT-ESD, got {spatial_layers}")
    operator = ChebyshevOperator(sphere.chebyshev_basis(kernel_size), layout)
    stem = ConvBlock([in_channels] + [filter_start] * spatial_layers,
                     lambda c_in, c_out: E3SO3Conv(c_in, c_out, operator,
                                                   spatial_kernel_size=spatial_kernel_size,
                                                   bias=False), norm)
    spherical = UNet(filter_start, out_channels, sphere, depth=depth,
                     filter_start=filter_start, conv="spherical",
                     kernel_size=kernel_size, layout=layout,
                     non_negative=not signed_output, norm=norm)
    return nn.Sequential(stem, spherical)


def linear_deconvolution_operator(response, shell_bvals, vertices, sh_order_max,
                                  regularization=1e-3):
    """Regularised least-squares deconvolution of a grid signal.

    Solves ``min_c ||G c - g||^2 + lambda ||c||^2`` for the tissue
    coefficients ``c`` of one voxel, where ``g`` is its signal on the grid
    (one row of vertices per shell) and ``G`` the forward model evaluated at
    the grid directions. Like the rest of the network it commutes with
    rotations (up to grid sampling): ``G`` acts degree by degree in the SH
    domain.

    Parameters
    ----------
    response : TissueResponse
        Normalised responses (unit b0 signal), one row per shell.
    shell_bvals : ndarray, shape (S,)
        b-value of each grid channel (b0 first), as from
        :func:`esdmri.shm.group_shells`.
    vertices : ndarray, shape (V, 3)
    sh_order_max : int
        Even SH order of the WM fODF.
    regularization : float, optional
        ``lambda`` relative to the mean diagonal of ``G^T G``.

    Returns
    -------
    operator : ndarray, shape (C_total, S, V)
        ``c = einsum("csv,sv->c", operator, g)``.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    n_shells, n_vertices = len(shell_bvals), len(vertices)
    grid_gtab = gradient_table(np.repeat(np.asarray(shell_bvals, float), n_vertices),
                               bvecs=np.tile(vertices, (n_shells, 1)),
                               b0_threshold=max(float(np.min(shell_bvals)), 0.0))
    forward = stacked_forward_matrix(response, grid_gtab, sh_order_max)  # (C, S V)
    gram = forward @ forward.T
    damping = regularization * np.trace(gram) / len(gram)
    operator = np.linalg.solve(gram + damping * np.eye(len(gram)), forward)
    return operator.reshape(len(gram), n_shells, n_vertices)


def volume_fractions_from_coefficients(coefficients, n_wm_coeffs):
    """Tissue signal fractions from concatenated coefficients ``[..., C_total]``.

    A tissue's fraction is the integral of its spherical function over the
    sphere, ``sqrt(4 pi) c_00``, for responses normalised to a unit b0 signal.

    Returns
    -------
    fractions : array or Tensor, shape (..., T)
    """
    wm = coefficients[..., :1]
    isotropic = coefficients[..., n_wm_coeffs:]
    if isinstance(coefficients, torch.Tensor):
        return SQRT_4PI * torch.cat([wm, isotropic], dim=-1)
    return SQRT_4PI * np.concatenate([wm, isotropic], axis=-1)


def normalize_fractions(coefficients, n_wm_coeffs):
    """Coefficients ``[..., C_total]`` scaled so their tissue fractions sum to 1.

    The sum is floored at :data:`NORMALIZATION_FLOOR`.

    Returns
    -------
    coefficients : array or Tensor, shape (..., C_total)
    """
    total = volume_fractions_from_coefficients(coefficients, n_wm_coeffs).sum(-1)
    if isinstance(coefficients, torch.Tensor):
        return coefficients / total.clamp_min(NORMALIZATION_FLOOR).unsqueeze(-1)
    return coefficients / np.maximum(total, NORMALIZATION_FLOOR)[..., None]


class DeconvolutionNetwork(nn.Module):
    """U-Net on the HEALPix grid followed by the tissue heads.

    Parameters
    ----------
    unet : torch.nn.Module
        Maps ``[B, S, V, X, Y, Z]`` to non-negative ``[B, T, V, X, Y, Z]``, one
        output channel per tissue (WM first).
    sphere : esdmri.sphere.HealpixSphere
        The grid of the U-Net's first level.
    sh_order_max : int
        Even SH order of the WM fODF.
    normalize : bool
        Divide all coefficients so the tissue fractions sum to 1.
    prior : ndarray, shape (C_total, S, V), optional
        :func:`linear_deconvolution_operator`; the U-Net's (signed) output is
        then a correction added to that linear estimate.
    """

    def __init__(self, unet, sphere, sh_order_max, normalize=True, prior=None):
        super().__init__()
        self.unet = unet
        self.sh_order_max = sh_order_max
        self.n_wm_coeffs = n_coeffs(sh_order_max)
        self.normalize = normalize
        grid_basis = sh_matrix(sh_order_max, sphere.vertices)  # (V, C)
        self.register_buffer("grid_to_sh", torch.as_tensor(
            np.linalg.pinv(grid_basis), dtype=torch.float32))  # (C, V)
        self.register_buffer("prior", None if prior is None else torch.as_tensor(
            prior, dtype=torch.float32))

    def zero_correction(self):
        """Zero the U-Net's head, so the output is the linear prior alone.

        Done after construction-time probes (the receptive radius is found by
        autograd, which a zero head would hide).
        """
        if self.prior is None:
            raise ValueError("zero_correction needs a network built with a prior")
        head = [module for module in self.unet.modules() if isinstance(module, UNet)][-1].head
        for parameter in head.parameters():
            nn.init.zeros_(parameter)

    def forward(self, grid_signal):
        """Tissue coefficients of a window.

        Parameters
        ----------
        grid_signal : Tensor, shape [B, S, V, X, Y, Z]

        Returns
        -------
        coefficients : Tensor, shape [B, C_wm + T - 1, X, Y, Z]
            WM SH coefficients (non-legacy descoteaux07) followed by one
            l = 0 coefficient per isotropic tissue.
        """
        tissues = self.unet(grid_signal)
        wm = torch.einsum("cv,bvxyz->bcxyz", self.grid_to_sh, tissues[:, 0])
        # An isotropic tissue is a constant function; the max over vertices
        # (as in ESD and RT-ESD) times sqrt(4 pi) is the l = 0 coefficient of that constant.
        isotropic = tissues[:, 1:].amax(dim=2) * SQRT_4PI
        if self.prior is not None:
            linear = torch.einsum("csv,bsvxyz->bcxyz", self.prior, grid_signal)
            wm = wm + linear[:, :self.n_wm_coeffs]
            isotropic = torch.relu(isotropic + linear[:, self.n_wm_coeffs:])
        coefficients = torch.cat([wm, isotropic], dim=1)
        if self.normalize:
            coefficients = normalize_fractions(coefficients.movedim(1, -1),
                                               self.n_wm_coeffs).movedim(-1, 1)
        return coefficients


class ForwardModel(nn.Module):
    """Linear map from tissue coefficients to the measured signal (ESD, RT-ESD).

    Parameters
    ----------
    forward_matrix : ndarray, shape (C_total, N)
        Rows stacked as WM SH coefficients then isotropic tissues, from
        :meth:`esdmri.response.TissueResponse.forward_matrices`.
    """

    def __init__(self, forward_matrix):
        super().__init__()
        self.register_buffer("matrix", torch.as_tensor(forward_matrix, dtype=torch.float32))

    def forward(self, coefficients):
        """``[B, C_total, X, Y, Z]`` -> signal ``[B, N, X, Y, Z]``."""
        return torch.einsum("bcxyz,cn->bnxyz", coefficients, self.matrix)


def stacked_forward_matrix(response, gtab, sh_order_max):
    """Forward matrices of all tissues stacked WM first, shape (C_total, N)."""
    matrices = response.forward_matrices(gtab, sh_order_max)
    return np.concatenate([matrices[tissue] for tissue in response.tissues], axis=0)


def build_forward_model(response, gtab, sh_order_max, device="cpu"):
    """The forward model of b0-normalised responses for one acquisition.

    Parameters
    ----------
    response : TissueResponse
        Normalised here (divided by its b0 signal), as the signals are.
    gtab : GradientTable
    sh_order_max : int
    device : str or torch.device

    Returns
    -------
    forward_model : ForwardModel
        Maps ``[B, C_total, X, Y, Z]`` to ``[B, N, X, Y, Z]``.
    """
    matrix = stacked_forward_matrix(response.normalized(), gtab, sh_order_max)
    return ForwardModel(matrix).to(device)


def build_fodf_sampler(sh_order_max, device="cpu"):
    """SH matrix of the dense sphere on which the loss samples the WM fODF.

    Parameters
    ----------
    sh_order_max : int
    device : str or torch.device

    Returns
    -------
    sampler : Tensor, float32, shape [V_dense, C_wm]
        HEALPix hemisphere of nside :data:`SAMPLING_NSIDE`.
    """
    sampling = HealpixSphere(SAMPLING_NSIDE, hemisphere=True)
    return torch.as_tensor(sh_matrix(sh_order_max, sampling.vertices), dtype=torch.float32,
                           device=device)
