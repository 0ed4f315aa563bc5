"""Tests of the spherical-tensor field layers: pq-layer, p-conv, q-reduction, gates, norm."""

from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dipy.core.gradients import gradient_table
from e3nn import o3

from esdmri.nn.gated import EquivariantBatchNorm, GatedNonlinearity
from esdmri.nn.pq import (
    SELECTION_RULES,
    PConv,
    PQConv,
    PQSphereConv,
    QReduction,
    RadialProfile,
    _pq_path_basis,
    cosine_radial_basis,
    kernel_offsets,
    pq_angular_terms,
    q_from_gtab,
    symmetric_q_sampling,
)
from esdmri.nn.tensor_field import MAX_ORDER, TensorFieldType
from esdmri.testing import (ROTATE_X_90, ROTATE_Z_90, assert_equivariant, equivariance_error,
                            rotate_tensor_field)

@pytest.fixture(autouse=True)
def float64_single_thread():
    # Exact equivariance checks need float64; the tensors are tiny, so one
    # thread avoids the threading overhead that dominates on a busy machine.
    previous_dtype, previous_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous_dtype)
    torch.set_num_threads(previous_threads)


def random_q(n, rng, zero=True):
    q = rng.normal(size=(n, 3))
    q *= rng.uniform(0.3, 1.0, size=(n, 1)) / np.linalg.norm(q, axis=1, keepdims=True)
    if zero:
        q[0] = 0.0
    return q


def rotated_copy(layer_class, layer, *args, **kwargs):
    """A layer built with other (rotated) q-samplings and the weights of ``layer``."""
    copy = layer_class(*args, **kwargs)
    copy.load_state_dict(layer.state_dict())
    return copy


def randomise_bias(layer):
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()


# --------------------------------------------------------------------------
# Field layout


def test_field_type_layout():
    field = TensorFieldType((4, 2, 1))
    assert field.dim == 4 + 6 + 5
    assert field.n_channels == 7
    assert field.slice(1) == slice(4, 10)
    assert field.slice(2) == slice(10, 15)
    assert field.irreps == o3.Irreps("4x0e+2x1o+1x2e")
    assert field.with_gates() == TensorFieldType((7, 2, 1))
    assert field.channel_of_row().tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 6, 6]
    assert TensorFieldType((3, 0, 0)) == TensorFieldType(3)


def test_wigner_d_matches_spherical_harmonics():
    # Independent check of the convention the equivariance tests rest on.
    rotation = o3.rand_matrix()
    vectors = torch.randn(20, 3)
    for l in range(MAX_ORDER + 1):
        field = TensorFieldType([0] * l + [1])
        y = o3.spherical_harmonics(l, vectors, normalize=True)
        y_rotated = o3.spherical_harmonics(l, vectors @ rotation.T, normalize=True)
        assert torch.allclose(y_rotated, y @ field.D_from_matrix(rotation).T, atol=1e-12)


@pytest.mark.parametrize("selection_rule", SELECTION_RULES)
def test_angular_terms_follow_selection_rules(selection_rule):
    for l_in in range(3):
        for l_out in range(3):
            expected = {
                (l_f, l_p, l_q)
                for l_f in range(7) for l_p in range(3) for l_q in range(5)
                if abs(l_out - l_in) <= l_f <= l_out + l_in and abs(l_p - l_q) <= l_f <= l_p + l_q
                and abs(l_f - l_p) <= 1
                and (selection_rule == "one_sided" or abs(l_f - l_q) <= 1)}
            terms = pq_angular_terms(l_in, l_out, max_order_p=2, max_order_q=4,
                                     selection_rule=selection_rule)
            assert len(terms) == len(set(terms))
            assert set(terms) == expected


# --------------------------------------------------------------------------
# pq-layer against the paper's formula


def gaussian(r, centre, width):
    return np.exp(-((r - centre) ** 2) / (2 * width**2))


@lru_cache(maxsize=None)
def _sh_cached(l, vector):
    vector = np.array(vector)
    if np.linalg.norm(vector) < 1e-12:
        return np.eye(2 * l + 1)[l] if l == 0 else np.zeros(2 * l + 1)
    return o3.spherical_harmonics(l, torch.from_numpy(vector)[None], normalize=True,
                                    normalization="component")[0].numpy()


