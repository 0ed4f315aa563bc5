"""Segmentation networks on 6D dMRI: the equivariant pq-network and a 3D CNN baseline.

Both take ``[batch, 1, Q, X, Y, Z]`` (the normalised signal of Q
measurements, see :func:`esdmri.segmentation.signal_to_input`) and return
voxel-wise lesion probabilities ``[batch, X, Y, Z]``; ``logits`` gives the
values before the sigmoid (for training with a stable BCE).
"""

import math

import numpy as np
import torch
from torch import nn

from esdmri.nn.gated import EquivariantBatchNorm, GatedNonlinearity, swish
from esdmri.nn.pq import PConv, PQConv, QReduction, _check_q, symmetric_q_sampling
from esdmri.nn.tensor_field import as_field_type


def _check_input(x, n_q, name="input"):
    if x.ndim != 6 or x.shape[1] != 1 or x.shape[2] != n_q:
        raise ValueError(f"{name} must have shape (batch, 1, {n_q}, X, Y, Z), got {tuple(x.shape)}")


class PQSegmentationNetwork(nn.Module):
    """Five SE(3)-equivariant layers (Mueller et al.) for voxel-wise segmentation.

    ``pq -> pq -> pq + q-reduction -> p -> p``: the first pq-layer maps the
    acquisition's q-samples onto the hidden q-sampling, the third one is
    followed by a q-reduction that leaves a 3D spherical-tensor field, and
    two 3D steerable convolutions end in one scalar channel. Every layer but
    the last is followed by equivariant batch norm (optional) and the gated
    nonlinearity (swish on scalars); the output is a sigmoid. The output is
    invariant to rotating the whole 6D input (voxel grid and q-space
    together) by any rotation that maps the grid and ``q_hidden`` onto
    themselves, and approximately invariant to any other rotation.

    Parameters
    ----------
    q : array_like, shape (Q, 3)
        q-vectors of the input measurements (``esdmri.nn.pq.q_from_gtab``).
    hidden : int or sequence of int, optional
        Multiplicities per order ``l`` of the hidden fields.
    q_hidden : array_like, shape (Q_h, 3), optional
        Hidden q-sampling; the origin plus the 6 face directions ``+-x, +-y,
        +-z`` at ``|q| = 1`` (:func:`esdmri.nn.pq.symmetric_q_sampling`) if
        None. Denser samplings (14 or 26 directions) approach invariance to
        arbitrary rotations more closely, at a cost that grows as ``Q_h^2``.
    kernel_size : {1, 3, 5}, optional
        Voxel kernel size of every layer.
    n_radial_q : int, optional
        Radial functions on q-lengths in the pq-layers and the q-reduction.
    max_order_q : int, optional
        Largest q-harmonic order in the pq-kernels.
    batch_norm : bool, optional
        Equivariant batch norm before each gated nonlinearity.
    """

    def __init__(self, q, hidden=(4, 2, 1), q_hidden=None, kernel_size=3, *, n_radial_q=3,
                 max_order_q=3, batch_norm=True):
        super().__init__()
        q = _check_q(q, "q")
        q_hidden = symmetric_q_sampling(6) if q_hidden is None else _check_q(q_hidden, "q_hidden")
        hidden = as_field_type(hidden, "hidden")
        gated = hidden.with_gates()
        pq_options = dict(kernel_size=kernel_size, n_radial_q=n_radial_q, max_order_q=max_order_q)
        self.layers = nn.ModuleList([
            PQConv(1, gated, q, q_hidden, **pq_options),
            PQConv(hidden, gated, q_hidden, **pq_options),
            PQConv(hidden, gated, q_hidden, **pq_options),
            PConv(hidden, gated, kernel_size),
            PConv(hidden, 1, kernel_size),
        ])
        self.q_reduction = QReduction(hidden, q_hidden, n_radial_q)
        self.norms = nn.ModuleList([
            EquivariantBatchNorm(gated) if batch_norm else nn.Identity() for _ in range(4)])
        self.gates = nn.ModuleList([GatedNonlinearity(hidden) for _ in range(4)])
        self._config = dict(q=q.tolist(), hidden=list(hidden.multiplicities),
                            q_hidden=q_hidden.tolist(), kernel_size=kernel_size,
                            n_radial_q=n_radial_q, max_order_q=max_order_q,
                            batch_norm=bool(batch_norm))

    @property
    def config(self):
        """Constructor arguments (plain Python types), for :func:`save_model`."""
        return dict(self._config)

    @property
    def n_q(self):
        return self.layers[0].n_q_in

    def logits(self, x):
        """Lesion logits ``[batch, X, Y, Z]`` of ``x`` ``[batch, 1, Q, X, Y, Z]``."""
        _check_input(x, self.n_q)
        for index in range(3):
            x = self.gates[index](self.norms[index](self.layers[index](x)))
        x = self.q_reduction(x)
        x = self.gates[3](self.norms[3](self.layers[3](x)))
        return self.layers[4](x)[:, 0]

    def forward(self, x):
        """Lesion probabilities ``[batch, X, Y, Z]`` of ``x`` ``[batch, 1, Q, X, Y, Z]``."""
        return torch.sigmoid(self.logits(x))


