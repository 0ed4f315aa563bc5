"""The refinement's sampling hemisphere at other HEALPix resolutions (issue 28)."""

import numpy as np
import pytest
import torch
from dipy.reconst.shm import real_sh_descoteaux_from_index, sph_harm_ind_list
from test_refine import (COUPLED, ORDER, equivariance_errors, field, phantom,  # noqa: F401
                         refine_field)

from esdmri.reconst.config import RefinementConfig
from esdmri.reconst.losses import LossWeights
from esdmri.reconst.network import SAMPLING_NSIDE, build_fodf_sampler, sampling_vertices
from esdmri.shm import sh_matrix
from esdmri.sphere import HealpixSphere


def ring_pixel_centres(nside):
    """Every HEALPix pixel centre from the ring formulas (Gorski et al. 2005, eqs. 4-9)."""
    points = []
    for ring in range(1, 4 * nside):
        north = min(ring, 4 * nside - ring)  # rings counted from the nearer pole
        if north < nside:  # polar caps: 4 i pixels on ring i
            z = 1 - north**2 / (3 * nside**2)
            longitudes = np.pi / (2 * north) * (np.arange(1, 4 * north + 1) - 0.5)
        else:  # equatorial belt: 4 nside pixels a ring, every other ring shifted
            z = 4 / 3 - 2 * north / (3 * nside)
            shift = (north - nside + 1) % 2
            longitudes = np.pi / (2 * nside) * (np.arange(1, 4 * nside + 1) - shift / 2)
        z = z if ring <= 2 * nside else -z
        radius = np.sqrt(1 - z**2)
        points.append(np.stack([radius * np.cos(longitudes), radius * np.sin(longitudes),
                                np.full_like(longitudes, z)], axis=-1))
    return np.concatenate(points)


@pytest.mark.parametrize("nside", [3, 5, 6, 7])
def test_sampling_hemisphere_is_one_pixel_centre_per_antipodal_pair(nside):
    """Against the pixel centres of HEALPix's own ring formulas: every full-sphere centre
    or its antipode is a sampling direction, and each direction covers two centres."""
    vertices = sampling_vertices(nside)
    full = ring_pixel_centres(nside)
    assert len(full) == 12 * nside**2
    assert vertices.shape == (6 * nside**2, 3)
    # Nearest sampling direction of each centre, up to sign (an fODF is even).
    closeness = np.abs(full @ vertices.T)
    nearest = closeness.argmax(axis=1)
    np.testing.assert_allclose(closeness.max(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(np.bincount(nearest, minlength=len(vertices)), 2)


@pytest.mark.parametrize("nside", [5, 6])
def test_sampling_hemisphere_maps_onto_itself_under_the_grid_turns(nside):
    """A quarter turn about z, and a mirror of any axis, permute the directions up to sign:
    the symmetries the refinement's exact equivariance tests rely on."""
    vertices = sampling_vertices(nside)
    for transform in (np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]), np.diag([-1, 1, 1]),
                      np.diag([1, -1, 1]), np.diag([1, 1, -1])):
        closeness = np.abs((vertices @ transform.T) @ vertices.T)
        np.testing.assert_allclose(closeness.max(axis=1), 1.0, atol=1e-12)
        assert len(set(closeness.argmax(axis=1))) == len(vertices)


def test_default_sampler_is_the_network_grid_to_the_bit():
    """The default (8) is the training loss's sampler, the NESTED nside-8 hemisphere."""
    assert RefinementConfig().refine_sampling_nside == SAMPLING_NSIDE == 8
    expected = sh_matrix(12, HealpixSphere(8, hemisphere=True).vertices).astype(np.float32)
    assert torch.equal(build_fodf_sampler(12), torch.as_tensor(expected))
    assert torch.equal(build_fodf_sampler(12, nside=8), build_fodf_sampler(12))


def test_sampler_at_nside_6_is_dipy_sh_basis():
    """The order-12 sampler on 216 directions against DIPY's descoteaux07 (non-legacy)
    basis evaluated by hand at the directions' angles."""
    vertices = sampling_vertices(6)
    m_values, l_values = sph_harm_ind_list(12)
    polar = np.arccos(np.clip(vertices[:, 2], -1, 1))
    azimuth = np.arctan2(vertices[:, 1], vertices[:, 0])
    expected = real_sh_descoteaux_from_index(m_values, l_values, polar[:, None],
                                             azimuth[:, None], legacy=False)
    sampler = build_fodf_sampler(12, nside=6)
    assert sampler.shape == (216, 91)
    np.testing.assert_allclose(sampler.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "6"])
def test_bad_sampling_nside_is_refused_naming_the_option(bad):
    with pytest.raises(ValueError, match="refine_sampling_nside"):
        RefinementConfig(refine_sampling_nside=bad)


def test_too_few_directions_for_the_order_are_refused():
    """nside 3 gives 54 directions, fewer than the 91 coefficients of order 12."""
    with pytest.raises(ValueError, match="refine_sampling_nside"):
        build_fodf_sampler(12, nside=3)
    assert build_fodf_sampler(8, nside=3).shape == (54, 45)


def test_refinement_on_nside_6_is_quarter_turn_equivariant(phantom, field):  # noqa: F811
    """With the sparsity and non-negativity terms on the 216 directions of nside 6, which a
    quarter turn about z permutes, the coupled refinement commutes with that grid turn to
    round-off (float64), as on the default's 384 (test_refine's bound, 1e-10); a random
    rotation stays approximate, by about as much as on the default's grid."""
    weights = LossWeights()
    options = dict(COUPLED, dtype=torch.float64)
    default = equivariance_errors(phantom, field, weights, options)
    fewer = equivariance_errors(phantom, field, weights, dict(options, nside=6))
    print(f"nside 8: {default}, nside 6: {fewer}")
    assert fewer["quarter"] < 1e-10
    assert fewer["random"] < 3 * default["random"] + 1e-3


def test_fewer_directions_change_the_refinement(phantom, field):  # noqa: F811
    """The option reaches the objective: nside 6 refines to other coefficients than 8."""
    signal, mask, start = field
    default, _ = refine_field(phantom, phantom.gtab, signal, mask, start, LossWeights())
    fewer, _ = refine_field(phantom, phantom.gtab, signal, mask, start, LossWeights(), nside=6)
    assert np.abs(fewer - default).max() > 1e-6
