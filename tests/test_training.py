"""Training keeps its best weights and never ends worse than it started."""

import warnings

import numpy as np
import pytest
import torch

from esdmri.reconst.models import ESDModel, RTESDModel
from esdmri.shm import n_coeffs
from esdmri.sims import make_phantom

SMALL = dict(sh_order_max=4, nside=2, depth=2, filter_start=4, block_size=6, refine_steps=0,
             verbose=False)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((10, 10, 10), snr=20, max_fibres=2, seed=3)


def test_diverging_training_returns_the_starting_network(phantom):
    """A learning rate far too large wrecks every epoch: the linear prior comes back."""
    torch.manual_seed(0)
    untrained = ESDModel(phantom.gtab, phantom.response, epochs=0, pretrained=False, **SMALL)
    expected = untrained.fit(phantom.data, mask=phantom.mask).shm_coeff
    diverged = ESDModel(phantom.gtab, phantom.response,
                        pretrained=False, epochs=2, lr=50.0, **SMALL)
    fit = diverged.fit(phantom.data, mask=phantom.mask)
    history = diverged.training_history
    assert len(history) == 2 and history[-1]["total"] > 0
    np.testing.assert_allclose(fit.shm_coeff, expected, rtol=1e-5, atol=1e-6)


def network_loss(model, phantom):
    """Mean loss of a model's network over every window of the mask (evaluation mode)."""
    from esdmri.reconst.inputs import normalize_by_b0
    from esdmri.reconst.network import build_fodf_sampler, build_forward_model
    from esdmri.reconst.subjects import ScanBlocks
    from esdmri.reconst.tiling import training_windows
    from esdmri.reconst.training import coefficient_loss
    from esdmri.shm import ShellInterpolator

    normalized, mask = normalize_by_b0(phantom.data.astype(np.float32), phantom.gtab,
                                       phantom.mask)
    size, order = model.config.training.block_size, model.config.network.sh_order_max
    source = ScanBlocks(normalized, mask, phantom.gtab,
                        ShellInterpolator(phantom.gtab, model.sphere.vertices).operator, size,
                        model.device)
    forward_model = build_forward_model(model.response, phantom.gtab, order)
    sampler = build_fodf_sampler(order)
    model.network.eval()
    losses = []
    with torch.no_grad():
        for start in training_windows(mask, size, np.random.default_rng(9)):
            batch = source.read(np.array([[0, *start]]))
            total, _ = coefficient_loss(model.network(batch["grid"]), model.network.n_wm_coeffs,
                                        forward_model, sampler, batch["groups"][0]["signal"],
                                        batch["mask"], model.config.training.loss_weights)
            losses.append(float(total))
    return np.mean(losses)


@pytest.mark.parametrize("model_class", [ESDModel, RTESDModel])
def test_training_never_ends_above_the_starting_loss(phantom, model_class):
    torch.manual_seed(0)
    # The untrained network (a fit with epochs=0 builds none).
    untrained = model_class(phantom.gtab, phantom.response, epochs=0, **SMALL).build_network()
    trained = model_class(phantom.gtab, phantom.response, pretrained=False, epochs=4, **SMALL)
    trained.fit(phantom.data, mask=phantom.mask)
    start, end = network_loss(untrained, phantom), network_loss(trained, phantom)
    print(f"{model_class.__name__}: loss {start:.6g} untrained, {end:.6g} trained")
    assert end <= start * (1 + 1e-6)


def test_training_window_budget(phantom):
    model = ESDModel(phantom.gtab, phantom.response,
                     pretrained=False, epochs=5, train_windows=3, **SMALL)
    with pytest.warns(UserWarning, match=r"stopped after 1 of 5 epochs \(3 steps\).*"
                                         "train_windows"):
        model.fit(phantom.data, mask=phantom.mask)
    assert len(model.training_history) == 1  # 3 windows: part of the first epoch
    assert model.training_summary["stopped_by"] == "max_blocks"
    with pytest.raises(ValueError, match="train_windows"):
        ESDModel(phantom.gtab, phantom.response, train_windows=0)


# -- masked self-supervision (mask_fraction; ported from branch i15) ----------
def test_hide_voxels_replaces_exactly_the_hidden_voxels_by_their_neighbour_mean():
    from esdmri.reconst.selfsupervision import hide_voxels

    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 3, 5, 6, 6, 6)
    mask = torch.rand(2, 6, 6, 6, generator=generator) > 0.2
    hidden_grid, hidden = hide_voxels(grid, mask, 0.3, generator)
    assert hidden.any() and not (hidden & ~mask).any()
    changed = (hidden_grid != grid).any(dim=(1, 2))
    assert torch.equal(changed, hidden)
    # No two hidden voxels are face neighbours, so no replacement holds hidden signal.
    for axis in (1, 2, 3):
        length = hidden.shape[axis] - 1
        assert not (hidden.narrow(axis, 1, length) & hidden.narrow(axis, 0, length)).any()
    for b, x, y, z in torch.nonzero(hidden).tolist():
        neighbours = [grid[b, :, :, i, j, k] for i, j, k in
                      ((x + 1, y, z), (x - 1, y, z), (x, y + 1, z), (x, y - 1, z),
                       (x, y, z + 1), (x, y, z - 1))
                      if all(0 <= n < 6 for n in (i, j, k)) and mask[b, i, j, k]]
        torch.testing.assert_close(hidden_grid[b, :, :, x, y, z],
                                   sum(neighbours) / len(neighbours))


