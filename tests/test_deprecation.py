"""Renamed and positional arguments keep working, with a warning naming the new spelling."""

import pytest
import torch

from esdmri.deprecation import ArgsDeprecationWarning, deprecated_params, keyword_only_from
from esdmri.nn.pooling import Pool
from esdmri.nn.unet import UNet
from esdmri.sphere import HealpixSphere


def test_deprecated_params_renames_and_refuses_both():
    @deprecated_params("old", "new", since="0.2")
    def function(new=0):
        return new

    with pytest.warns(ArgsDeprecationWarning, match="'old' is deprecated since esdmri 0.2"):
        assert function(old=3) == 3
    assert function(new=4) == 4
    with pytest.raises(TypeError, match="both 'old' and 'new'"):
        function(old=1, new=2)


def test_keyword_only_from_maps_positions_onto_the_keywords():
    @keyword_only_from("mask", "retrain", since="0.2")
    def fit(data, *, mask=None, retrain=None):
        return data, mask, retrain

    assert fit(1, mask=2) == (1, 2, None)
    with pytest.warns(ArgsDeprecationWarning, match="mask, retrain by position"):
        assert fit(1, 2, 3) == (1, 2, 3)
    with pytest.raises(TypeError, match="takes 1 positional arguments but 4"):
        fit(1, 2, 3, 4)
    with pytest.raises(ValueError, match="no keyword-only"):
        keyword_only_from("data", since="0.2")(fit.__wrapped__)


def test_former_names_of_the_convolution_and_pooling_kinds():
    sphere = HealpixSphere(2, hemisphere=True)
    with pytest.warns(ArgsDeprecationWarning, match="conv='e3so3'"):
        old = UNet(2, 1, sphere, depth=2, filter_start=2, conv="mixed")
    assert old.conv_name == "e3so3"
    with pytest.warns(ArgsDeprecationWarning, match="kind='both'"):
        pool = Pool("mixed")
    assert pool.kind == "both"
    x = torch.randn(1, 1, sphere.n_vertices, 2, 2, 2)
    pooled, _ = pool(x)
    assert pooled.shape == (1, 1, sphere.n_vertices // 4, 1, 1, 1)
    torch.testing.assert_close(pooled, Pool("both")(x)[0])
