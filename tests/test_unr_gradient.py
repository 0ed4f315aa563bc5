"""The correction that also reads the data term's gradient at the prior (issues 25 and 27).

``inputs="prior+gradient"`` (:data:`esdmri.reconst.pretrained.INPUTS`): the gradient of
each voxel's loss without TV (:func:`esdmri.reconst.pretrained.data_gradient`) as a second
grid fODF and constant channels. Checked against a brute-force autograd gradient of
:func:`esdmri.reconst.training.coefficient_loss`, under a random rotation of the gtab and
the fODF, and for what the shipped correction already guarantees (zero head, folding,
files). The cohort scan is the straight one of ``cohort_settings(3, 0)`` at 8^3 voxels,
none of the dev or test seeds.
"""

import copy

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table
from scipy.spatial.transform import Rotation
from test_cor_folded import assert_same, prior_volume, randomized
from test_pretrained import sh_rotation

from esdmri.cohort import build_phantom, cohort_settings, prepare_scan
from esdmri.reconst import folded, pretrained
from esdmri.reconst.models import RTESDModel
from esdmri.reconst.network import build_fodf_sampler, build_forward_model
from esdmri.reconst.pretraining import as_tensors, pretrain_correction
from esdmri.reconst.training import coefficient_loss
from esdmri.shm import n_coeffs
from esdmri.testing import REFLECT_X, ROTATE_Z_90, relative_error, rotate_grid
from esdmri.workflows import pretrain as pretrain_workflow

SIDE = 8
GRADIENT = "prior+gradient"


@pytest.fixture(scope="module")
def scan():
    return prepare_scan(cohort_settings(3, 0)[1], SIDE)


def gradient_correction(kind="e3so3-stem", seed=3):
    """A correction that reads the gradient, with random weights everywhere."""
    return randomized(kind, seed, pretrained.check_architecture(kind, inputs=GRADIENT))


def volume(array):
    return torch.as_tensor(np.asarray(array, dtype=np.float32)).permute(3, 0, 1, 2)[None]


def autograd_gradient(scan, coefficients, gtab=None):
    """Each masked voxel's gradient of its loss, by autograd of coefficient_loss (the mean
    over the masked voxels, so times their number), float64."""
    order = scan["order"]
    weights = RTESDModel(scan["gtab"], verbose=False).config.training.loss_weights
    assert weights.total_variation == 0
    forward = build_forward_model(scan["response"], gtab or scan["gtab"], order).double()
    c = volume(coefficients).double().requires_grad_(True)
    total, _ = coefficient_loss(c, n_coeffs(order), forward, build_fodf_sampler(order).double(),
                                volume(scan["normalized"]).double(),
                                torch.as_tensor(scan["mask"])[None], weights)
    total.backward()
    return c.grad[0].permute(1, 2, 3, 0).numpy() * scan["mask"].sum()


def test_the_gradient_channels_are_the_autograd_gradient(scan):
    """scan_gradient (VoxelLoss, written out) equals autograd of coefficient_loss on every
    masked voxel, and the network's gradient channels are it on the grid, normalised."""
    prior, mask = scan["prior"], scan["mask"]
    expected = autograd_gradient(scan, prior)
    gradient = scan["gradient"]  # prepare_scan's, scan_gradient with the model's weights
    assert np.abs(expected[mask]).max() > 1e-2  # the prior is no minimum: it can fail
    np.testing.assert_allclose(gradient[mask], expected[mask], rtol=1e-3,
                               atol=1e-4 * np.abs(expected[mask]).max())
    np.testing.assert_array_equal(gradient[~mask], 0)
    correction = gradient_correction()
    tissues = scan["tissues"]
    with torch.no_grad():
        grid, scale = correction.inputs(volume(prior), tissues, volume(gradient))
    assert grid.shape[1] == 7 == correction.architecture["in_channels"]
    anisotropic, isotropic = pretrained.GRADIENT_SCALES
    scale = scale[0, 0].numpy()[mask][:, None]
    wm = expected[mask][:, :n_coeffs(8)].copy()
    wm[:, 0] = 0
    fodf = wm @ correction.sh_to_grid.numpy().T * anisotropic / scale
    n_wm = n_coeffs(scan["order"])
    terms = np.stack([expected[mask][:, 0]] + [expected[mask][:, n_wm + tissues.index(t) - 1]
                                               for t in ("gm", "csf")], 1)
    channels = grid[0].numpy()[..., mask]  # [7, V, n]
    np.testing.assert_allclose(channels[3].T, fodf, rtol=1e-3, atol=1e-3 * np.abs(fodf).max())
    np.testing.assert_allclose(channels[4:, 0].T, terms * isotropic / scale, rtol=1e-3,
                               atol=1e-3 * np.abs(terms * isotropic / scale).max())
    # The prior's channels are the prior-only correction's input, unchanged.
    with torch.no_grad():
        prior_only, _ = pretrained.PriorCorrection().inputs(volume(prior), tissues)
    np.testing.assert_array_equal(grid[:, :3].numpy(), prior_only.numpy())