def sh(l, vector):
    return _sh_cached(l, tuple(np.asarray(vector, dtype=float)))


def test_pq_layer_matches_formula_by_brute_force():
    rng = np.random.default_rng(1)
    in_field, out_field = TensorFieldType((1, 1)), TensorFieldType((2, 1))
    q_in = random_q(3, rng)
    q_out = np.concatenate([q_in[:1], random_q(1, rng, zero=False)])  # includes q_out = q_in = 0
    layer = PQConv(in_field, out_field, q_in, q_out, spatial_kernel_size=3, max_order_q=3)
    randomise_bias(layer)
    x = torch.randn(1, in_field.dim, 3, 3, 3, 3)
    result = layer(x)[0, :, :, 1, 1, 1].detach().numpy()

    centres_p, centres_q = [0.0, 1.0, 2.0], [0.0, 0.5, 1.0]
    expected = np.zeros((out_field.dim, 2))
    for qo_index, q_o in enumerate(q_out):
        for l_out in (0, 1):
            for c_out in range(out_field.multiplicity(l_out)):
                first = out_field.offset(l_out) + c_out * (2 * l_out + 1)
                rows_out = first + np.arange(2 * l_out + 1)
                total = np.zeros(2 * l_out + 1)
                for l_in in (0, 1):
                    weight = layer.weights[f"{l_out}_{l_in}"][c_out, 0].detach().numpy()
                    terms = pq_angular_terms(l_in, l_out, layer.max_order_p, layer.max_order_q)
                    for a, (l_f, l_p, l_q) in enumerate(terms):
                        cg_in = o3.wigner_3j(l_f, l_in, l_out).numpy()
                        cg_pq = o3.wigner_3j(l_p, l_q, l_f).numpy()
                        for p_in in np.ndindex(3, 3, 3):
                            dp = np.array([1, 1, 1]) - np.array(p_in)
                            for qi_index, q_i in enumerate(q_in):
                                angular = np.einsum("p,q,pqf->f", sh(l_p, dp),
                                                    sh(l_q, q_o - q_i), cg_pq)
                                radial = np.einsum(
                                    "kbc,k,b,c->", weight[a],
                                    [gaussian(np.linalg.norm(dp), c, 0.6) for c in centres_p],
                                    [gaussian(np.linalg.norm(q_o), c, 0.5) for c in centres_q],
                                    [gaussian(np.linalg.norm(q_i), c, 0.5) for c in centres_q])
                                feature = x[(0, in_field.slice(l_in), qi_index, *p_in)].numpy()
                                total += radial * np.einsum("f,i,fio->o", angular, feature,
                                                            cg_in) / len(q_in)
                if l_out == 0:
                    total += sum(layer.bias[c_out, k].item()
                                 * gaussian(np.linalg.norm(q_o), centres_q[k], 0.5)
                                 for k in range(3))
                expected[rows_out, qo_index] = total
    np.testing.assert_allclose(result, expected, atol=1e-12)


# --------------------------------------------------------------------------
# Equivariance


def test_pq_layer_q_rotation_equivariance_kernel_1():
    rng = np.random.default_rng(2)
    in_field, out_field = TensorFieldType((2, 2, 1)), TensorFieldType((1, 2, 2))
    q_in, q_out = random_q(9, rng), random_q(5, rng, zero=False)
    rotation = o3.rand_matrix().numpy()
    layer = PQConv(in_field, out_field, q_in, q_out, spatial_kernel_size=1)
    randomise_bias(layer)
    rotated = rotated_copy(PQConv, layer, in_field, out_field, q_in @ rotation.T,
                           q_out @ rotation.T, spatial_kernel_size=1)
    x = torch.randn(2, in_field.dim, 9, 3, 4, 2)
    out = layer(x)
    for l in (0, 1, 2):  # every output order is reached and non-trivial
        assert out[:, out_field.slice(l)].abs().max() > 1e-3
    assert_equivariant(layer, x, lambda f: rotate_tensor_field(f, in_field, rotation),
                       lambda f: rotate_tensor_field(f, out_field, rotation),
                       function_out=rotated, tol=1e-8, label="pq-layer, kernel 1")
    # The check can fail: the inverse rotation's D matrices do not match.
    assert equivariance_error(layer, x, lambda f: rotate_tensor_field(f, in_field, rotation),
                              lambda f: rotate_tensor_field(f, out_field, rotation.T),
                              function_out=rotated) > 1e-2


