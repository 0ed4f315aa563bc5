"""The configuration dataclasses: frozen, validated, the one source of the models' defaults."""

import dataclasses
import warnings

import pytest

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges

from esdmri import RTESDModel
from esdmri.reconst.config import (DeconvolutionConfig, NetworkConfig, RefinementConfig,
                                   TrainingConfig, default_refine_tv, default_sh_order,
                                   default_sparsity, option_defaults,
                                   options_docstring)
from esdmri.reconst.inputs import super_resolved_shell
from esdmri.shm import n_coeffs

# The configuration of model format 3 as written before the dataclasses were
# split (esdmri 0.1.0's DeconvolutionConfig, asdict): files of that layout must load.
FORMAT_3_DEFAULTS = {
    "conv_kind": "mixed", "sh_order_max": 8, "nside": 4, "hemisphere": True, "depth": 2,
    "filter_start": 8, "kernel_size": 3, "spatial_kernel_size": 3, "spatial_layers": 1,
    "block_size": 8, "normalize": None, "linear_prior": True, "refine_steps": 300,
    "refine_lr": 1e-3, "refine_tv": 10.0, "refine_smoothing": 1e-3,
    "refine_similarity": False, "refine_tolerance": 1e-4,
    "loss_weights": {"intensity": 1.0, "sparsity": 1e-4, "nonnegativity": 0.1,
                     "total_variation": 0.0},
    "epochs": 30, "train_windows": 100, "batch_size": 1, "lr": 1.7e-3, "patience": 3,
    "seed": 0}


# Options added to format 3 since, with the defaults that files without them load with.
ADDED_OPTIONS = {"mask_fraction": 0.0, "refine_method": "lbfgs", "norm": "batch",
                 "warmup_steps": 20, "pretrained": False, "noise_floor": None,
                 "holdout": 0.0, "holdout_refine_steps": 30, "refine_likelihood_tolerance": 0.01,
                 "refine_active_set": 1e-3}
# Loss-weight fields added since (the form of the training TV), with their load defaults.
ADDED_WEIGHTS = {"tv_form": "coefficients", "tv_smoothing": 1e-6, "gm_charge": 0.0,
                 "csf_charge": 0.0}
# Defaults changed since; a file stores every option, so its own values load.
CHANGED_DEFAULTS = {"epochs": 0, "norm": "voxel", "train_windows": 1000, "pretrained": None,
                    "batch_size": None, "lr": None, "holdout": 0.125}
# Names changed since (config.FORMER_CONV_KINDS): files load under the new one.
RENAMED = {"conv_kind": "e3so3-stem"}


def test_saved_layout_is_model_format_3():
    # A model resolves sh_order_max=None, sparsity=None and refine_tv=None from its
    # gtab before anything is saved (models.scan_defaults).
    config = DeconvolutionConfig.from_options("mixed", sh_order_max=8, refine_tv=10.0,
                                              sparsity=1e-4, gm_charge=0.0, csf_charge=0.0)
    with pytest.raises(ValueError, match="sparsity=None stands for the scan's default"):
        DeconvolutionConfig.from_options("mixed", sh_order_max=8, refine_tv=10.0).to_dict()
    with pytest.raises(ValueError, match="gm_charge=None stands for the scan's default"):
        config.replace(gm_charge=None).to_dict()
    assert config.to_dict() == {**FORMAT_3_DEFAULTS, **ADDED_OPTIONS, **CHANGED_DEFAULTS,
                                **RENAMED, "loss_weights": {
                                    **FORMAT_3_DEFAULTS["loss_weights"], **ADDED_WEIGHTS}}
    changed = {**FORMAT_3_DEFAULTS, "nside": 8, "refine_steps": 0,
               "loss_weights": {**FORMAT_3_DEFAULTS["loss_weights"], "sparsity": 0.5}}
    # A file of the old layout (no mask_fraction) loads, with the added options' defaults.
    loaded = DeconvolutionConfig.from_dict(changed)
    assert loaded.network.nside == 8 and loaded.refinement.refine_steps == 0
    assert loaded.training.sparsity == 0.5 and loaded.training.loss_weights.sparsity == 0.5
    assert loaded.training.mask_fraction == 0.0 and loaded.training.epochs == 30
    weights = {**changed["loss_weights"], **ADDED_WEIGHTS}
    assert loaded.to_dict() == {**changed, **ADDED_OPTIONS, **RENAMED, "loss_weights": weights}
    masked = {**changed, **ADDED_OPTIONS, "mask_fraction": 0.25, "loss_weights": weights}
    assert DeconvolutionConfig.from_dict(masked).to_dict() == {**masked, **RENAMED}
    # The follow-up's TV form round-trips through a file's layout.
    form = DeconvolutionConfig.from_options("mixed", sh_order_max=8, train_tv=0.5,
                                            train_tv_form="normalized_fodf", sparsity=1e-4,
                                            gm_charge=0.0, csf_charge=0.0)
    assert form.training.loss_weights.tv_form == "normalized_fodf"
    assert DeconvolutionConfig.from_dict(form.to_dict()) == form
    with pytest.raises(ValueError, match="train_tv_form must be one of"):
        DeconvolutionConfig.from_options("mixed", train_tv_form="samples")


