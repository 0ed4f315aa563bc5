"""esdmri.testing's e3nn-style assert_equivariant: it draws and rotates its own inputs."""

import pytest
import torch

from esdmri.nn.gated import GatedNonlinearity
from esdmri.nn.tensor_field import TensorFieldType
from esdmri.testing import assert_equivariant


def test_field_types_give_random_rotations_that_an_equivariant_layer_passes():
    field = TensorFieldType((2, 1, 1))
    gate = GatedNonlinearity(field).double()
    error = assert_equivariant(gate, field_in=field.with_gates(), field_out=field,
                               label="gated nonlinearity")
    assert error < 1e-12
    # The same on a voxel grid, rotated with it.
    assert_equivariant(gate, field_in=field.with_gates(), field_out=field,
                       spatial_shape=(3, 3, 3))


def test_field_types_catch_a_layer_that_is_not_equivariant():
    field = TensorFieldType((1, 1))
    # A ReLU on every row treats a vector's components one by one.
    with pytest.raises(AssertionError, match="is not equivariant from .* relative error"):
        assert_equivariant(torch.relu, field_in=field)
    # A scalar field is invariant under any rotation, so the ReLU passes there.
    assert_equivariant(torch.relu, field_in=TensorFieldType(3))


def test_field_types_and_inputs_are_not_mixed():
    field = TensorFieldType(1)
    with pytest.raises(TypeError, match="not both"):
        assert_equivariant(torch.relu, torch.zeros(1, 1), lambda f: f, field_in=field)
    with pytest.raises(TypeError, match="needs x and transform_in"):
        assert_equivariant(torch.relu)