def test_masked_loss_covers_the_hidden_voxels_only(phantom):
    """The trainer's loss: hidden voxels' measurements only, never their own input."""
    from esdmri.reconst.inputs import normalize_by_b0
    from esdmri.reconst.network import build_fodf_sampler, build_forward_model
    from esdmri.reconst.selfsupervision import hide_in_batch
    from esdmri.reconst.subjects import ScanBlocks
    from esdmri.reconst.training import Trainer
    from esdmri.shm import ShellInterpolator

    torch.manual_seed(0)
    model = RTESDModel(phantom.gtab, phantom.response, epochs=0, **SMALL)
    model.build_network()
    # A non-zero head, so the output depends on the whole neighbourhood.
    for parameter in model.network.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    normalized, mask = normalize_by_b0(phantom.data.astype(np.float32), phantom.gtab,
                                       phantom.mask)
    order = model.config.network.sh_order_max
    source = ScanBlocks(normalized, mask, phantom.gtab,
                        ShellInterpolator(phantom.gtab, model.sphere.vertices).operator, 6,
                        model.device)
    trainer = Trainer(model.network, source, [build_forward_model(model.response,
                                                                  phantom.gtab, order)],
                      build_fodf_sampler(order), model.config.training.loss_weights, epochs=1,
                      batch_size=1, lr=1e-3, patience=3, seed=0, mask_fraction=0.25)
    batch = source.read(np.array([[0, 2, 2, 2]]))
    signal, grid = batch["groups"][0]["signal"], batch["grid"]

    def loss(signal, grid):
        changed = {**batch, "grid": grid, "groups": [{**batch["groups"][0], "signal": signal}]}
        model.network.eval()
        with torch.no_grad():
            total, _, _ = trainer.loss(model.network, changed, torch.Generator().manual_seed(1))
        return float(total)

    hidden = hide_in_batch(batch, 0.25, torch.Generator().manual_seed(1))["mask"]
    reference = loss(signal, grid)
    assert 0 < hidden.sum() < batch["mask"].sum()
    visible = (batch["mask"] & ~hidden)[:, None]
    # Measurements of voxels that are not hidden are not fitted...
    assert loss(torch.where(visible, signal + 1, signal), grid) == reference
    # ... a hidden voxel's own input is not seen, its measurement is fitted.
    one = torch.zeros_like(hidden)
    one[tuple(torch.nonzero(hidden)[0])] = True
    assert loss(signal, torch.where(one[:, None, None], grid + 1, grid)) == reference
    assert loss(torch.where(one[:, None], signal + 1, signal), grid) != reference
    # The keep-the-better check meets the masked loss, the same voxels at every call.
    masked = trainer.evaluate()["total"]
    assert trainer.evaluate()["total"] == masked
    trainer.mask_fraction = 0.0
    assert trainer.evaluate()["total"] != masked


@pytest.mark.slow
def test_masked_training_runs_and_validates_its_fraction(phantom):
    model = RTESDModel(phantom.gtab, phantom.response, pretrained=False, epochs=1, train_windows=2,
                       mask_fraction=0.2, **SMALL)
    fit = model.fit(phantom.data, mask=phantom.mask)
    assert np.isfinite(fit.shm_coeff).all() and len(model.training_history) == 1
    assert model.config.to_dict()["mask_fraction"] == 0.2  # what a model file stores
    for bad in (-0.1, 0.6, True, "0.1"):
        with pytest.raises(ValueError, match="mask_fraction"):
            RTESDModel(phantom.gtab, phantom.response, mask_fraction=bad)


# -- an honest keep-best rule (issue 25) --------------------------------------
def voxel_mean_loss(model, phantom, coefficients):
    """Mean over masked voxels of the per-voxel loss (the refinement's written-out formula)."""
    from esdmri.reconst.inputs import normalize_by_b0
    from esdmri.reconst.network import build_fodf_sampler, build_forward_model
    from esdmri.reconst.refine import voxel_loss_gradient

    normalized, mask = normalize_by_b0(phantom.data.astype(np.float32), phantom.gtab,
                                       phantom.mask)
    order = model.config.network.sh_order_max
    _, loss = voxel_loss_gradient(
        torch.as_tensor(coefficients[mask]), torch.as_tensor(normalized[mask]),
        build_forward_model(model.response, phantom.gtab, order).matrix,
        build_fodf_sampler(order), n_coeffs(order),
        model.config.training.loss_weights, return_loss=True)
    return float(loss.mean())