@pytest.mark.parametrize("rotation", [ROTATE_Z_90, ROTATE_X_90, ROTATE_Z_90 @ ROTATE_X_90])
def test_pq_layer_grid_and_q_rotation_equivariance_kernel_3(rotation):
    rng = np.random.default_rng(3)
    in_field, out_field = TensorFieldType((2, 1, 1)), TensorFieldType((1, 2, 1))
    q_in, q_out = random_q(7, rng), random_q(4, rng)
    layer = PQConv(in_field, out_field, q_in, q_out, spatial_kernel_size=3)
    assert_grid_and_q_equivariant(layer, in_field, out_field, q_in, q_out, rotation,
                                  (1, in_field.dim, 7, 6, 6, 6))


def assert_grid_and_q_equivariant(layer, in_field, out_field, q_in, q_out, rotation,
                                  x_shape, **options):
    """A 3^3 pq-layer commutes with rotating the grid and q-space together.

    Rotating q-space alone (not the grid) is not a symmetry of the layer, so
    that must change the output: the check can fail.
    """
    randomise_bias(layer)
    rotated = rotated_copy(PQConv, layer, in_field, out_field, q_in @ rotation.T,
                           q_out @ rotation.T, spatial_kernel_size=3, **options)
    x = torch.randn(*x_shape)
    assert layer(x).abs().max() > 1e-2
    assert_equivariant(layer, x, lambda f: rotate_tensor_field(f, in_field, rotation, grid=True),
                       lambda f: rotate_tensor_field(f, out_field, rotation, grid=True),
                       function_out=rotated, tol=1e-8, label="pq-layer, grid and q")
    assert equivariance_error(layer, x, lambda f: rotate_tensor_field(f, in_field, rotation),
                              lambda f: rotate_tensor_field(f, out_field, rotation),
                              function_out=rotated) > 1e-3


def test_pq_layer_kernel_5_equivariance():
    rng = np.random.default_rng(4)
    field = TensorFieldType((1, 1))
    q = random_q(4, rng)
    layer = PQConv(field, field, q, spatial_kernel_size=5, n_radial_q=2)
    rotated = rotated_copy(PQConv, layer, field, field, q @ ROTATE_X_90.T, spatial_kernel_size=5,
                           n_radial_q=2)
    x = torch.randn(1, field.dim, 4, 7, 7, 7)
    assert_equivariant(layer, x, lambda f: rotate_tensor_field(f, field, ROTATE_X_90, grid=True),
                       function_out=rotated, tol=1e-8, label="pq-layer, kernel 5")


def test_pq_layer_translation_equivariance():
    rng = np.random.default_rng(5)
    field = TensorFieldType((1, 1, 1))
    layer = PQConv(field, field, random_q(5, rng), spatial_kernel_size=3)
    x = torch.zeros(1, field.dim, 5, 10, 10, 10)
    x[..., 3:6, 3:6, 3:6] = torch.randn(1, field.dim, 5, 3, 3, 3)
    assert_equivariant(layer, x, lambda f: torch.roll(f, (2, -1, 1), dims=(3, 4, 5)),
                       tol=1e-12, label="pq-layer under translation")


def test_local_q_coupling_matches_dense_evaluation_and_is_equivariant():
    rng = np.random.default_rng(6)
    field = TensorFieldType((2, 1))
    q = random_q(12, rng)
    layer = PQConv(field, field, q, spatial_kernel_size=3, q_radius=0.8)
    x = torch.randn(1, field.dim, 12, 5, 5, 5)
    # Scatter the per-neighbour kernel into a dense one and run a plain conv3d.
    kernel = layer.kernel()  # (Q_out, out, in, n, taps)
    index = layer.q_index.view(12, layer.n_neighbours)
    dense = torch.zeros(12, field.dim, field.dim, 12, 27)
    for q_out in range(12):
        dense[q_out].index_add_(2, index[q_out], kernel[q_out])
    dense = dense.permute(1, 0, 2, 3, 4).reshape(field.dim * 12, field.dim * 12, 3, 3, 3)
    reference = F.conv3d(x.reshape(1, -1, 5, 5, 5), dense, padding=1).view(x.shape)
    out = layer(x)
    assert layer.n_neighbours < 12
    assert (out - reference).abs().max() < 1e-12
    rotated = rotated_copy(PQConv, layer, field, field, q @ ROTATE_Z_90.T, spatial_kernel_size=3,
                           q_radius=0.8)
    assert_equivariant(layer, x, lambda f: rotate_tensor_field(f, field, ROTATE_Z_90, grid=True),
                       function_out=rotated, tol=1e-8, label="pq-layer with q_radius")


