"""Training keeps its best weights and never ends worse than it started."""

import numpy as np
import pytest
import torch

from esdmri.reconst.models import ESDModel
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


def test_sane_training_keeps_its_best_epoch(phantom):
    torch.manual_seed(0)
    untrained = ESDModel(phantom.gtab, phantom.response, epochs=0, **SMALL)
    prior = untrained.fit(phantom.data, phantom.mask).shm_coeff
    model = ESDModel(phantom.gtab, phantom.response, epochs=3, lr=1e-3, **SMALL)
    trained = model.fit(phantom.data, phantom.mask).shm_coeff
    # Training at a sane rate lowers the loss, so the trained weights are kept.
    assert np.abs(trained - prior).max() > 1e-4
