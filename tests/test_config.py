"""The configuration dataclasses: frozen, validated, the one source of the models' defaults."""

import dataclasses

import pytest

from esdmri.reconst.config import (DeconvolutionConfig, NetworkConfig, RefinementConfig,
                                   TrainingConfig, option_defaults, options_docstring)

# The configuration of model format 3 as written before the dataclasses were
# split (esdmri 0.1.0's DeconvolutionConfig, asdict): files of that layout must load.
FORMAT_3_DEFAULTS = {
    "conv_kind": "mixed", "sh_order_max": 8, "nside": 4, "hemisphere": True, "depth": 2,
    "filter_start": 8, "kernel_size": 3, "spatial_kernel_size": 3, "spatial_layers": 1,
    "block_size": 8, "normalize": None, "linear_prior": True, "refine_steps": 300,
    "refine_lr": 1e-3, "refine_tv": 20.0, "refine_smoothing": 1e-3,
    "refine_similarity": False, "refine_tolerance": 1e-3,
    "loss_weights": {"intensity": 1.0, "sparsity": 1e-4, "nonnegativity": 0.1,
                     "total_variation": 0.0},
    "epochs": 30, "train_windows": 100, "batch_size": 1, "lr": 1.7e-3, "patience": 3,
    "seed": 0}


def test_saved_layout_is_model_format_3():
    config = DeconvolutionConfig("mixed")
    assert config.to_dict() == FORMAT_3_DEFAULTS
    changed = {**FORMAT_3_DEFAULTS, "nside": 8, "refine_steps": 0,
               "loss_weights": {**FORMAT_3_DEFAULTS["loss_weights"], "sparsity": 0.5}}
    loaded = DeconvolutionConfig.from_dict(changed)
    assert loaded.network.nside == 8 and loaded.refinement.refine_steps == 0
    assert loaded.training.sparsity == 0.5 and loaded.training.loss_weights.sparsity == 0.5
    assert loaded.to_dict() == changed


def test_configurations_are_frozen_and_replace_validates():
    config = DeconvolutionConfig.from_options("spherical", epochs=5, refine_tv=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training.epochs = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.network = NetworkConfig()
    other = config.replace(nside=8, batch_size=2)
    assert (other.network.nside, other.training.batch_size, other.training.epochs,
            other.refinement.refine_tv) == (8, 2, 5, 1.0)
    assert config.network.nside == 4 and config.training.batch_size == 1
    with pytest.raises(ValueError, match="refine_steps must be an integer >= 0"):
        config.replace(refine_steps=2.5)
    with pytest.raises(TypeError, match=r"unknown model option\(s\) \['nsides'\]"):
        config.replace(nsides=8)


@pytest.mark.parametrize("options, message", [
    (dict(sh_order_max=7), "sh_order_max must be an even integer"),
    (dict(sh_order_max=8, nside=2), "sh_order_max=8 needs 45"),
    (dict(sh_order_max=4, nside=2, depth=3), "depth=3 needs nside >= 4"),
    (dict(normalize="yes"), "normalize must be None, True or False"),
    (dict(block_size=0), "block_size must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(epochs=-1), "epochs must be an integer >= 0"),
    (dict(train_windows=0), "train_windows must be an integer >= 1"),
    (dict(sparsity=-1.0), "loss weight sparsity must be >= 0"),
    (dict(refine_lr=0.0), "refine_lr must be > 0"),
    (dict(refine_tv=-1.0), "refine_tv must be >= 0"),
    (dict(refine_smoothing=0.0), "refine_smoothing must be > 0"),
    (dict(epochs=0, linear_prior=False), "epochs=0 needs linear_prior=True"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        DeconvolutionConfig.from_options("mixed", **options)


def test_defaults_and_docs_come_from_the_fields():
    defaults = option_defaults()
    fields = [f for cls in (NetworkConfig, TrainingConfig, RefinementConfig)
              for f in dataclasses.fields(cls)]
    assert list(defaults) == [f.name for f in fields]
    assert defaults["lr"] == 1.7e-3 and defaults["nside"] == 4
    text = options_docstring()
    for name, value in defaults.items():
        if name in ("sparsity", "nonnegativity", "total_variation"):
            continue
        assert f"{name} : " in text and f"default {value!r}" in text, name
    assert "sparsity, nonnegativity, total_variation : float, defaults 0.0001, 0.1, 0.0" in text
    from esdmri import RTESDModel
    assert "    nside : int, default 4\n" in RTESDModel.__doc__
