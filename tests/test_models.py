"""The DIPY-style deconvolution models on small phantoms."""

import warnings

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table
from dipy.data import default_sphere
from dipy.direction import ProbabilisticDirectionGetter
from dipy.reconst.shm import sh_to_sf
from dipy.tracking.local_tracking import LocalTracking
from dipy.tracking.stopping_criterion import BinaryStoppingCriterion
from dipy.tracking.streamline import Streamlines
from dipy.tracking.utils import seeds_from_mask

from esdmri import load_model
from esdmri.reconst.fit import DeconvolutionFit
from esdmri.reconst.inputs import normalize_by_b0
from esdmri.reconst.models import CESDModel, ESDModel, RTESDModel
from esdmri.reconst.subjects import ScanBlocks
from esdmri.shm import ShellInterpolator, n_coeffs, sh_matrix
from esdmri.sims import make_phantom

SMALL = dict(sh_order_max=4, nside=2, depth=2, filter_start=4, block_size=6, batch_size=1,
             verbose=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small networks run faster on one thread, and results are reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((10, 10, 10), snr=40, max_fibres=2, seed=3)


@pytest.fixture(scope="module")
def trained(phantom):
    model = RTESDModel(phantom.gtab, phantom.response, pretrained=False, epochs=8, seed=1, **SMALL)
    return model, model.fit(phantom.data, mask=phantom.mask)


def true_coefficients(phantom, sh_order_max):
    """Ground-truth tissue coefficients: delta fODFs of the fibres plus GM/CSF."""
    placeholder = np.array([0.0, 0.0, 1.0])  # absent fibres carry zero weight
    directions = np.where(np.isnan(phantom.fibre_dirs), placeholder, phantom.fibre_dirs)
    harmonics = sh_matrix(sh_order_max, directions.reshape(-1, 3)).reshape(
        directions.shape[:-1] + (n_coeffs(sh_order_max),))
    wm = phantom.tissue_fractions[..., :1] * np.einsum(
        "...k,...kc->...c", phantom.fibre_fractions, harmonics)
    isotropic = phantom.tissue_fractions[..., 1:] / np.sqrt(4 * np.pi)
    return np.concatenate([wm, isotropic], axis=-1)


def test_forward_model_reproduces_simulated_signal_from_true_fodfs():
    noise_free = make_phantom((10, 10, 10), snr=None, max_fibres=2)
    model = RTESDModel(noise_free.gtab, noise_free.response,
                       **{**SMALL, "sh_order_max": 12, "nside": 4})
    fit = DeconvolutionFit(model, true_coefficients(noise_free, 12), noise_free.mask)
    mask = noise_free.mask
    s0 = noise_free.data[..., noise_free.gtab.b0s_mask].mean(-1)
    predicted = fit.predict(S0=s0)
    np.testing.assert_allclose(predicted[mask], noise_free.data[mask], atol=1e-3 * noise_free.s0)
    fractions = fit.volume_fractions
    for index, tissue in enumerate(("wm", "gm", "csf")):
        np.testing.assert_allclose(fractions[tissue][mask],
                                   noise_free.tissue_fractions[mask][:, index], atol=1e-6)


def test_training_lowers_the_loss(trained):
    model = trained[0]
    history, summary = model.training_history, model.training_summary
    assert len(history) >= 2
    # The evaluation loss (eval mode, every masked voxel once) decides; the
    # training-mode means are taken while the weights move.
    assert not summary["fell_back"] and summary["best_loss"] < summary["start_loss"]


def test_fit_outputs_are_consistent(trained, phantom):
    model, fit = trained
    mask = phantom.mask
    assert fit.shm_coeff.shape == mask.shape + (n_coeffs(4),)
    assert np.all(fit.shm_coeff[~mask] == 0)
    fractions = np.stack(list(fit.volume_fractions.values()), axis=-1)
    np.testing.assert_allclose(fractions[mask].sum(-1), 1, atol=1e-5)
    assert (fractions >= 0).all()
    # shm_coeff is in DIPY's default (legacy) basis: DIPY's own sh_to_sf with
    # default arguments gives back the model's odf.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        dipy_odf = sh_to_sf(fit.shm_coeff, default_sphere, sh_order_max=4)
    np.testing.assert_allclose(dipy_odf, fit.odf(default_sphere), atol=1e-5)
    predicted = fit.predict()
    assert predicted.shape == phantom.data.shape
    normalized = phantom.data / phantom.data[..., phantom.gtab.b0s_mask].mean(-1, keepdims=True)
    error = np.abs(predicted[mask] - normalized[mask]).mean()
    assert error < 0.15
    assert 0 <= fit.gfa[mask].min() and fit.gfa[mask].max() <= 1


def test_peaks_feed_dipy_local_tracking(trained, phantom):
    _, fit = trained
    peaks = fit.peaks(relative_peak_threshold=0.3)
    assert peaks.peak_dirs.shape == phantom.mask.shape + (5, 3)
    found = np.linalg.norm(peaks.peak_dirs[..., 0, :], axis=-1)
    assert np.allclose(found[phantom.mask & (found > 0)], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        getter = ProbabilisticDirectionGetter.from_shcoeff(
            fit.shm_coeff, max_angle=45, sphere=default_sphere)
    seeds = seeds_from_mask(phantom.tissue_fractions[..., 0] > 0.5, np.eye(4), density=1)
    streamlines = Streamlines(LocalTracking(
        getter, BinaryStoppingCriterion(phantom.mask), seeds, np.eye(4), step_size=0.5,
        random_seed=0))
    assert len(streamlines) > 0
    assert max(len(s) for s in streamlines) > 3


def test_prediction_does_not_depend_on_block_tiling(trained, phantom):
    model, fit = trained
    reference = fit.shm_coeff_descoteaux07
    # Inference cores of 4 instead of 6.
    retiled = model.with_options(block_size=4).fit(phantom.data, mask=phantom.mask)
    retiled = retiled.shm_coeff_descoteaux07
    np.testing.assert_allclose(retiled, reference, atol=1e-5 * np.abs(reference).max())


def test_save_load_round_trip_gives_identical_predictions(trained, phantom, tmp_path):
    model, fit = trained
    path = tmp_path / "model.pt"
    model.save(path)
    with pytest.raises(FileExistsError, match="force=True"):
        model.save(path)
    loaded = load_model(path, verbose=False)
    assert isinstance(loaded, RTESDModel)
    again = loaded.fit(phantom.data, mask=phantom.mask)  # inference only
    assert again.training_history == fit.training_history
    np.testing.assert_array_equal(again.shm_coeff, fit.shm_coeff)


def test_load_refuses_other_format_versions(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "model.pt"
    model.save(path)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 999
    torch.save(payload, path)
    with pytest.raises(ValueError, match="model format 999"):
        load_model(path)


def test_files_saved_under_the_old_rtesd_kind_name_still_load(trained, phantom, tmp_path):
    model, fit = trained
    path = tmp_path / "model.pt"
    model.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["conv_kind"] == "e3so3-stem"
    # RT-ESD's kind was called "mixed", then "mixed-stem", before its name now.
    for former in ("mixed", "mixed-stem"):
        payload["config"]["conv_kind"] = former
        torch.save(payload, path)
        loaded = load_model(path, verbose=False)
        assert isinstance(loaded, RTESDModel) and loaded.config.conv_kind == "e3so3-stem"
        np.testing.assert_array_equal(loaded.fit(phantom.data, mask=phantom.mask).shm_coeff,
                                      fit.shm_coeff)


def test_apply_to_a_scan_with_other_directions(trained, phantom, tmp_path):
    model, fit = trained
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    other = gradient_table(phantom.gtab.bvals, bvecs=phantom.gtab.bvecs @ rotation.T,
                           b0_threshold=phantom.gtab.b0_threshold)
    resampled = make_phantom((10, 10, 10), gtab=other, snr=None, max_fibres=2)
    path = tmp_path / "model.pt"
    model.save(path)
    applied = load_model(path, gtab=other, verbose=False).fit(resampled.data, mask=resampled.mask)
    on_training_gtab = model.fit(make_phantom((10, 10, 10), snr=None, max_fibres=2).data,
                                 mask=phantom.mask)
    # Same tissue, other gradient directions: the grid interpolation makes the
    # network see (nearly) the same input, so the fODFs agree closely.
    difference = np.abs(applied.shm_coeff - on_training_gtab.shm_coeff)[phantom.mask].mean()
    assert difference < 0.1 * np.abs(on_training_gtab.shm_coeff[phantom.mask]).mean()


def test_with_gtab_shares_the_network_and_matches_a_model_loaded_for_that_gtab(
        trained, phantom, tmp_path):
    model, _ = trained
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    other = gradient_table(phantom.gtab.bvals, bvecs=phantom.gtab.bvecs @ rotation.T,
                           b0_threshold=phantom.gtab.b0_threshold)
    scan = make_phantom((10, 10, 10), gtab=other, snr=None, max_fibres=2)
    moved = model.with_gtab(other)
    assert moved.gtab is other and model.gtab is phantom.gtab
    assert moved.network is model.network
    model.save(tmp_path / "model.pt")
    # Reference: the file read back for that gtab (load_model's documented path).
    expected = load_model(tmp_path / "model.pt", gtab=other, verbose=False).fit(
        scan.data, mask=scan.mask)
    np.testing.assert_array_equal(moved.fit(scan.data, mask=scan.mask).shm_coeff,
                                  expected.shm_coeff)
    other_shells = gradient_table(np.where(phantom.gtab.bvals > 2500, 2000.0,
                                           phantom.gtab.bvals), bvecs=phantom.gtab.bvecs)
    with pytest.raises(ValueError, match="shell"):
        model.with_gtab(other_shells)


def test_with_options_copies_validates_and_keeps_the_network(trained, phantom):
    model, fit = trained
    unrefined = model.with_options(refine_steps=0, batch_size=3)
    assert unrefined.config.refinement.refine_steps == 0
    assert unrefined.config.training.batch_size == 3
    assert model.config.refinement.refine_steps == 300
    assert model.config.training.batch_size == 1
    assert unrefined.network is model.network
    assert unrefined.with_options(sparsity=0.5).config.training.loss_weights.sparsity == 0.5
    assert model.config.training.loss_weights.sparsity == 1e-4
    with pytest.raises(ValueError, match="refine_steps must be an integer >= 0"):
        model.with_options(refine_steps=-1)
    with pytest.raises(ValueError, match="nside.*already built"):
        model.with_options(nside=4)
    with pytest.raises(TypeError, match="unknown model option.*nsides"):
        model.with_options(nsides=4)
    # An unbuilt model may change its network's shape; the sphere follows.
    fresh = RTESDModel(phantom.gtab, phantom.response, **SMALL).with_options(nside=4)
    assert fresh.sphere.n_vertices > model.sphere.n_vertices


def test_train_on_the_scans_blocks_is_what_fit_trains(phantom):
    from esdmri.reconst.inputs import normalize_by_b0
    from esdmri.reconst.subjects import ScanBlocks
    from esdmri.shm import ShellInterpolator

    fitted = RTESDModel(phantom.gtab, phantom.response,
                        pretrained=False, epochs=3, seed=2, refine_steps=0,
                        **SMALL)
    expected = fitted.fit(phantom.data, mask=phantom.mask).shm_coeff
    model = RTESDModel(phantom.gtab, phantom.response,
                       pretrained=False, epochs=3, seed=2, refine_steps=0,
                       **SMALL)
    normalized, mask = normalize_by_b0(phantom.data, phantom.gtab, phantom.mask)
    source = ScanBlocks(normalized, mask, phantom.gtab,
                        ShellInterpolator(phantom.gtab, model.sphere.vertices).operator,
                        model.config.training.block_size, model.device)
    assert model.train(source, max_steps=model.config.training.train_windows) is model
    assert model.training_history == fitted.training_history
    np.testing.assert_array_equal(model.fit(phantom.data, mask=phantom.mask).shm_coeff, expected)


def test_saved_files_have_the_permissions_of_normal_files(trained, tmp_path):
    import os
    model, _ = trained
    umask = os.umask(0o022)
    os.umask(umask)
    model.save(tmp_path / "model.pt")
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("model_class", [ESDModel, CESDModel])
def test_other_model_kinds_train(model_class, phantom):
    # From scratch (the published network), so that the first epoch's loss is
    # far above the noise level and must fall; the linear prior is trained in
    # the `trained` fixture.
    model = model_class(phantom.gtab, phantom.response,
                        pretrained=False, epochs=2, linear_prior=False, **SMALL)
    fit = model.fit(phantom.data, mask=phantom.mask)
    assert fit.training_history[-1]["intensity"] < fit.training_history[0]["intensity"]
    assert model.halo == (0 if model_class is ESDModel else 1)


def test_training_is_deterministic_with_a_seed(phantom):
    fits = [RTESDModel(phantom.gtab, phantom.response, pretrained=False, epochs=1, seed=5, **SMALL)
            .fit(phantom.data, mask=phantom.mask) for _ in range(2)]
    np.testing.assert_array_equal(fits[0].shm_coeff, fits[1].shm_coeff)


def test_bad_input_is_rejected_before_training(phantom):
    gtab, response, data, mask = phantom.gtab, phantom.response, phantom.data, phantom.mask
    model = RTESDModel(gtab, response, **SMALL)
    with pytest.raises(ValueError, match="volumes but gtab has"):
        model.fit(data[..., :-1], mask=mask)
    # NaN outside the mask is accepted (as DIPY does); inside it is refused.
    with pytest.raises(ValueError, match="NaN or inf"):
        model.fit(np.where(mask[..., None], np.nan, data), mask=mask)
    with pytest.raises(ValueError, match="mask has shape"):
        model.fit(data, mask=mask[:-1])
    with pytest.raises(ValueError, match="mask is empty"):
        model.fit(data, mask=np.zeros_like(mask))
    with pytest.raises(ValueError, match="sh_order_max must be an even"):
        RTESDModel(gtab, response, **{**SMALL, "sh_order_max": 7})
    with pytest.raises(ValueError, match="sh_order_max=8 needs 45"):
        RTESDModel(gtab, response, **{**SMALL, "sh_order_max": 8})
    with pytest.raises(ValueError, match="depth=3 needs nside >= 4"):
        RTESDModel(gtab, response, **{**SMALL, "depth": 3})
    with pytest.raises(TypeError, match="TissueResponse"):
        RTESDModel(gtab, response="wm.txt")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            RTESDModel(gtab, response, device="cuda")
    single_shell = gradient_table(gtab.bvals[gtab.bvals < 1500],
                                  bvecs=gtab.bvecs[gtab.bvals < 1500])
    with pytest.raises(ValueError, match="shell"):
        RTESDModel(single_shell, response)
    no_b0 = gradient_table(gtab.bvals[~gtab.b0s_mask], bvecs=gtab.bvecs[~gtab.b0s_mask])
    with pytest.raises(ValueError, match="no b0"):
        RTESDModel(no_b0, **SMALL).fit(data[..., ~gtab.b0s_mask], mask=mask)


def test_epochs_zero_is_the_linear_prior_plus_refinement():
    # epochs=0 trains nothing: without the pretrained correction (each model
    # class has its own) every model returns the same regularised least-squares
    # fit (the prior; no network contribution), which explains the noise-free
    # signal and finds the single fibres; refinement then moves it.
    clean = make_phantom((10, 10, 10), snr=None, max_fibres=2, seed=3)
    fits = {cls.__name__: cls(clean.gtab, clean.response, epochs=0, refine_steps=0,
                              pretrained=False, **SMALL).fit(clean.data, mask=clean.mask)
            for cls in (ESDModel, RTESDModel, CESDModel)}
    reference = fits["RTESDModel"].shm_coeff
    for fit in fits.values():
        assert fit.training_history == []
        np.testing.assert_allclose(fit.shm_coeff, reference, atol=1e-5)
    fit = fits["RTESDModel"]
    inside = clean.mask
    b0 = clean.data[..., clean.gtab.b0s_mask].mean(axis=-1)
    residual = np.linalg.norm(fit.predict(S0=b0)[inside] - clean.data[inside]) / np.linalg.norm(
        clean.data[inside])
    assert residual < 0.05, residual
    single = inside & (clean.n_fibres == 1) & (clean.tissue_fractions[..., 0] > 0.5)
    peaks = fit.peaks(relative_peak_threshold=0.5).peak_dirs[single][:, 0]
    truth = clean.fibre_dirs[single][:, 0]
    errors = np.degrees(np.arccos(np.clip(np.abs(np.sum(peaks * truth, -1)), 0, 1)))
    assert single.sum() > 10 and np.median(errors) < 10, np.median(errors)

    refined = RTESDModel(clean.gtab, clean.response, epochs=0, refine_steps=5,
                         **SMALL).fit(clean.data, mask=clean.mask)
    assert np.abs(refined.shm_coeff - reference).max() > 1e-4


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": -1}, "epochs must be an integer >= 0"),
    ({"epochs": 1.5}, "epochs must be an integer >= 0"),
    ({"linear_prior": False}, r"epochs=0 \(the default\) needs linear_prior=True.*epochs=N"),
])
def test_bad_epochs(phantom, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RTESDModel(phantom.gtab, phantom.response, **kwargs)


def test_default_fit_trains_nothing_and_train_needs_epochs(phantom):
    # The default is the most accurate setting measured (docs/benchmarks.md):
    # the linear prior refined, the same fit for every model, no training.
    default = RTESDModel(phantom.gtab, phantom.response, **SMALL)
    untrained = RTESDModel(phantom.gtab, phantom.response, epochs=0, **SMALL)
    fit = default.fit(phantom.data, mask=phantom.mask)
    assert default.training_history == []
    np.testing.assert_array_equal(fit.shm_coeff,
                                  untrained.fit(phantom.data, mask=phantom.mask).shm_coeff)
    blocks = ScanBlocks(*normalize_by_b0(phantom.data, phantom.gtab, phantom.mask),
                        phantom.gtab, ShellInterpolator(phantom.gtab,
                                                        default.sphere.vertices).operator,
                        8, "cpu")
    with pytest.raises(ValueError, match="epochs is 0, so there is nothing to train"):
        default.train(blocks)
    default.with_options(epochs=1, pretrained=False).train(blocks, max_steps=1)


def test_a_second_fit_equals_a_fresh_models_fit():
    # DIPY's contract: a model holds no state of the scans it fitted. Two
    # phantoms of one generator differ in their estimated responses, so a
    # model that kept the first's would deconvolve the second differently.
    first = make_phantom((10, 10, 10), snr=30, max_fibres=2, seed=3)
    second = make_phantom((10, 10, 10), snr=20, max_fibres=2, seed=5)
    options = dict(SMALL, refine_steps=5)
    model = RTESDModel(first.gtab, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_a = model.fit(first.data, mask=first.mask)
        fit_b = model.fit(second.data, mask=second.mask)
        fresh = RTESDModel(second.gtab, **options).fit(second.data, mask=second.mask)
    assert model.response is None and model.network is None
    assert not np.allclose(fit_a.response.coefficients[0], fit_b.response.coefficients[0])
    np.testing.assert_array_equal(fit_b.shm_coeff, fresh.shm_coeff)
    for ours, theirs in zip(fit_b.response.coefficients, fresh.response.coefficients):
        np.testing.assert_array_equal(ours, theirs)
    assert fit_b.refine_history == fresh.refine_history and len(fit_b.refine_history) > 1
    # An explicit response is the model's, for every fit.
    explicit = model.with_response(fit_a.response)
    assert model.response is None and explicit.response is fit_a.response
    assert explicit.fit(second.data, mask=second.mask).response is fit_a.response


def test_the_default_fit_builds_no_network_and_equals_the_untrained_network(phantom,
                                                                              monkeypatch):
    model = RTESDModel(phantom.gtab, phantom.response, refine_steps=0, **SMALL)
    with_network = model.with_options().build_network()
    scan = model.prepare(phantom.data, mask=phantom.mask)
    # The reference: the zero-corrected network run block by block.
    expected = with_network.network_coefficients(scan)

    def no_network(*args, **kwargs):
        raise AssertionError("the default fit built a network")

    import esdmri.reconst.models as models
    monkeypatch.setattr(models, "build_unet", no_network)
    monkeypatch.setattr(models, "receptive_radius", no_network)
    prior = model.prior_coefficients(scan)
    np.testing.assert_allclose(prior, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 0.1
    fit = model.fit(phantom.data, mask=phantom.mask)
    assert model.network is None
    # The shipped correction acts on that prior; the fit builds no per-scan network.
    corrected = model.corrected_prior(prior, scan)
    assert np.abs(corrected - prior).max() > 1e-3
    np.testing.assert_array_equal(fit.shm_coeff_descoteaux07, corrected[..., :n_coeffs(4)])
    with pytest.raises(ValueError, match="the model has no network"):
        model.network_coefficients(scan)


def test_mask_by_position_still_works_with_a_deprecation_warning(phantom):
    from esdmri.deprecation import ArgsDeprecationWarning

    model = RTESDModel(phantom.gtab, phantom.response, refine_steps=0, **SMALL)
    with pytest.warns(ArgsDeprecationWarning, match="mask=..."):
        positional = model.fit(phantom.data, phantom.mask)
    np.testing.assert_array_equal(positional.shm_coeff,
                                  model.fit(phantom.data, mask=phantom.mask).shm_coeff)
    with pytest.raises(TypeError, match="multiple values for argument 'mask'"):
        model.fit(phantom.data, phantom.mask, mask=phantom.mask)