def test_configurations_are_frozen_and_replace_validates():
    config = DeconvolutionConfig.from_options("spherical", epochs=5, refine_tv=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training.epochs = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.network = NetworkConfig()
    other = config.replace(nside=8, batch_size=2)
    assert (other.network.nside, other.training.batch_size, other.training.epochs,
            other.refinement.refine_tv) == (8, 2, 5, 1.0)
    assert config.network.nside == 4 and config.training.batch_size is None
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
    (dict(mask_fraction=0.6), r"mask_fraction must be a number in \[0, 0.5\]"),
    (dict(sparsity=-1.0), "loss weight sparsity must be >= 0"),
    (dict(refine_lr=0.0), "refine_lr must be > 0"),
    (dict(refine_tv=-1.0), "refine_tv must be >= 0"),
    (dict(refine_smoothing=0.0), "refine_smoothing must be > 0"),
    (dict(epochs=0, linear_prior=False), r"epochs=0 \(the default\) needs linear_prior=True"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(norm="group"), r"norm must be one of \('batch', 'voxel'\)"),
    (dict(noise_floor="rician"),
     r"noise_floor must be one of \(None, 'power', 'rician_mean', 'model'\)"),
    (dict(noise_floor=True), "noise_floor must be one of"),
    (dict(lr=0.0), "lr must be > 0"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        DeconvolutionConfig.from_options("e3so3-stem", **options)


def test_defaults_and_docs_come_from_the_fields():
    defaults = option_defaults()
    fields = [f for cls in (NetworkConfig, TrainingConfig, RefinementConfig)
              for f in dataclasses.fields(cls)]
    assert list(defaults) == [f.name for f in fields]
    assert defaults["lr"] is None and defaults["nside"] == 4
    text = options_docstring()
    for name, value in defaults.items():
        assert f"{name} : " in text and f"default {value!r}" in text, name
    assert "sparsity : float or None, default None" in text
    from esdmri import RTESDModel
    assert "    nside : int, default 4\n" in RTESDModel.__doc__


@pytest.mark.parametrize("order", [8, 10, 12, 14])
def test_default_sh_order_is_the_highest_determined_of_14_12_10_8(order):
    # Exactly enough directions for `order`, and one fewer.
    assert default_sh_order(n_coeffs(order)) == order
    assert default_sh_order(n_coeffs(order) - 1) == max(8, order - 2)
    assert default_sh_order(6) == 8 and default_sh_order(500) == 14


def test_super_resolution_raises_the_order_to_14_and_one_shell_weakens_the_coupling():
    # Beyond what 45-300 axes determine, never below what they determine, with a
    # stronger sparsity.
    assert default_sh_order(45, super_resolved=True) == 14
    assert default_sh_order(91, super_resolved=True) == 14
    assert default_sh_order(45) == default_sh_order(65) == 8
    assert default_sh_order(119) == 12 and default_sh_order(120) == 14
    # The sparsity of the super-resolved shell, of order 14 on several shells, else.
    assert default_sparsity(True, 14) == 3e-4
    assert default_sparsity(False, 14) == 1.5e-4
    assert default_sparsity(False, 12) == default_sparsity(False, 8) == 1e-4
    assert default_refine_tv(True) == 5.0 and default_refine_tv(False) == 10.0


def test_one_shell_at_b1000_resolves_three_tissues_order_12_and_charges():
    from esdmri.reconst.config import default_isotropic_charges
    from esdmri.response import low_shell

    # 30 axes or more, at b <= 1500, one shell.
    assert low_shell(_single_shell(30)) and low_shell(_single_shell(60, bval=1500.0))
    assert not low_shell(_single_shell(29)) and not low_shell(_single_shell(60, bval=2000.0))
    two = _single_shell(60)
    two = gradient_table(np.r_[two.bvals, two.bvals[1:] * 0.7], bvecs=np.r_[two.bvecs,
                                                                             two.bvecs[1:]])
    assert not low_shell(two)
    assert default_sh_order(30, low_shell=True) == default_sh_order(91, low_shell=True) == 12
    assert default_sh_order(120, low_shell=True) == 14
    assert default_sparsity(False, 12, low_shell=True) == 4e-4
    assert default_sparsity(False, 14, low_shell=True) == 1.5e-4
    assert default_isotropic_charges(True) == (5e-3, 2e-2)
    assert default_isotropic_charges(False) == (0.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # order 12 on 30 axes: no "underdetermined" warning
        model = RTESDModel(_single_shell(30), verbose=False)
    training = model.config.training
    assert (model.config.network.sh_order_max, model.config.network.nside) == (12, 4)
    assert (training.sparsity, training.gm_charge, training.csf_charge) == (4e-4, 5e-3, 2e-2)
    weights = model.config.to_dict()["loss_weights"]  # what a model file stores
    assert (weights["gm_charge"], weights["csf_charge"]) == (5e-3, 2e-2)
    # Explicit values are kept; elsewhere the charges are 0.
    assert RTESDModel(_single_shell(30), gm_charge=0.0,
                      verbose=False).config.training.gm_charge == 0.0
    assert RTESDModel(_single_shell(60, bval=2500.0),
                      verbose=False).config.training.csf_charge == 0.0
    # A response without GM gets a warning with these defaults, none with the former ones.
    from esdmri.response import TissueResponse

    two = TissueResponse.from_tensors([0, 1000], tissues=("wm", "csf"))
    with pytest.warns(UserWarning, match="chosen with WM, GM and CSF"):
        RTESDModel(_single_shell(30), two, verbose=False)
    with pytest.warns(UserWarning, match="chosen with WM, GM and CSF"):
        model.with_response(two)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RTESDModel(_single_shell(30), two, sh_order_max=8, sparsity=1e-4, verbose=False)
        RTESDModel(_single_shell(30), TissueResponse.from_tensors([0, 1000]), verbose=False)


def _single_shell(n_directions, bval=1000.0):
    rng = np.random.default_rng(n_directions)
    points = rng.normal(size=(n_directions, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    hemisphere, _ = disperse_charges(HemiSphere(xyz=points), 200)
    bvecs = np.vstack([[0, 0, 0], hemisphere.vertices])
    return gradient_table(np.r_[0, np.full(n_directions, bval)], bvecs=bvecs)


@pytest.mark.parametrize("n_directions, bval, expected", [
    (40, 2000.0, 8), (30, 1000.0, 12), (64, 1000.0, 12), (101, 1000.0, 12), (120, 1000.0, 14)])
def test_models_resolve_the_default_sh_order_from_their_gtab(n_directions, bval, expected):
    # 40 axes at b 2000 determine order 6 (order 8 at least, as DIPY's CSD); one shell
    # at b <= 1500 with 30 axes or more takes 12, or the determined order above it.
    model = RTESDModel(_single_shell(n_directions, bval), verbose=False)
    assert model.config.network.sh_order_max == expected
    assert model.config.to_dict()["sh_order_max"] == expected  # what a model file stores
    assert model.config.to_dict()["refine_tv"] == 5.0  # one shell: the weaker coupling
    # An explicit order is kept, also an underdetermined one (with DIPY's warning).
    with pytest.warns(UserWarning, match="underdetermined"):
        explicit = RTESDModel(_single_shell(64), sh_order_max=14, nside=8, verbose=False)
    assert explicit.config.network.sh_order_max == 14


@pytest.mark.parametrize("n_directions, expected", [(30, 8), (45, 14), (64, 14), (101, 14)])
def test_one_shell_above_b1500_resolves_order_sparsity_and_coupling(n_directions, expected):
    gtab = _single_shell(n_directions, bval=2500.0)
    # From 45 axes, and only above b = 1500.
    assert super_resolved_shell(gtab) == (n_directions >= 45)
    assert not super_resolved_shell(_single_shell(n_directions))
    with warnings.catch_warnings():
        warnings.simplefilter("error" if n_directions >= 45 else "ignore")
        model = RTESDModel(gtab, verbose=False)  # order 14 from 45 axes: no warning
    assert model.config.network.sh_order_max == expected
    # Order 14's 120 coefficients need more than nside 4's 96 vertices: the default
    # order raises the grid (an explicit one is refused, naming the nside).
    assert model.config.network.nside == (8 if expected == 14 else 4)
    assert model.config.network.sphere().n_vertices >= n_coeffs(expected)
    with pytest.raises(ValueError, match="raise nside"):
        RTESDModel(gtab, sh_order_max=14, verbose=False)
    saved = model.config.to_dict()  # what a model file stores
    assert saved["refine_tv"] == 5.0
    assert saved["loss_weights"]["sparsity"] == (3e-4 if expected == 14 else 1e-4)
    assert model.with_options(sparsity=None).config.training.sparsity == \
        model.config.training.sparsity
    assert RTESDModel(gtab, sparsity=2e-4, verbose=False).config.training.sparsity == 2e-4
    # Two shells of the same directions: the determined order and the usual coupling.
    two = gradient_table(np.r_[gtab.bvals, gtab.bvals[1:] * 1.5],
                         bvecs=np.r_[gtab.bvecs, gtab.bvecs[1:]])
    assert not super_resolved_shell(two)
    pair = RTESDModel(two, verbose=False)
    assert pair.config.network.sh_order_max == default_sh_order(2 * n_directions)
    assert pair.config.refinement.refine_tv == 10.0
    # Explicit values are kept, and with_options resolves None from the model's gtab.
    assert RTESDModel(gtab, refine_tv=3.0, verbose=False).config.refinement.refine_tv == 3.0
    assert model.with_options(refine_tv=None).config.refinement.refine_tv == \
        model.config.refinement.refine_tv


def test_the_old_name_of_train_tv_still_works_with_a_deprecation_warning():
    from esdmri.deprecation import ArgsDeprecationWarning

    with pytest.warns(ArgsDeprecationWarning, match="'total_variation' is deprecated.*train_tv"):
        config = DeconvolutionConfig.from_options("e3so3-stem", total_variation=0.5)
    assert config.training.train_tv == 0.5 == config.replace(
        sparsity=1e-4, gm_charge=0.0, csf_charge=0.0).training.loss_weights.total_variation
    with pytest.raises(TypeError, match="both 'total_variation' and 'train_tv'"):
        DeconvolutionConfig.from_options("e3so3-stem", total_variation=0.5, train_tv=0.5)


def test_shells_sharing_directions_count_as_distinct_measurements():
    # Issue 26: three shells of the same 64 directions (DIPY's get_3shell_gtab)
    # determine order 14 (each shell weighs the SH degrees by its own
    # response: the forward matrix has rank 120), one shell of them only 8.
    from dipy.data import get_3shell_gtab

    from esdmri.response import TissueResponse

    gtab = get_3shell_gtab()
    response = TissueResponse.from_tensors([0, 1000, 2000, 3500], tissues=("wm",),
                                           sh_order_max=14)
    forward = response.forward_matrices(gtab, 14)["wm"]
    assert np.linalg.matrix_rank(forward, tol=1e-10 * np.linalg.norm(forward, 2)) == 120
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "underdetermined" warning either
        model = RTESDModel(gtab, verbose=False)
    assert model.config.network.sh_order_max == 14 and model.config.network.nside == 8
    assert model.config.training.sparsity == 1.5e-4
    # One of those shells: 64 axes determine order 8; the b = 1000 shell gets 12 (with
    # three tissues, low_shell), the b = 3500 shell the super-resolved order 14
    # (default_sh_order), without the warning that an order asked beyond them gives.
    for bval, expected, beyond in ((1000, 12, 14), (3500, 14, 16)):
        keep = gtab.b0s_mask | np.isclose(gtab.bvals, bval, atol=100)
        single = gradient_table(gtab.bvals[keep], bvecs=gtab.bvecs[keep])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert RTESDModel(single, verbose=False).config.network.sh_order_max == expected
        with pytest.warns(UserWarning, match="underdetermined"):
            RTESDModel(single, sh_order_max=beyond, nside=8, verbose=False)


def test_the_grid_rule_uses_the_pseudo_inverse_condition_number():
    """Against numpy: the pseudo-inverse's condition number is the SH matrix's."""
    from esdmri.reconst.config import (MAX_GRID_CONDITION, carrying_nside,
                                       grid_condition_number)
    from esdmri.shm import sh_matrix
    from esdmri.sphere import HealpixSphere

    vertices = HealpixSphere(4, hemisphere=True).vertices
    pinv = np.linalg.pinv(sh_matrix(12, vertices))
    assert grid_condition_number(12, vertices) == pytest.approx(np.linalg.cond(pinv),
                                                                rel=1e-6)
    assert grid_condition_number(12, vertices) > 1000 > MAX_GRID_CONDITION
    assert grid_condition_number(14, vertices) == np.inf  # 120 coefficients, 96 vertices
    assert [carrying_nside(order) for order in (4, 8, 10, 12, 16)] == [2, 4, 4, 8, 8]