def test_sphere_conv_on_healpix_vertices():
    from esdmri.sphere import HealpixSphere

    sphere = HealpixSphere(2, hemisphere=True)
    layer = PQSphereConv(2, 3, sphere.vertices, spatial_kernel_size=3, antipodal=True)
    x = torch.randn(1, 2, sphere.n_vertices, 4, 4, 4)
    out = layer(x)
    assert out.shape == (1, 3, sphere.n_vertices, 4, 4, 4)
    assert 1 < layer.n_neighbours < sphere.n_vertices
    rotation = o3.rand_matrix().numpy()
    rotated = PQSphereConv(2, 3, sphere.vertices @ rotation.T, spatial_kernel_size=1,
                           antipodal=True, q_radius=layer.q_radius)
    base = PQSphereConv(2, 3, sphere.vertices, spatial_kernel_size=1, antipodal=True,
                        q_radius=layer.q_radius)
    rotated.load_state_dict(base.state_dict())
    assert (rotated(x) - base(x)).abs().max() < 1e-8


@pytest.mark.parametrize("rotation", [ROTATE_Z_90, ROTATE_X_90])
def test_p_conv_equivariance(rotation):
    in_field, out_field = TensorFieldType((2, 1, 1)), TensorFieldType((1, 1, 2))
    layer = PConv(in_field, out_field, spatial_kernel_size=3)
    randomise_bias(layer)
    x = torch.randn(2, in_field.dim, 6, 6, 6)
    assert layer(x).abs().max() > 1e-2
    assert_equivariant(layer, x, lambda f: rotate_tensor_field(f, in_field, rotation, grid=True),
                       lambda f: rotate_tensor_field(f, out_field, rotation, grid=True),
                       tol=1e-8, label="p-conv")


def test_q_reduction_is_invariant_to_q_rotation_and_order():
    rng = np.random.default_rng(7)
    field = TensorFieldType((2, 1, 1))
    q = random_q(6, rng)
    reduction = QReduction(field, q)
    with torch.no_grad():
        reduction.weight.normal_()
    x = torch.randn(2, field.dim, 6, 3, 3, 3)
    out = reduction(x)
    # Plain mean at initialisation of a fresh layer.
    assert torch.allclose(QReduction(field, q)(x), x.mean(dim=2), atol=1e-12)
    rotation = o3.rand_matrix().numpy()
    rotated = QReduction(field, q @ rotation.T)
    rotated.load_state_dict(reduction.state_dict())
    assert_equivariant(reduction, x, lambda f: rotate_tensor_field(f, field, rotation),
                       function_out=rotated, tol=1e-12, label="q-reduction")
    out_rotated = rotated(rotate_tensor_field(x, field, rotation))
    assert (out_rotated[:, :2] - out[:, :2]).abs().max() < 1e-12  # scalars invariant
    order = rng.permutation(6)
    permuted = QReduction(field, q[order])
    permuted.load_state_dict(reduction.state_dict())
    assert (permuted(x[:, :, order]) - out).abs().max() < 1e-12


# --------------------------------------------------------------------------
# The published implementation's choices (philip-mueller/equivariant-deep-dmri)

# Each option alone, then all of them together (the published layer).
LAYER_OPTIONS = [
    {},
    dict(selection_rule="two_sided"),
    dict(normalize_q_offsets=True),
    dict(zero_offsets="linear"),
    dict(p_radial="cosine"),
    dict(p_radial="learned", radial_units=5, radial_layers=2),
    dict(selection_rule="two_sided", normalize_q_offsets=True, zero_offsets="linear",
         p_radial="learned", radial_units=5, radial_layers=2),
]


