import warnings

import numpy as np
import pytest

from esdmri.baselines import fit_csd
from esdmri.metrics import angular_errors
from esdmri.peaks import peaks_from_sh
from esdmri.response import TissueResponse
from esdmri.sims import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((8, 8, 8), snr=None, max_fibres=1, seed=0)


@pytest.fixture(autouse=True)
def quiet_dipy():
    # DIPY warns about its legacy basis and deprecated defaults.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_csd_with_the_true_response_finds_the_single_fibres(phantom):
    fibres = phantom.mask & (phantom.n_fibres == 1)
    mask = phantom.mask.copy()
    mask[0] = False
    for bval in (1000, 3000, None):
        shm_coeff = fit_csd(phantom.gtab, phantom.data, phantom.response, mask=mask, bval=bval)
        assert shm_coeff.shape == phantom.mask.shape + (45,)
        assert not np.any(shm_coeff[~mask])
        directions, _ = peaks_from_sh(shm_coeff, mask=fibres & mask)
        errors = angular_errors(directions[..., :1, :], phantom.fibre_dirs[..., :1, :])
        # Peaks are searched on a discrete sphere: a few degrees off at most.
        assert np.nanmax(errors[fibres & mask]) < 5
    # Each shell is deconvolved with its own response row: the fODFs differ.
    low, high = (fit_csd(phantom.gtab, phantom.data, phantom.response, mask=mask, bval=b)
                 for b in (1000, 3000))
    assert not np.allclose(low, high)
    np.testing.assert_array_equal(
        high, fit_csd(phantom.gtab, phantom.data, phantom.response, mask=mask))


def test_csd_refuses_bad_input(phantom):
    gtab, data, response = phantom.gtab, phantom.data, phantom.response
    with pytest.raises(TypeError, match="response must be a TissueResponse"):
        fit_csd(gtab, data, response.to_dipy())
    with pytest.raises(ValueError, match="response must hold a WM response"):
        fit_csd(gtab, data, response.select_tissues(("csf",)))
    with pytest.raises(ValueError, match="do not match the gtab shells"):
        fit_csd(gtab, data, TissueResponse.from_tensors([0, 1000, 2000], sh_order_max=8))
    with pytest.raises(ValueError, match=r"bval=1500 is not one of the gtab's shells"):
        fit_csd(gtab, data, response, bval=1500)
    with pytest.raises(ValueError, match="data must have shape"):
        fit_csd(gtab, data[..., 1:], response)
    with pytest.raises(ValueError, match="mask must have shape"):
        fit_csd(gtab, data, response, mask=np.ones((2, 2, 2), bool))
    with pytest.raises(ValueError, match="sh_order_max must be an even int"):
        fit_csd(gtab, data, response, sh_order_max=7)
