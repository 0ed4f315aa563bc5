"""A correction of every WM degree up to 12 on the nside-8 grid (issues 25 and 27).

The architecture dict's ``corrected_order`` chooses the degrees the network
reads and corrects and, through it, the smallest HEALPix hemisphere that
carries them; the shipped order-8 architecture stays as it was.
"""

import numpy as np
import pytest
import test_workflows
import torch
from test_cor_folded import assert_same, prior_volume, whole_volume
from test_pretrained import symmetry_error
from test_workflows_pretrain import TINY

from esdmri.cohort import cohort_settings, prepare_scan
from esdmri.reconst import folded, pretrained
from esdmri.reconst.config import MAX_GRID_CONDITION, grid_condition_number
from esdmri.reconst.models import RTESDModel
from esdmri.reconst.pretraining import as_tensors, pretrain_correction
from esdmri.shm import n_coeffs
from esdmri.sims import default_gtab
from esdmri.sphere import HealpixSphere
from esdmri.testing import REFLECT_X, ROTATE_Z_90
from esdmri.workflows.pretrain import PretrainFlow

in_process = test_workflows.in_process  # the fixture that runs a flow in this process


def order12(kind="e3so3-stem", seed=0):
    """An order-12 correction with random weights (its head is not zero)."""
    torch.manual_seed(seed)
    return pretrained.PriorCorrection(pretrained.check_architecture(kind, 12)).eval()


def test_the_order_picks_the_smallest_carrying_grid():
    """Order 12 runs on nside 8 (384 vertices): nside 4 cannot carry it, nside 8 can."""
    architecture = pretrained.check_architecture("e3so3-stem", 12)
    assert architecture == {**pretrained.ARCHITECTURES["e3so3-stem"], "corrected_order": 12,
                            "nside": 8}
    assert grid_condition_number(12, HealpixSphere(4, hemisphere=True).vertices) \
        > MAX_GRID_CONDITION
    assert grid_condition_number(12, HealpixSphere(8, hemisphere=True).vertices) \
        <= MAX_GRID_CONDITION
    correction = order12()
    assert correction.grid_to_sh.shape == (n_coeffs(12), 384)
    # The shipped order keeps the shipped architecture, key for key.
    for kind in pretrained.ARCHITECTURES:
        assert pretrained.check_architecture(kind) == pretrained.ARCHITECTURES[kind]
        assert pretrained.check_architecture(kind, 8) == pretrained.ARCHITECTURES[kind]
    for bad in (7, 0, 12.0, True, "12"):
        with pytest.raises(ValueError, match="corrected_order"):
            pretrained.check_architecture("e3so3-stem", bad)


@pytest.mark.parametrize("kind", ["e3so3-stem", "spherical"])
@pytest.mark.parametrize("symmetry", [ROTATE_Z_90, REFLECT_X], ids=["rot_z_90", "reflect_x"])
def test_order12_correction_commutes_with_grid_and_sphere_symmetries(symmetry, kind):
    """As the order-8 correction (tests/test_pretrained.py): the nside-8 hemisphere is
    mapped onto itself by the grid's 90-degree rotations and reflections."""
    assert symmetry_error(order12(kind), symmetry) < 1e-6


def test_order12_corrects_degrees_2_to_12_and_passes_the_rest():
    """Degrees 2-12 change, the WM amount (l = 0) and the isotropic tissues do not; a
    prior of order 14 keeps its degree 14."""
    correction = order12()
    tissues = ("wm", "gm", "csf")
    coefficients, mask = prior_volume((5, 5, 5), 14, tissues, seed=1)
    volume = torch.as_tensor(coefficients).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        out = correction(volume, tissues)
    change = (out - volume).abs().amax(dim=(0, 2, 3, 4)).numpy()
    np.testing.assert_array_equal(change[0], 0)
    np.testing.assert_array_equal(change[n_coeffs(12):], 0)
    degree = np.repeat(np.arange(0, 13, 2), [2 * l + 1 for l in range(0, 13, 2)])
    for l in range(2, 13, 2):
        assert change[1:n_coeffs(12)][degree[1:] == l].max() > 1e-3, l


