"""Tests of the segmentation networks, their training and the lesion phantom."""

import numpy as np
import pytest
import torch
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from esdmri.nn.pq import q_from_gtab
from esdmri.segmentation import (
    CNN3DBaseline,
    PQSegmentationNetwork,
    load_network,
    predict_segmentation,
    save_network,
    segmentation_loss,
    signal_to_input,
    train_segmentation,
)
from esdmri.segmentation.phantom import make_lesion_dataset, make_lesion_phantom
from esdmri.testing import (ROTATE_X_90, ROTATE_Z_90, assert_equivariant, equivariance_error,
                            rotate_grid)

# A small network for fast tests.
TINY = dict(pq_channels=((2, 1, 1),) * 3, p_channels=((2, 1, 1), (1,)), n_radial_q=2,
            max_order_q=2)


@pytest.fixture(autouse=True)
def single_thread():
    # Tiny tensors: threading overhead dominates on a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small_gtab():
    """1 b0 + 2 shells x 10 directions: enough q-space for tiny tests."""
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(20, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bvals = np.concatenate([[0], np.repeat([1000, 2000], 10)])
    bvecs = np.concatenate([np.zeros((1, 3)), directions])
    return gradient_table(bvals=bvals, bvecs=bvecs)


@pytest.fixture(scope="module")
def tiny_dataset(small_gtab):
    phantoms = make_lesion_dataset(4, shape=(8, 8, 8), gtab=small_gtab, snr=30,
                                   lesion_radius=(1.5, 2.0), seed=3)
    inputs = signal_to_input(np.stack([p.data for p in phantoms]), small_gtab)
    labels = torch.from_numpy(np.stack([p.labels for p in phantoms]))
    return inputs, labels


# --------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize("rotation", [ROTATE_Z_90, ROTATE_X_90])
@pytest.mark.parametrize("training", [True, False])
def test_pq_network_is_invariant_to_rotating_the_6d_input(rotation, training):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(1)
        q = rng.normal(size=(9, 3)) * 0.7
        q[0] = 0.0
        net = PQSegmentationNetwork(q, **TINY)
        # The same weights acting on the rotated acquisition.
        rotated_net = PQSegmentationNetwork(q @ rotation.T, **TINY)
        rotated_net.load_state_dict(net.state_dict())
        x = torch.rand(2, 1, 9, 8, 8, 8)
        if not training:
            net(x), rotated_net(rotate_grid(x, rotation))  # non-trivial running statistics
            net.eval(), rotated_net.eval()
        assert net.logits(x).std() > 1e-3
        assert_equivariant(net.logits, x, lambda f: rotate_grid(f, rotation),
                           function_out=rotated_net.logits, tol=1e-8,
                           label="pq network under grid and q rotation")
        # Rotating the grid without q-space is not a symmetry: the check can fail.
        assert equivariance_error(net.logits, x, lambda f: rotate_grid(f, rotation)) > 1e-4
    finally:
        torch.set_default_dtype(previous)


def shell_q(rng, n_b0=2):
    directions = rng.normal(size=(8, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    q = np.concatenate([0.5 * directions[:4], directions[4:]])
    return np.concatenate([np.zeros((n_b0, 3)), q])


@pytest.mark.parametrize("preset", [True, False])
def test_input_q_sampling_network_is_invariant_and_averages_b0(preset):
    # The published configuration (or a small network with every published option):
    # exactly invariant to 90-degree rotations of the 6D input, for any q-sampling.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(2)
        q = shell_q(rng)
        options = dict(pq_channels=((2, 1),), p_channels=((2, 1), (1,)), kernel_size=3) \
            if preset else dict(TINY, q_hidden="input", selection_rule="two_sided",
                                normalize_q_offsets=True, zero_offsets="linear",
                                p_radial="learned", radial_units=4)
        build = (lambda samples: PQSegmentationNetwork.from_preset("mueller2021", samples,
                                                                   **options)) \
            if preset else (lambda samples: PQSegmentationNetwork(samples, **options))
        net = build(q)
        for layer in [*net.pq_layers, *net.p_layers]:
            if layer.bias is not None:
                with torch.no_grad():
                    layer.bias.normal_()
        x = torch.rand(2, 1, len(q), 7, 7, 7)
        out = net.logits(x)
        assert out.std() > 1e-3
        for rotation in (ROTATE_Z_90, ROTATE_X_90 @ ROTATE_Z_90):
            rotated_net = build(q @ rotation.T)
            rotated_net.load_state_dict(net.state_dict())
            assert_equivariant(net.logits, x, lambda f: rotate_grid(f, rotation),
                               function_out=rotated_net.logits, tol=1e-8,
                               label=f"network {options} under grid and q rotation")
        # The two b0 volumes enter as their mean.
        mean_b0 = x.clone()
        mean_b0[:, :, :2] = x[:, :, :2].mean(2, keepdim=True)
        assert (net.logits(mean_b0) - out).abs().max() < 1e-10
        swapped = x.clone()
        swapped[:, :, 0], swapped[:, :, 1] = x[:, :, 1], x[:, :, 0]
        assert (net.logits(swapped) - out).abs().max() < 1e-10
        other = x.clone()
        other[:, :, 2] = x[:, :, 3]
        assert (net.logits(other) - out).abs().max() > 1e-6
    finally:
        torch.set_default_dtype(previous)


def test_published_preset_configuration(tmp_path):
    q = shell_q(np.random.default_rng(3), n_b0=3)
    net = PQSegmentationNetwork.from_preset("mueller2021", q)
    # One pq-layer on the input's sampling with the 3 b0s averaged: 1 + 8 samples.
    assert len(net.pq_layers) == 1 and len(net.p_layers) == 4
    layer = net.pq_layers[0]
    assert (layer.n_q_in, layer.n_q_out) == (9, 9)
    assert layer.out_field.multiplicities == (11, 4)  # 7 scalars + 4 gates, 4 vectors
    assert (layer.spatial_kernel_size, layer.selection_rule, layer.zero_offsets) == (5, "two_sided",
                                                                             "linear")
    assert layer.normalize_q_offsets and layer.p_radial.kind == "cosine"
    assert layer.n_radial_q == 3  # b0 and two shells
    assert [p.out_field.multiplicities for p in net.p_layers] == [(25, 5), (13, 3), (7, 2),
                                                                  (1,)]
    assert all(isinstance(norm, torch.nn.Identity) for norm in net.norms)
    x = torch.rand(1, 1, len(q), 6, 6, 6)
    out = net(x)
    assert out.shape == (1, 6, 6, 6)
    save_network(net, tmp_path / "preset.pt")
    loaded = load_network(tmp_path / "preset.pt")
    assert loaded.config == net.config
    assert torch.equal(loaded(x), net.eval()(x))
    with pytest.raises(ValueError, match="name must be one of"):
        PQSegmentationNetwork.from_preset("unknown", q)
    with pytest.raises(ValueError, match="q_hidden must be"):
        PQSegmentationNetwork(q, q_hidden="inputs")
    with pytest.raises(ValueError, match="p_channels must end with one scalar"):
        PQSegmentationNetwork(q, p_channels=((2,),))


def test_cnn_baseline_matches_parameter_count():
    q = np.zeros((31, 3))
    net = PQSegmentationNetwork(q)
    n_parameters = sum(p.numel() for p in net.parameters())
    width = CNN3DBaseline.width_for_parameters(31, n_parameters)
    cnn = CNN3DBaseline(31, width)
    n_cnn = sum(p.numel() for p in cnn.parameters())
    assert abs(n_cnn - n_parameters) / n_parameters < 0.1
    out = cnn(torch.rand(2, 1, 31, 6, 6, 6))
    assert out.shape == (2, 6, 6, 6)
    assert torch.all((out > 0) & (out < 1))


def test_segmentation_loss_values():
    labels = torch.tensor([[1.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0]])
    # BCE log 2; soft Dice 1 - (2 * 0.5 + 1) / (1 + 1 + 1).
    expected = np.log(2) + 1 - 2 / 3
    assert np.isclose(segmentation_loss(logits, labels).item(), expected)
    mask = torch.tensor([[True, False]])
    # Only the lesion voxel counts: Dice 1 - (2 * 0.5 + 1) / (0.5 + 1 + 1).
    assert np.isclose(segmentation_loss(logits, labels, mask).item(), np.log(2) + 1 - 2 / 2.5)


@pytest.mark.parametrize("model_class", ["pq", "cnn"])
def test_training_lowers_loss_and_save_load_round_trip(model_class, small_gtab, tiny_dataset,
                                                       tmp_path):
    inputs, labels = tiny_dataset
    if model_class == "pq":
        model = PQSegmentationNetwork(q_from_gtab(small_gtab), **TINY)
    else:
        model = CNN3DBaseline(inputs.shape[2], width=8)
    history = train_segmentation(model, inputs, labels, epochs=2, batch_size=4,
                                 learning_rate=1e-2, verbose=False)
    assert len(history) == 2
    assert history[-1] < history[0]
    before = predict_segmentation(model, inputs)
    assert before.shape == (4, 8, 8, 8)
    path = tmp_path / "model.pt"
    save_network(model, path)
    loaded = load_network(path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    np.testing.assert_array_equal(predict_segmentation(loaded, inputs), before)


def test_signal_to_input_normalises_by_mean_b0(small_gtab):
    data = np.random.default_rng(2).uniform(1, 2, size=(3, 3, 3, 21)).astype(np.float32)
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[1] = True
    inputs = signal_to_input(data, small_gtab, mask)
    assert inputs.shape == (1, 1, 21, 3, 3, 3)
    expected = np.clip(data[1] / data[1, ..., :1], 0, 2)
    np.testing.assert_allclose(inputs[0, 0, :, 1].numpy(), np.moveaxis(expected, -1, 0), rtol=1e-6)
    assert torch.all(inputs[0, 0, :, 0] == 0)


# --------------------------------------------------------------------------
# Lesion phantom


def test_lesion_phantom_rotation_moves_anatomy_and_fibres(small_gtab):
    # A 90-degree rotation of the volume equals the unrotated volume, moved on
    # the grid and measured with the inversely rotated gradients.
    rotated = make_lesion_phantom((10, 10, 10), small_gtab, snr=None, rotation=ROTATE_Z_90, seed=4)
    inverse_gtab = gradient_table(bvals=small_gtab.bvals, bvecs=small_gtab.bvecs @ ROTATE_Z_90)
    plain = make_lesion_phantom((10, 10, 10), inverse_gtab, snr=None, rotation=None, seed=4)
    assert plain.labels.any()
    np.testing.assert_array_equal(rotated.labels, rotate_grid(plain.labels, ROTATE_Z_90))
    np.testing.assert_allclose(rotated.data, np.moveaxis(
        rotate_grid(np.moveaxis(plain.data, -1, 0), ROTATE_Z_90), 0, -1), rtol=1e-5)


def test_lesions_are_partial_demyelination(small_gtab):
    # Raised radial diffusivity and free water, orientation kept: DTI sees a lower FA and
    # a higher radial diffusivity and MD.
    phantom = make_lesion_phantom((12, 12, 12), small_gtab, snr=None, n_lesions=(2, 2), seed=5)
    fit = TensorModel(phantom.gtab).fit(phantom.data)
    lesion, healthy = phantom.labels, ~phantom.labels
    assert lesion.sum() > 10
    assert fit.fa[lesion].mean() < fit.fa[healthy].mean() - 0.05
    assert fit.rd[lesion].mean() > 1.3 * fit.rd[healthy].mean()
    assert fit.md[lesion].mean() > fit.md[healthy].mean()
    single = phantom.fibre_fractions[..., 1] < 1e-3
    cosine = np.abs(np.sum(fit.evecs[..., 0] * phantom.fibre_dirs[..., 0, :], axis=-1))
    assert np.all(cosine[single & healthy] > 0.99)
    # The same volume without lesion contrast differs only inside (and at the border of)
    # the lesions.
    plain = make_lesion_phantom((12, 12, 12), small_gtab, snr=None, n_lesions=(2, 2), seed=5,
                                radial_increase=0.0, axial_decrease=0.0, lesion_free_water=0.0)
    changed = np.abs(plain.data - phantom.data).max(axis=-1) > 1e-3
    assert np.all(changed[lesion]) and not np.any(changed[phantom.severity == 0])


def test_random_rotations_differ_and_are_proper(small_gtab):
    phantoms = make_lesion_dataset(3, shape=(8, 8, 8), gtab=small_gtab, rotate=True, seed=6)
    rotations = [p.rotation for p in phantoms]
    for rotation in rotations:
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert np.isclose(np.linalg.det(rotation), 1)
    assert not np.allclose(rotations[0], rotations[1])


# --------------------------------------------------------------------------
# Bad input


def test_bad_input_errors(small_gtab, tiny_dataset):
    inputs, labels = tiny_dataset
    cnn = CNN3DBaseline(21, width=4)
    with pytest.raises(ValueError, match=r"input must have shape \(batch, 1, 21"):
        cnn(torch.rand(1, 1, 20, 4, 4, 4))
    with pytest.raises(ValueError, match="labels must have shape"):
        train_segmentation(cnn, inputs, labels[:, :4], verbose=False)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        train_segmentation(cnn, inputs, labels, epochs=0, verbose=False)
    with pytest.raises(ValueError, match="data must have shape"):
        signal_to_input(np.ones((3, 3, 3, 5)), small_gtab)
    with pytest.raises(ValueError, match="shape must be 3 ints"):
        make_lesion_phantom((4, 8, 8), small_gtab)
    with pytest.raises(ValueError, match="proper rotation"):
        make_lesion_phantom((8, 8, 8), small_gtab, rotation=2 * np.eye(3))
    with pytest.raises(ValueError, match="n_lesions"):
        make_lesion_phantom((8, 8, 8), small_gtab, n_lesions=(3, 1))
    with pytest.raises(ValueError, match="axial_decrease"):
        make_lesion_phantom((8, 8, 8), small_gtab, axial_decrease=1.0)
    with pytest.raises(TypeError, match="network must be one of"):
        save_network(torch.nn.Linear(2, 2), "unused.pt")