@pytest.fixture(scope="module")
def trained_rtesd(phantom):
    torch.manual_seed(0)
    untrained = RTESDModel(phantom.gtab, phantom.response, epochs=0, **SMALL)
    start = untrained.fit(phantom.data, mask=phantom.mask)
    model = RTESDModel(phantom.gtab, phantom.response,
                       pretrained=False, epochs=3, batch_size=4, lr=1e-3,
                       warmup_steps=2, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = model.fit(phantom.data, mask=phantom.mask)
    return untrained, start, model, fit


def test_evaluation_loss_is_the_loss_of_every_masked_voxel_once(phantom, trained_rtesd):
    """Start and epochs are scored on the same voxels, in eval mode, as inference sees them.

    The reference is the refinement's written-out per-voxel loss of the
    whole-volume fit (block-wise inference with halos), averaged over the mask.
    """
    untrained, start, model, fit = trained_rtesd
    scan = untrained.prepare(phantom.data, mask=phantom.mask)
    summary = model.training_summary
    assert model.halo >= 1  # RT-ESD's windows score a core inside a halo
    assert summary["start_loss"] == pytest.approx(
        voxel_mean_loss(untrained, phantom, untrained.prior_coefficients(scan)), rel=1e-4)
    kept = voxel_mean_loss(model, phantom, model.network_coefficients(scan))
    assert summary["best_loss"] == pytest.approx(kept, rel=1e-4)
    history = model.training_history
    assert all({"total", "eval_total", "lr", "epoch"} <= set(record) for record in history)
    if summary["fell_back"]:
        assert summary["best_epoch"] is None
        np.testing.assert_allclose(fit.shm_coeff, start.shm_coeff, rtol=1e-5, atol=1e-6)
    else:
        best = history[summary["best_epoch"]]["eval_total"]
        assert best == pytest.approx(kept, rel=1e-4) and best < summary["start_loss"]
        assert best == min(record["eval_total"] for record in history)


def test_a_fall_back_is_recorded_and_said(phantom):
    model = ESDModel(phantom.gtab, phantom.response,
                     pretrained=False, epochs=2, lr=50.0, warmup_steps=0,
                     **SMALL)
    with pytest.warns(UserWarning, match="did not lower the evaluation loss"):
        model.fit(phantom.data, mask=phantom.mask)
    summary = model.training_summary
    assert summary["fell_back"] and summary["best_epoch"] is None
    assert summary["best_loss"] == summary["start_loss"]
    assert all(r["eval_total"] > summary["start_loss"] for r in model.training_history)


def test_warm_up_raises_the_learning_rate_linearly(phantom):
    model = ESDModel(phantom.gtab, phantom.response,
                     pretrained=False, epochs=1, lr=1e-3, warmup_steps=1000,
                     **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(phantom.data, phantom.mask)
    steps = model.training_summary["steps"]
    assert 0 < steps < 1000
    assert model.training_history[0]["lr"] == pytest.approx(1e-3 * steps / 1000)


def test_evaluation_cores_tile_the_mask_once(phantom):
    from esdmri.reconst.subjects import ScanBlocks
    from esdmri.reconst.training import evaluation_windows

    mask = phantom.mask
    source = ScanBlocks(np.zeros(mask.shape + (2,), np.float32), mask, phantom.gtab,
                        np.zeros((2, 3, 2), np.float32), 6, "cpu")
    for halo in (0, 1, 2):
        blocks, core = evaluation_windows(source, halo, np.random.default_rng(0))
        counts = np.zeros(mask.shape, int)
        core = core.numpy()
        for _, *start in blocks:
            for offset in np.argwhere(core):
                voxel = np.array(start) + offset
                if ((voxel >= 0) & (voxel < mask.shape)).all():
                    counts[tuple(voxel)] += 1
        assert (counts[mask] == 1).all() and core.sum() == (6 - 2 * halo) ** 3
    with pytest.raises(ValueError, match="block_size=6 leaves no core"):
        evaluation_windows(source, 3, np.random.default_rng(0))


def test_training_on_a_grid_that_cannot_carry_the_order_warns(phantom):
    from esdmri.reconst.network import build_fodf_sampler, build_forward_model
    from esdmri.reconst.subjects import ScanBlocks
    from esdmri.reconst.training import Trainer

    for nside, warns in ((4, True), (8, False)):
        model = RTESDModel(phantom.gtab, phantom.response, sh_order_max=12, nside=nside,
                           depth=1, filter_start=2, verbose=False)
        model.build_network()
        mask = phantom.mask
        source = ScanBlocks(np.zeros(mask.shape + (2,), np.float32), mask, phantom.gtab,
                            np.zeros((2, 3, 2), np.float32), 6, "cpu")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(model.network, source, [build_forward_model(model.response, phantom.gtab,
                                                                12)],
                    build_fodf_sampler(12), model.config.training.loss_weights, epochs=1,
                    batch_size=1, lr=1e-3, patience=3, seed=0)
        said = [str(w.message) for w in caught if "cannot carry" in str(w.message)]
        assert bool(said) == warns, nside
        if warns:
            assert "condition number 2416" in said[0] and "nside=8" in said[0]