def test_the_gradient_rotates_with_the_gtab_and_the_fodf(scan):
    """A random rotation R of the gtab's directions and of the fODF (signal unchanged)
    rotates each voxel's gradient by R (degree by degree); the rest is the sparsity
    terms' dense sphere, which no rotation maps onto itself."""
    rotation = Rotation.random(random_state=7).as_matrix()
    gtab = scan["gtab"]
    rotated_gtab = gradient_table(gtab.bvals, bvecs=gtab.bvecs @ rotation.T)
    order, mask = scan["order"], scan["mask"]
    n_wm = n_coeffs(order)
    # Coefficients as rows: c @ matrix is the fODF rotated as the gtab's directions are
    # by ``bvecs @ rotation.T`` (test_pretrained.sh_rotation's matrix acting on columns
    # rotates by the transpose).
    matrix = sh_rotation(rotation, order)
    prior = scan["prior"].astype(np.float64)
    rotated = prior.copy()
    rotated[..., :n_wm] = prior[..., :n_wm] @ matrix
    gradient = autograd_gradient(scan, prior)
    moved = gradient.copy()
    moved[..., :n_wm] = gradient[..., :n_wm] @ matrix
    error = relative_error(torch.as_tensor(autograd_gradient(scan, rotated, rotated_gtab)[mask]),
                           torch.as_tensor(moved[mask]))
    print(f"relative error of the rotated gradient: {error:.2e}")
    assert error < 1e-2
    # Without rotating the gtab the gradient does not follow: the check can fail.
    assert relative_error(torch.as_tensor(autograd_gradient(scan, rotated)[mask]),
                          torch.as_tensor(moved[mask])) > 10 * error


# (C-ESD's concatenation of the neighbours in a fixed order is not equivariant to grid
# rotations, with or without the gradient: tests/test_pretrained.py.)
@pytest.mark.parametrize("kind", ["e3so3-stem", "spherical"])
@pytest.mark.parametrize("symmetry", [ROTATE_Z_90, REFLECT_X], ids=["rot_z_90", "reflect_x"])
def test_the_correction_commutes_with_grid_symmetries(symmetry, kind):
    """Rotating (or reflecting) the prior and its gradient by a symmetry of the grid and
    of the voxel lattice rotates the correction: exact, as the prior-only correction's."""
    rotation = np.asarray(symmetry, dtype=float)
    correction = copy.deepcopy(gradient_correction(kind)).double()
    order, tissues = 10, ("wm", "gm", "csf")
    rng = np.random.default_rng(1)
    coefficients = torch.as_tensor(rng.normal(size=(1, n_coeffs(order) + 2, 6, 6, 6)))
    coefficients[:, 0] = torch.as_tensor(1 + rng.uniform(size=(6, 6, 6)))
    coefficients[:, -2:] = torch.as_tensor(rng.uniform(size=(2, 6, 6, 6)))
    gradient = torch.as_tensor(rng.normal(size=coefficients.shape)) * 0.01
    matrix = torch.as_tensor(sh_rotation(rotation, order))

    def act(c):
        wm = torch.einsum("ij,bjxyz->bixyz", matrix, c[:, :n_coeffs(order)])
        return rotate_grid(torch.cat([wm, c[:, n_coeffs(order):]], dim=1), rotation)

    with torch.no_grad():
        error = relative_error(correction(act(coefficients), tissues, act(gradient)),
                               act(correction(coefficients, tissues, gradient)))
    assert error < 1e-6