def shell_q(rng):
    """b0 twice, two shells, one direction on both shells: every kind of zero q offset."""
    directions = rng.normal(size=(5, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return np.concatenate([np.zeros((2, 3)), 0.6 * directions[:3], directions[2:]])


def test_published_selection_rule_pairs():
    # The published selection_rule_out examples: l_out = 0 -> (l_q, l_p) in {(0, 0), (1, 1)},
    # l_out = 1 -> {(0, 1), (1, 2), (1, 0), (2, 1), (1, 1), (2, 2)}.
    pairs = {l_f: {(l_q, l_p) for f, l_p, l_q in pq_angular_terms(0, l_f, 9, 9, "two_sided")
                   if f == l_f} for l_f in (0, 1)}
    assert pairs[0] == {(0, 0), (1, 1)}
    assert pairs[1] == {(0, 1), (1, 2), (1, 0), (2, 1), (1, 1), (2, 2)}
    # The paper's rule also admits |l_f - l_q| = 2 (e.g. l_f = 1, l_p = 2, l_q = 3).
    assert len(pq_angular_terms(1, 1, 3, 4, "one_sided")) > len(
        pq_angular_terms(1, 1, 3, 4, "two_sided"))


def test_cosine_radial_basis_values():
    r = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.2])
    phi = cosine_radial_basis(r, 3)  # centres 0, 0.5, 1 with spacing 0.5
    np.testing.assert_allclose(phi[0], [1, 0.5, 0, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(phi[1], [0, 0.5, 1, 0.5, 0, 0], atol=1e-12)
    np.testing.assert_allclose(phi[2], [0, 0, 0, 0.5, 1, np.cos(0.2 * np.pi) ** 2], atol=1e-12)
    profile = RadialProfile(5, "learned", units=3, layers=2)
    lengths = np.unique(np.round(np.linalg.norm(kernel_offsets(5), axis=1), 9))
    assert profile.samples.shape == (len(lengths), 125)
    assert profile.profile().shape == (len(lengths), 3)
    np.testing.assert_array_equal(profile.samples.sum(0).numpy(), np.ones(125))


@pytest.mark.parametrize("selection_rule", SELECTION_RULES)
@pytest.mark.parametrize("keep_zero", [True, False])
def test_kernel_basis_equivariant_to_random_rotations_of_voxel_offsets(selection_rule,
                                                                       keep_zero):
    # The p part of the kernel as a function of continuous offsets: rotating the
    # offsets by a random rotation R rotates the basis by D_out(R) . D_in(R)^T . D_q(R)^T.
    rng = np.random.default_rng(11)
    offsets = np.concatenate([np.zeros((1, 3)), rng.normal(size=(8, 3))])
    rotation = o3.rand_matrix(dtype=torch.float64)
    samples = rng.uniform(size=(2, len(offsets)))  # any radial samples: lengths are kept
    errors = []
    for l_in, l_out in ((0, 0), (0, 1), (1, 1), (2, 1), (1, 2)):
        terms = pq_angular_terms(l_in, l_out, 3, 3, selection_rule)
        for l_q in sorted({term[2] for term in terms}):
            group = [term for term in terms if term[2] == l_q]
            basis = _pq_path_basis(l_in, l_out, group, samples, offsets, keep_zero)
            moved = _pq_path_basis(l_in, l_out, group, samples, offsets @ rotation.numpy().T,
                                   keep_zero)
            d_out, d_in, d_q = (o3.Irrep(l, 1).D_from_matrix(rotation).numpy()
                                for l in (l_out, l_in, l_q))
            expected = np.einsum("oO,akOIQd,iI,qQ->akoiqd", d_out, basis, d_in, d_q)
            assert np.abs(basis).max() > 1e-3
            errors.append(np.abs(moved - expected).max())
    assert max(errors) < 1e-12
    if not keep_zero:  # the centre has no angular term at all
        assert np.abs(basis[..., 0]).max() == 0


@pytest.mark.parametrize("options", LAYER_OPTIONS)
def test_layer_options_equivariant_to_random_q_rotations(options):
    rng = np.random.default_rng(12)
    in_field, out_field = TensorFieldType((2, 1, 1)), TensorFieldType((1, 2, 1))
    q_in, q_out = shell_q(rng), shell_q(rng)[1:]
    rotation = o3.rand_matrix().numpy()
    layer = PQConv(in_field, out_field, q_in, q_out, spatial_kernel_size=1, **options)
    randomise_bias(layer)
    rotated = rotated_copy(PQConv, layer, in_field, out_field, q_in @ rotation.T,
                           q_out @ rotation.T, spatial_kernel_size=1, **options)
    x = torch.randn(2, in_field.dim, len(q_in), 3, 2, 2)
    assert layer(x).abs().max() > 1e-2
    assert_equivariant(layer, x, lambda f: rotate_tensor_field(f, in_field, rotation),
                       lambda f: rotate_tensor_field(f, out_field, rotation),
                       function_out=rotated, tol=1e-8, label=f"pq-layer with {options}")


@pytest.mark.parametrize("options", LAYER_OPTIONS)
@pytest.mark.parametrize("rotation", [ROTATE_Z_90, ROTATE_X_90 @ ROTATE_Z_90])
def test_layer_options_equivariant_to_grid_and_q_rotations(options, rotation):
    rng = np.random.default_rng(13)
    in_field, out_field = TensorFieldType((2, 1, 1)), TensorFieldType((1, 2, 1))
    q_in, q_out = shell_q(rng), shell_q(rng)
    layer = PQConv(in_field, out_field, q_in, q_out, spatial_kernel_size=3, **options)
    assert_grid_and_q_equivariant(layer, in_field, out_field, q_in, q_out, rotation,
                                  (1, in_field.dim, len(q_in), 5, 5, 5), **options)


def test_options_change_the_layer():
    # Each option is a different function of the input (same weights where shared).
    rng = np.random.default_rng(14)
    q = shell_q(rng)
    x = torch.randn(1, 1, len(q), 4, 4, 4)
    base = PQConv(1, (2, 1), q, spatial_kernel_size=3, zero_offsets="linear")
    outputs = {}
    for key, value in (("normalize_q_offsets", True), ("normalize_q_offsets", False)):
        layer = PQConv(1, (2, 1), q, spatial_kernel_size=3, zero_offsets="linear", **{key: value})
        layer.load_state_dict(base.state_dict())
        outputs[key, value] = layer(x)
    assert (outputs["normalize_q_offsets", True]
            - outputs["normalize_q_offsets", False]).abs().max() > 1e-3
    # The linear map alone: zeroing it leaves the q-independent centre without input.
    with torch.no_grad():
        base.linear["0"].zero_()
        for weight in base.weights.values():
            weight.zero_()
    assert base.kernel().abs().max() == 0


@pytest.mark.parametrize("options", LAYER_OPTIONS[:1] + LAYER_OPTIONS[4:6])
def test_p_conv_radial_options_equivariance(options):
    field = TensorFieldType((1, 1, 1))
    layer = PConv(field, field, spatial_kernel_size=5, **options)
    randomise_bias(layer)
    x = torch.randn(1, field.dim, 7, 7, 7)
    out = layer(x)
    for rotation in (ROTATE_Z_90, ROTATE_X_90):
        assert_equivariant(layer, x, lambda f: rotate_tensor_field(f, field, rotation, grid=True),
                           tol=1e-8, label=f"p-conv with {options}")
    out.sum().backward()
    if options.get("p_radial") == "learned":  # the radial network learns
        assert all(weight.grad.abs().max() > 0 for weight in layer.p_radial.network)


# --------------------------------------------------------------------------
# Nonlinearity and normalisation


def test_gated_nonlinearity_values_and_equivariance():
    field = TensorFieldType((2, 1, 1))
    gate = GatedNonlinearity(field)
    in_field = field.with_gates()
    x = torch.randn(3, in_field.dim, 4, 2, 2)
    out = gate(x)
    assert out.shape == (3, field.dim, 4, 2, 2)
    assert torch.allclose(out[:, :2], x[:, :2] * torch.sigmoid(x[:, :2]))
    assert torch.allclose(out[:, 2:5], torch.sigmoid(x[:, 2:3]) * x[:, 4:7])
    assert torch.allclose(out[:, 5:10], torch.sigmoid(x[:, 3:4]) * x[:, 7:12])
    rotation = o3.rand_matrix().numpy()
    assert_equivariant(gate, x, lambda f: rotate_tensor_field(f, in_field, rotation),
                       lambda f: rotate_tensor_field(f, field, rotation), tol=1e-12,
                       label="gated nonlinearity")


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_statistics_and_equivariance(training):
    field = TensorFieldType((2, 1, 1))
    norm = EquivariantBatchNorm(field)
    x = 3 * torch.randn(4, field.dim, 5, 3, 3, 3) + 1
    norm(x)  # one step of running statistics
    norm.train(training)
    out = norm(x)
    if training:
        scalars = out[:, :2].transpose(0, 1).reshape(2, -1)
        assert torch.allclose(scalars.mean(1), torch.zeros(2), atol=1e-10)
        assert torch.allclose(scalars.var(1, unbiased=False), torch.ones(2), atol=1e-4)
        vectors = out[:, 2:5].pow(2).mean()
        assert torch.isclose(vectors, torch.tensor(1.0), atol=1e-4)
    rotation = o3.rand_matrix().numpy()
    assert_equivariant(norm, x, lambda f: rotate_tensor_field(f, field, rotation), tol=1e-10,
                       label=f"batch norm (training={training})")


# --------------------------------------------------------------------------
# q-samplings


def test_q_from_gtab():
    bvals = np.array([0, 1000, 2000, 3000])
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])
    q = q_from_gtab(gradient_table(bvals=bvals, bvecs=bvecs))
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), np.sqrt(bvals / 3000))
    np.testing.assert_allclose(q[3], [0, 0, 1])


