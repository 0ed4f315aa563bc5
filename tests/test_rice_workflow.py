"""``esdmri_fit --noise_floor model`` reaches the model: the command's fODFs are the
library's with the Rician-mean data term, and differ from the least-squares fit."""

import nibabel as nib
import numpy as np
import pytest
from test_workflows import TINY_MODEL, in_process, phantom  # noqa: F401

from esdmri import RTESDModel, load_model
from esdmri.workflows.fit import FitFlow


@pytest.mark.slow
def test_fit_with_the_rician_data_term_like_the_library(phantom, in_process,  # noqa: F811
                                                        tmp_path):
    untrained = [arg for arg in TINY_MODEL if arg not in ("--epochs", "1")]
    in_process(FitFlow(), *phantom.dwi, "--mask", phantom.folder / "mask.nii.gz",
               *phantom.response_args, *untrained, "--noise_floor", "model",
               "--out_dir", tmp_path)
    options = dict(sh_order_max=4, nside=2, depth=2, filter_start=2, block_size=8,
                   verbose=False)
    model = RTESDModel(phantom.gtab, phantom.response, noise_floor="model", **options)
    expected = model.fit(phantom.data, mask=phantom.mask).shm_coeff
    written = nib.load(tmp_path / "fodf_sh.nii.gz").get_fdata()
    np.testing.assert_allclose(written, expected, atol=1e-4)
    plain = RTESDModel(phantom.gtab, phantom.response, **options)
    assert np.abs(written - plain.fit(phantom.data, mask=phantom.mask).shm_coeff).max() > 1e-3
    assert load_model(tmp_path / "model.pt", verbose=False).config.network.noise_floor == "model"