def test_a_random_rotation_of_the_scan_rotates_the_correction(scan):
    """End to end from the data: rotating the gtab's directions by a random R rotates the
    prior, the gradient and the correction by R, up to what no random rotation keeps:
    the prior's own deconvolution (relative error 0.026 here), the grids, and the
    gradient's degrees 2-8, a small difference that the prior's error moves by 0.20 of
    itself. Measured (random weights): 0.073 for the prior-only correction, 0.168 with
    the gradient; a wrong rotation of either input gives O(1)."""
    rotation = Rotation.random(random_state=11).as_matrix()
    phantom = build_phantom(cohort_settings(3, 0)[1], SIDE)
    gtab = phantom.gtab
    rotated_gtab = gradient_table(gtab.bvals, bvecs=gtab.bvecs @ rotation.T)
    # Both networks with random weights everywhere, alike (test_cor_folded.randomized).
    corrections = {"none": pretrained.PriorCorrection().zero_head(),
                   "prior": randomized("e3so3-stem", seed=3), GRADIENT: gradient_correction()}
    outputs = {}
    for which, g in (("original", gtab), ("rotated", rotated_gtab)):
        model = RTESDModel(g, scan["response"], verbose=False)
        prepared = model.prepare(phantom.data, mask=phantom.mask)
        prior = model.prior_coefficients(prepared)
        gradient = pretrained.scan_gradient(model, prior, prepared)
        for name, correction in corrections.items():
            outputs[which, name] = pretrained.apply_correction(
                correction, prior, prepared.mask, prepared.response.tissues,
                gradient=gradient if correction.reads_gradient else None)
    n_wm = n_coeffs(scan["order"])
    matrix = sh_rotation(rotation, scan["order"])
    errors = {}
    for name in corrections:
        moved = outputs["original", name].astype(np.float64)
        moved[..., :n_wm] = moved[..., :n_wm] @ matrix  # as rows: see the test above
        errors[name] = relative_error(torch.as_tensor(outputs["rotated", name]),
                                      torch.as_tensor(moved))
    print(f"relative equivariance error, random rotation: {errors}")
    assert errors["none"] < 0.05 and errors["prior"] < 0.1
    assert errors[GRADIENT] < 0.25


@pytest.mark.parametrize("tissues", [("wm", "gm", "csf"), ("wm", "csf")])
def test_zero_head_gives_the_prior_and_folding_equals_the_layers(tissues):
    correction = gradient_correction()
    coefficients, mask = prior_volume((6, 5, 5), 8, tissues, seed=2)
    gradient = np.random.default_rng(3).normal(0, 0.01, coefficients.shape).astype(np.float32)
    gradient[~mask] = 0
    assert folded.foldable(correction)
    halo = correction.halo
    with torch.no_grad():
        out = correction(torch.nn.functional.pad(volume(coefficients), (halo,) * 6), tissues,
                         torch.nn.functional.pad(volume(gradient), (halo,) * 6))
    expected = out[0, :, halo:-halo, halo:-halo, halo:-halo].permute(1, 2, 3, 0).numpy().copy()
    expected[~mask] = 0
    assert_same(pretrained.apply_correction(correction, coefficients, mask, tissues,
                                            gradient=gradient), expected, coefficients)
    assert_same(pretrained.apply_correction(correction, coefficients, mask, tissues, slab=2,
                                            folded=False, gradient=gradient),
                expected, coefficients)
    # The gradient matters: another gradient, another correction.
    other = pretrained.apply_correction(correction, coefficients, mask, tissues,
                                        gradient=-gradient)
    assert np.abs(other - expected).max() > 1e-3
    correction.zero_head()
    for fold in (True, False):
        np.testing.assert_array_equal(pretrained.apply_correction(
            correction, coefficients, mask, tissues, folded=fold, gradient=gradient),
            coefficients)