@pytest.mark.parametrize("n_directions", [6, 14, 26])
def test_symmetric_q_sampling_is_closed_under_grid_rotations(n_directions):
    q = symmetric_q_sampling(n_directions)
    assert q.shape == (n_directions + 1, 3)
    for rotation in (ROTATE_Z_90, ROTATE_X_90):
        rotated = q @ rotation.T
        distances = np.linalg.norm(rotated[:, None] - q[None], axis=-1)
        assert np.all(distances.min(axis=1) < 1e-12)


# --------------------------------------------------------------------------
# Bad input


def test_bad_input_errors():
    rng = np.random.default_rng(8)
    q = random_q(4, rng)
    layer = PQConv((1, 1), (1,), q, spatial_kernel_size=3)
    with pytest.raises(ValueError, match="rows on axis 1"):
        layer(torch.randn(1, 3, 4, 3, 3, 3))  # multiplicities (1, 1) need 4 rows
    with pytest.raises(ValueError, match="q-samples"):
        layer(torch.randn(1, 4, 5, 3, 3, 3))
    with pytest.raises(ValueError, match="input must have shape"):
        layer(torch.randn(1, 4, 4, 3, 3))
    with pytest.raises(ValueError, match="spatial_kernel_size"):
        PQConv(1, 1, q, spatial_kernel_size=4)
    with pytest.raises(ValueError, match="spatial_kernel_size"):
        PConv(1, 1, spatial_kernel_size=2)
    with pytest.raises(ValueError, match="supported orders"):
        TensorFieldType([1] + [0] * MAX_ORDER + [1])
    with pytest.raises(ValueError, match=r"multiplicities\[1\] must be >= 0"):
        TensorFieldType((1, -1))
    with pytest.raises(TypeError, match="must be an int"):
        TensorFieldType((1, 1.5))
    with pytest.raises(ValueError, match="in_field"):
        PQConv((1, -2), 1, q)
    with pytest.raises(ValueError, match="unit vectors"):
        PQSphereConv(1, 1, 2 * symmetric_q_sampling(6, origin=False))
    with pytest.raises(ValueError, match=r"q_in must have shape \(Q, 3\)"):
        PQConv(1, 1, q[:, :2])
    with pytest.raises(ValueError, match="no kernel reaches"):
        PQConv(1, (0, 0, 1), q, spatial_kernel_size=1)  # l = 0 -> 2 needs a p offset
    with pytest.raises(ValueError, match="q-samples"):
        QReduction(1, q)(torch.randn(1, 1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="rows on axis 1"):
        GatedNonlinearity((1, 1))(torch.randn(1, 4, 2, 2, 2))  # needs 1 + 1 gate + 3 rows
