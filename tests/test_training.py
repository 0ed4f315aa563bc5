"""Training keeps its best weights and never ends worse than it started."""

import numpy as np
import pytest
import torch

from esdmri.reconst.models import ESDModel, RTESDModel
from esdmri.sims import make_phantom

SMALL = dict(sh_order_max=4, nside=2, depth=2, filter_start=4, block_size=6, refine_steps=0,
             verbose=False)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((10, 10, 10), snr=20, max_fibres=2, seed=3)


def test_diverging_training_returns_the_starting_network(phantom):
    """A learning rate far too large wrecks every epoch: the linear prior comes back."""
    torch.manual_seed(0)
    untrained = ESDModel(phantom.gtab, phantom.response, epochs=0, **SMALL)
    expected = untrained.fit(phantom.data, phantom.mask).shm_coeff
    diverged = ESDModel(phantom.gtab, phantom.response, epochs=2, lr=50.0, **SMALL)
    fit = diverged.fit(phantom.data, phantom.mask)
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
    untrained = model_class(phantom.gtab, phantom.response, epochs=0, **SMALL)
    untrained.fit(phantom.data, phantom.mask)
    trained = model_class(phantom.gtab, phantom.response, epochs=4, **SMALL)
    trained.fit(phantom.data, phantom.mask)
    start, end = network_loss(untrained, phantom), network_loss(trained, phantom)
    print(f"{model_class.__name__}: loss {start:.6g} untrained, {end:.6g} trained")
    assert end <= start * (1 + 1e-6)


def test_training_window_budget(phantom):
    model = ESDModel(phantom.gtab, phantom.response, epochs=5, train_windows=3, **SMALL)
    model.fit(phantom.data, phantom.mask)
    assert len(model.training_history) == 1  # 3 windows: part of the first epoch
    with pytest.raises(ValueError, match="train_windows"):
        ESDModel(phantom.gtab, phantom.response, train_windows=0)