def test_zero_head_of_order12_gives_the_prior_exactly():
    correction = order12().zero_head()
    tissues = ("wm", "gm", "csf")
    coefficients, mask = prior_volume((6, 5, 5), 12, tissues, seed=3)
    corrected = pretrained.apply_correction(correction, coefficients, mask, tissues)
    np.testing.assert_array_equal(corrected, coefficients)
    volume = torch.as_tensor(coefficients).permute(3, 0, 1, 2)[None]
    with torch.no_grad():
        np.testing.assert_array_equal(correction(volume, tissues).numpy(), volume.numpy())


@pytest.mark.parametrize("order, tissues", [(12, ("wm", "gm", "csf")), (8, ("wm", "csf"))])
def test_order12_folds_and_equals_the_layered_network(order, tissues):
    """The folded pass (apply_correction's default on a CPU) and the layered slabs give
    the network's values on the whole volume, for priors at and below order 12."""
    correction = order12()
    with torch.no_grad():
        for name, parameter in correction.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.3)
    assert folded.foldable(correction)
    coefficients, mask = prior_volume((6, 5, 5), order, tissues, seed=5)
    expected = whole_volume(correction, coefficients, mask, tissues)
    assert_same(pretrained.apply_correction(correction, coefficients, mask, tissues),
                expected, coefficients)
    assert_same(pretrained.apply_correction(correction, coefficients, mask, tissues, slab=2,
                                            folded=False), expected, coefficients)


def test_order12_file_round_trips_and_a_mismatched_file_is_refused(tmp_path):
    correction = order12()
    path = tmp_path / "order12.pt"
    pretrained.save_correction(correction, path)
    loaded = pretrained.load_correction(path)
    assert loaded.architecture == correction.architecture
    assert loaded.architecture["nside"] == 8 and loaded.order == 12
    for key, tensor in correction.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), tensor.numpy(),
                                      err_msg=key)
    # The same architecture for the voxel-wise ESD correction: not RT-ESD's.
    with pytest.raises(ValueError, match="holds weights of the e3so3-stem correction, not "
                                         "the spherical"):
        pretrained.load_correction(path, kind="spherical")
    # An order-12 record on the shipped nside 4 (which cannot carry it), an odd order,
    # and order-12 weights under an order-8 record: each refused, naming the mismatch.
    for change, message in (({"nside": 4}, "architecture"),
                            ({"corrected_order": 11}, "architecture"),
                            ({"corrected_order": 8, "nside": 4}, "does not match")):
        saved = torch.load(path, weights_only=True)
        saved["architecture"] = {**saved["architecture"], **change}
        other = tmp_path / "other.pt"
        torch.save(saved, other)
        with pytest.raises(ValueError, match=message):
            pretrained.load_correction(other)


@pytest.mark.slow
def test_pretrain_command_trains_an_order12_correction(in_process, tmp_path):
    """``esdmri_pretrain --corrected_order 12`` (tiny): the file records the order-12
    architecture on nside 8 and its order-12 targets, and the default model loads it."""
    summary = in_process(PretrainFlow(), *TINY, "--corrected_order", "12", "--out_dir",
                         tmp_path)
    path = tmp_path / "pretrained.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["architecture"] == pretrained.check_architecture("e3so3-stem", 12)
    assert saved["metadata"]["settings"]["corrected_order"] == 12
    assert summary["sha256"] == pretrained.sha256_of(path)
    correction = RTESDModel(default_gtab(), pretrained=path, verbose=False) \
        .pretrained_correction()
    assert correction.order == 12 and correction.sh_to_grid.shape == (384, n_coeffs(12))


@pytest.mark.parametrize("order, match", [("7", "corrected_order must be even"),
                                          ("0", "corrected_order must be an integer >= 2")])
def test_pretrain_refuses_a_bad_corrected_order(in_process, tmp_path, order, match):
    message = in_process(PretrainFlow(), *TINY, "--corrected_order", order, "--out_dir",
                         tmp_path, fails=True)
    assert match in message


def test_supervised_targets_below_the_corrected_order_are_refused():
    """Order-8 targets would leave degrees 10-12 untrained: refused before training."""
    scan = prepare_scan(cohort_settings(1, 0)[0], 8)
    item = as_tensors(scan)
    with pytest.raises(ValueError, match="corrected_order=12 needs supervised targets"):
        pretrain_correction([item], [item], steps=1, corrected_order=12, progress=False)