def test_files_round_trip_and_mismatches_are_refused(tmp_path):
    correction = gradient_correction()
    path = tmp_path / "gradient.pt"
    pretrained.save_correction(correction, path)
    loaded = pretrained.load_correction(path)
    assert loaded.reads_gradient and loaded.architecture == correction.architecture
    assert loaded.architecture["gradient_scales"] == list(pretrained.GRADIENT_SCALES)
    for key, tensor in correction.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), tensor.numpy())
    # The shipped architecture is unchanged, key for key, and reads no gradient.
    for kind in pretrained.ARCHITECTURES:
        assert pretrained.check_architecture(kind) == pretrained.ARCHITECTURES[kind]
        assert "inputs" not in pretrained.ARCHITECTURES[kind]
    assert not pretrained.load_correction(True).reads_gradient
    with pytest.raises(ValueError, match="inputs must be one of"):
        pretrained.check_architecture("e3so3-stem", inputs="gradient")
    # Other scales, an unknown input, or prior-only weights under a gradient record.
    for change, message in (({"gradient_scales": [1.0, 1.0]}, "architecture"),
                            ({"inputs": "signal"}, "architecture"),
                            ({"inputs": "prior"}, "architecture")):
        saved = torch.load(path, weights_only=True)
        saved["architecture"] = {**saved["architecture"], **change}
        torch.save(saved, tmp_path / "other.pt")
        with pytest.raises(ValueError, match=message):
            pretrained.load_correction(tmp_path / "other.pt")
    saved = torch.load(pretrained.DEFAULT_WEIGHTS["e3so3-stem"], weights_only=True)
    saved["architecture"] = correction.architecture
    torch.save(saved, tmp_path / "shipped-as-gradient.pt")
    with pytest.raises(ValueError, match="does not match"):
        pretrained.load_correction(tmp_path / "shipped-as-gradient.pt")
    # A missing or an unexpected gradient is refused by name.
    coefficients, mask = prior_volume((4, 4, 4), 8, ("wm", "gm", "csf"), seed=1)
    with pytest.raises(ValueError, match="gradient"):
        pretrained.apply_correction(correction, coefficients, mask, ("wm", "gm", "csf"))
    with pytest.raises(ValueError, match="gradient"):
        pretrained.apply_correction(pretrained.PriorCorrection(), coefficients, mask,
                                    ("wm", "gm", "csf"), gradient=coefficients)
    assert pretrain_workflow.INPUTS == pretrained.INPUTS


def test_the_fit_computes_the_gradient_and_pretraining_reads_it(scan, tmp_path):
    """A fit with gradient-reading weights corrects the prior with its own gradient (as
    apply_correction given scan_gradient), and a few pretraining steps train one."""
    items = [as_tensors(scan)]
    correction, summary = pretrain_correction(items, items, steps=4, every=2, window=6,
                                              progress=False, inputs=GRADIENT)
    assert correction.reads_gradient and summary["best_loss"] < summary["prior_loss"]
    path = tmp_path / "trained.pt"
    pretrained.save_correction(correction, path)
    phantom_model = RTESDModel(scan["gtab"], scan["response"], pretrained=path, verbose=False)
    phantom = build_phantom(cohort_settings(3, 0)[1], SIDE)
    prepared = phantom_model.prepare(phantom.data, mask=phantom.mask)
    prior = phantom_model.prior_coefficients(prepared)
    expected = pretrained.apply_correction(
        correction, prior, prepared.mask, prepared.response.tissues,
        gradient=pretrained.scan_gradient(phantom_model, prior, prepared))
    np.testing.assert_array_equal(phantom_model.corrected_prior(prior, prepared), expected)
    assert np.abs(expected - prior).max() > 1e-4