class CNN3DBaseline(nn.Module):
    """Non-equivariant reference: five 3D convolutions, q-samples as input channels.

    ``conv(Q -> width) -> 3 x conv(width -> width) -> conv(width -> 1)``,
    each but the last followed by batch norm (optional) and swish; sigmoid
    output.

    Parameters
    ----------
    n_q : int
        Number of measurements Q (input channels).
    width : int, optional
        Hidden channels; see :meth:`width_for_parameters` to match another
        network's parameter count.
    kernel_size : {1, 3, 5}, optional
    batch_norm : bool, optional
    """

    def __init__(self, n_q, width=32, kernel_size=3, *, batch_norm=True):
        super().__init__()
        for name, value in (("n_q", n_q), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kernel_size not in (1, 3, 5):
            raise ValueError(f"kernel_size must be one of (1, 3, 5) (odd), got {kernel_size!r}")
        n_q, width = int(n_q), int(width)
        channels = [n_q, width, width, width, width, 1]
        self.layers = nn.ModuleList([
            nn.Conv3d(c_in, c_out, kernel_size, padding=kernel_size // 2)
            for c_in, c_out in zip(channels[:-1], channels[1:])])
        self.norms = nn.ModuleList([
            nn.BatchNorm3d(width) if batch_norm else nn.Identity() for _ in range(4)])
        self._config = dict(n_q=n_q, width=width, kernel_size=kernel_size,
                            batch_norm=bool(batch_norm))

    @staticmethod
    def width_for_parameters(n_q, n_parameters, kernel_size=3, batch_norm=True):
        """Width whose network has about ``n_parameters`` learned parameters."""
        taps = kernel_size**3
        # taps (Q w + 3 w^2 + w) + 4 w (+ 8 w for batch norm) + 1 = n_parameters
        a = 3 * taps
        b = taps * (n_q + 1) + 4 + (8 if batch_norm else 0)
        c = 1 - n_parameters
        return max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))

    @property
    def config(self):
        """Constructor arguments (plain Python types), for :func:`save_model`."""
        return dict(self._config)

    @property
    def n_q(self):
        return self._config["n_q"]

    def logits(self, x):
        """Lesion logits ``[batch, X, Y, Z]`` of ``x`` ``[batch, 1, Q, X, Y, Z]``."""
        _check_input(x, self.n_q)
        x = x[:, 0]
        for layer, norm in zip(self.layers[:-1], self.norms):
            x = swish(norm(layer(x)))
        return self.layers[-1](x)[:, 0]

    def forward(self, x):
        """Lesion probabilities ``[batch, X, Y, Z]`` of ``x`` ``[batch, 1, Q, X, Y, Z]``."""
        return torch.sigmoid(self.logits(x))
