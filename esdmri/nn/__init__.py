"""Spatio-spherical neural network layers and the deconvolution U-Net.

All layers take and return ``[batch, channels, vertices, X, Y, Z]`` tensors
(``vertices = 1`` for purely spatial fields).
"""

from esdmri.nn.chebyshev import ChebyshevOperator, SphericalConv
from esdmri.nn.e3so3 import E3SO3Conv
from esdmri.nn.pooling import Pool, Unpool
from esdmri.nn.spatial import NeighbourhoodConcat, NeighbourhoodSums, SpatialConv
from esdmri.nn.unet import (CONV_KINDS, ConvKind, ConvOptions, UNet, get_conv_kind,
                            register_conv_kind)

__all__ = [
    "ChebyshevOperator",
    "SphericalConv",
    "E3SO3Conv",
    "SpatialConv",
    "NeighbourhoodSums",
    "NeighbourhoodConcat",
    "Pool",
    "Unpool",
    "UNet",
    "CONV_KINDS",
    "ConvKind",
    "ConvOptions",
    "get_conv_kind",
    "register_conv_kind",
]
