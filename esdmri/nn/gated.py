"""Equivariant nonlinearity and normalisation for spherical-tensor fields.

Both act on ``[batch, channels, ...]`` tensors laid out as in
:mod:`esdmri.nn.tensor_field` (any trailing axes: q-samples, voxels) and
commute with rotations: scalars are invariant, and channels of order
``l > 0`` are only ever multiplied by invariant factors.
"""

import torch
import torch.nn.functional as F
from e3nn.nn import BatchNorm
from torch import nn

from esdmri.nn.tensor_field import as_field_type


def swish(x):
    """Swish ``x * sigmoid(x)`` (Ramachandran et al.; torch's SiLU)."""
    return F.silu(x)


class GatedNonlinearity(nn.Module):
    """Gated nonlinearity (Weiler et al.): swish on scalars, sigmoid gates for l > 0.

    Parameters
    ----------
    field : TensorFieldType or int or sequence of int
        Field type of the output. The input has ``field.with_gates()``: its
        scalar block is ``[scalars | gates]``, one gate per channel of order
        ``l > 0`` in layout order.

    Notes
    -----
    Input ``[batch, field.with_gates().dim, ...]``, output ``[batch,
    field.dim, ...]``: ``swish(s)`` for each scalar ``s`` and
    ``sigmoid(g_c) * v_c`` for each channel ``v_c`` of order ``l > 0``.
    """

    def __init__(self, field):
        super().__init__()
        self.field = as_field_type(field, "field")
        self.in_field = self.field.with_gates()
        self.n_scalars = self.field.multiplicity(0)
        self.n_gates = self.in_field.multiplicity(0) - self.n_scalars
        # Gate of each row of the l > 0 blocks.
        gate_of_row = self.field.channel_of_row()[self.n_scalars:] - self.n_scalars
        self.register_buffer("gate_of_row", gate_of_row, persistent=False)

    def forward(self, x):
        """Apply to ``x`` of shape (batch, field.with_gates().dim, ...)."""
        self.in_field.check(x, "input")
        scalars = swish(x[:, :self.n_scalars])
        if not self.n_gates:
            return scalars
        gates = torch.sigmoid(x[:, self.n_scalars:self.n_scalars + self.n_gates])
        gated = x[:, self.n_scalars + self.n_gates:] * gates.index_select(1, self.gate_of_row)
        return torch.cat([scalars, gated], dim=1)

    def extra_repr(self):
        return f"{self.in_field} -> {self.field}"


class EquivariantBatchNorm(nn.Module):
    """Batch norm for spherical-tensor fields (e3nn's ``BatchNorm``).

    Scalars are centred and scaled by their standard deviation; a channel
    of order ``l > 0`` is divided by the root mean square of its
    components (no centring, which would break equivariance), then scaled
    by a learned factor. Statistics run over the batch and every trailing
    axis (q-samples, voxels).

    Parameters
    ----------
    field : TensorFieldType or int or sequence of int
    eps : float, optional
    momentum : float, optional
        Of the running statistics used in eval mode.

    Notes
    -----
    Input and output ``[batch, field.dim, ...]``.
    """

    def __init__(self, field, eps=1e-5, momentum=0.1):
        super().__init__()
        self.field = as_field_type(field, "field")
        self.norm = BatchNorm(self.field.irreps, eps=eps, momentum=momentum)

    def forward(self, x):
        """Normalise ``x`` of shape (batch, field.dim, ...)."""
        self.field.check(x, "input")
        # e3nn expects the channel axis last.
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)

    def extra_repr(self):
        return f"{self.field}"
