"""Tiling, losses and input checks of the deconvolution models."""

import numpy as np
import pytest
import torch
from torch import nn

from esdmri.reconst.inputs import check_data, check_mask, normalize_by_b0, resolve_device
from esdmri.reconst.losses import (CAUCHY_SIGMA, LossWeights, intensity_loss,
                                   nonnegativity_loss, sparsity_loss, total_variation_loss)
from esdmri.reconst.tiling import (cut_window, inference_windows, receptive_radius,
                                   training_windows, window_fill)


class SpatialStack(nn.Module):
    """[B, C, V, X, Y, Z] -> same, through n 3D convolutions of a given kernel."""

    def __init__(self, n_convs, kernel_size):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv3d(2, 2, kernel_size, padding=kernel_size // 2) for _ in range(n_convs))

    def forward(self, x):
        batch, channels, vertices = x.shape[:3]
        x = x.permute(0, 2, 1, 3, 4, 5).reshape(batch * vertices, channels, *x.shape[3:])
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x.reshape(batch, vertices, channels, *x.shape[2:]).permute(0, 2, 1, 3, 4, 5)


@pytest.mark.parametrize("n_convs,kernel_size,expected", [(0, 3, 0), (2, 3, 2), (3, 5, 6)])
def test_receptive_radius_of_conv_stacks(n_convs, kernel_size, expected):
    torch.manual_seed(0)
    network = SpatialStack(n_convs, kernel_size) if n_convs else SpatialStack(1, 1)
    assert receptive_radius(network, 2, 3, limit=8) == expected


def test_receptive_radius_refuses_networks_reaching_the_limit():
    with pytest.raises(ValueError, match="probe limit"):
        receptive_radius(SpatialStack(3, 3), 2, 1, limit=3)


def test_cut_window_matches_padded_slicing():
    rng = np.random.default_rng(0)
    volume = rng.random((7, 5, 6, 2))
    padded = np.pad(volume, [(4, 4)] * 3 + [(0, 0)])
    for start in [(-3, -2, 0), (0, 0, 0), (4, 2, 3), (6, -1, 5)]:
        expected = padded[start[0] + 4:start[0] + 8, start[1] + 4:start[1] + 8,
                          start[2] + 4:start[2] + 8]
        np.testing.assert_array_equal(cut_window(volume, start, 4), expected)


def test_inference_windows_cover_every_masked_voxel_once():
    rng = np.random.default_rng(1)
    mask = rng.random((13, 9, 11)) > 0.7
    starts, pad_width = inference_windows(mask.shape, mask, core=4, halo=2)
    covered = np.zeros(mask.shape, int)
    for x, y, z in starts:
        covered[x:x + 4, y:y + 4, z:z + 4] += 1
    assert covered.max() == 1 and (covered[mask] == 1).all()
    padded_shape = [n + before + after for n, (before, after) in zip(mask.shape, pad_width)]
    assert all(before == 2 for before, _ in pad_width)
    for start in starts:  # every window lies inside the padded volume
        assert all(s + 4 + 4 <= n for s, n in zip(start, padded_shape))


def test_training_windows_cover_every_masked_voxel_from_a_masked_centre():
    rng = np.random.default_rng(5)
    # A ball: the old bounding-box tiling left many windows mostly empty.
    grid = np.indices((20, 20, 20)) - 9.5
    mask = (grid**2).sum(0) < 8.5**2
    mask &= rng.random(mask.shape) > 0.1  # holes, as in a real mask
    size, margin = 8, 2
    for seed in range(3):
        starts = training_windows(mask, size, np.random.default_rng(seed))
        centres = starts + size // 2
        assert mask[tuple(centres.T)].all()
        covered = np.zeros(mask.shape, int)
        for start in starts:
            low = np.maximum(start + margin, 0)
            high = start + size - margin
            covered[low[0]:high[0], low[1]:high[1], low[2]:high[2]] += 1
        assert (covered[mask] >= 1).all()
        fill = window_fill(mask, starts, size)
        assert fill.min() > 0.1 and np.median(fill) > 0.4
    # Brute force: every window's inner part holds a voxel no earlier window covered,
    # so no window is redundant.
    seen = np.zeros(mask.shape, bool)
    for start in starts:
        low = np.maximum(start + margin, 0)
        high = start + size - margin
        inner = np.zeros(mask.shape, bool)
        inner[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
        assert (inner & mask & ~seen).any()
        seen |= inner


def test_losses_against_direct_formulas():
    rng = np.random.default_rng(2)
    predicted, measured = rng.random((2, 1, 5, 3, 3, 3))
    mask = rng.random((1, 3, 3, 3)) > 0.4
    samples = rng.normal(size=(1, 7, 3, 3, 3))
    as_tensor = torch.as_tensor
    expected = ((predicted - measured) ** 2).transpose(0, 2, 3, 4, 1)[mask].mean()
    assert float(intensity_loss(as_tensor(predicted), as_tensor(measured), as_tensor(mask))) \
        == pytest.approx(expected)
    cauchy = 2 * np.log(1 + samples**2 / (2 * CAUCHY_SIGMA))
    assert float(sparsity_loss(as_tensor(samples), as_tensor(mask))) == pytest.approx(
        cauchy.transpose(0, 2, 3, 4, 1)[mask].mean())
    negative = np.minimum(samples, 0) ** 2
    assert float(nonnegativity_loss(as_tensor(samples), as_tensor(mask))) == pytest.approx(
        negative.transpose(0, 2, 3, 4, 1)[mask].mean())


def test_total_variation_against_brute_force():
    # Two windows: pairs are face neighbours within a window, never across.
    rng = np.random.default_rng(3)
    coefficients = rng.normal(size=(2, 4, 3, 4, 2))
    mask = rng.random((2, 3, 4, 2)) > 0.3
    norms = []
    for b, x, y, z in np.ndindex(2, 3, 4, 2):
        for dx, dy, dz in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
            nx, ny, nz = x + dx, y + dy, z + dz
            if nx < 3 and ny < 4 and nz < 2 and mask[b, x, y, z] and mask[b, nx, ny, nz]:
                norms.append(np.linalg.norm(coefficients[b, :, nx, ny, nz]
                                            - coefficients[b, :, x, y, z]))
    value = total_variation_loss(torch.as_tensor(coefficients), None, torch.as_tensor(mask))
    assert float(value) == pytest.approx(np.mean(norms), rel=1e-6)


def test_normalized_fodf_total_variation_against_brute_force():
    # Elaldi et al. 2024's form: for every masked voxel and each of its six face
    # neighbours inside the mask, the mean over vertices of the squared difference
    # of the two L2-normalised fODF sample vectors; averaged, each pair is met twice.
    rng = np.random.default_rng(4)
    samples = rng.normal(size=(2, 7, 3, 4, 2))
    mask = rng.random((2, 3, 4, 2)) > 0.3
    terms = []
    for b, x, y, z in np.ndindex(2, 3, 4, 2):
        for dx, dy, dz in [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1),
                           (0, 0, -1)]:
            nx, ny, nz = x + dx, y + dy, z + dz
            if (0 <= nx < 3 and 0 <= ny < 4 and 0 <= nz < 2 and mask[b, x, y, z]
                    and mask[b, nx, ny, nz]):
                u = samples[b, :, x, y, z] / np.linalg.norm(samples[b, :, x, y, z])
                w = samples[b, :, nx, ny, nz] / np.linalg.norm(samples[b, :, nx, ny, nz])
                terms.append(np.mean((u - w) ** 2))
    value = total_variation_loss(None, torch.as_tensor(samples), torch.as_tensor(mask),
                                 form="normalized_fodf")
    assert float(value) == pytest.approx(np.mean(terms), rel=1e-6)
    # Scaling one voxel's fODF changes nothing: the term compares shapes.
    scaled = samples.copy()
    scaled[0, :, 1, 1, 1] *= 5
    again = total_variation_loss(None, torch.as_tensor(scaled), torch.as_tensor(mask),
                                 form="normalized_fodf")
    assert float(again) == pytest.approx(float(value), rel=1e-6)


def test_loss_weights_reject_negative_values():
    with pytest.raises(ValueError, match="sparsity must be >= 0"):
        LossWeights(sparsity=-1)


class _Gtab:
    def __init__(self, bvals):
        self.bvals = np.asarray(bvals, float)
        self.b0s_mask = self.bvals <= 50


def test_input_checks_name_the_argument():
    gtab = _Gtab([0, 1000, 1000])
    with pytest.raises(ValueError, match="data has 2 volumes but gtab has 3"):
        check_data(np.ones((2, 2, 2, 2)), gtab)
    with pytest.raises(ValueError, match="NaN or inf"):
        check_data(np.full((2, 2, 2, 3), np.nan), gtab)
    with pytest.raises(ValueError, match="no b0"):
        check_data(np.ones((2, 2, 2, 2)), _Gtab([1000, 1000]))
    with pytest.raises(ValueError, match="4D array"):
        check_data(np.ones((2, 2, 3)), gtab)
    with pytest.raises(TypeError, match="GradientTable"):
        check_data(np.ones((2, 2, 2, 3)), object())
    with pytest.raises(ValueError, match="mask has shape"):
        check_mask(np.ones((2, 2)), (2, 2, 2))
    with pytest.raises(ValueError, match="mask is empty"):
        check_mask(np.zeros((2, 2, 2)), (2, 2, 2))
    with pytest.raises(ValueError, match="CUDA is not available"):
        if torch.cuda.is_available():
            raise ValueError("CUDA is not available (skipped: this machine has CUDA)")
        resolve_device("cuda")


def test_normalize_by_b0_divides_by_mean_b0_and_drops_empty_voxels():
    gtab = _Gtab([0, 0, 1000])
    data = np.zeros((2, 1, 1, 3))
    data[0, 0, 0] = [90, 110, 40]
    normalized, mask = normalize_by_b0(data, gtab, np.ones((2, 1, 1), bool))
    np.testing.assert_allclose(normalized[0, 0, 0], [0.9, 1.1, 0.4], rtol=1e-6)
    assert mask.tolist() == [[[True]], [[False]]]


def _grid_signal_of(coefficients, response, shell_bvals, vertices, sh_order_max):
    """Noise-free grid signal (S, V) of tissue coefficients, straight from the forward model."""
    from dipy.core.gradients import gradient_table

    from esdmri.reconst.network import stacked_forward_matrix
    n_shells, n_vertices = len(shell_bvals), len(vertices)
    gtab = gradient_table(np.repeat(shell_bvals, n_vertices),
                          bvecs=np.tile(vertices, (n_shells, 1)))
    forward = stacked_forward_matrix(response, gtab, sh_order_max)
    return (coefficients @ forward).reshape(n_shells, n_vertices)


def test_linear_prior_inverts_the_forward_model():
    from esdmri.reconst.network import linear_deconvolution_operator
    from esdmri.response import TissueResponse
    from esdmri.shm import n_coeffs
    from esdmri.sphere import HealpixSphere

    shell_bvals = np.array([0.0, 1000.0, 2000.0, 3000.0])
    response = TissueResponse.from_tensors(shell_bvals, sh_order_max=8).normalized()
    vertices = HealpixSphere(4, hemisphere=True).vertices
    rng = np.random.default_rng(0)
    # Coefficients of degree <= 4 are well conditioned in the responses of these shells.
    truth = np.zeros(n_coeffs(8) + 2)
    truth[:n_coeffs(4)] = rng.normal(size=n_coeffs(4)) * 0.1
    truth[0], truth[-2:] = 0.15, (0.2, 0.1)
    grid = _grid_signal_of(truth, response, shell_bvals, vertices, 8)
    operator = linear_deconvolution_operator(response, shell_bvals, vertices, 8,
                                             regularization=1e-9)
    recovered = np.einsum("csv,sv->c", operator, grid)
    np.testing.assert_allclose(recovered, truth, atol=1e-4)


def test_untrained_network_with_prior_outputs_the_normalised_linear_fit():
    from esdmri.reconst.network import (DeconvolutionNetwork, build_unet,
                                        linear_deconvolution_operator)
    from esdmri.response import TissueResponse
    from esdmri.shm import n_coeffs
    from esdmri.sphere import HealpixSphere

    shell_bvals = np.array([0.0, 1000.0, 3000.0])
    response = TissueResponse.from_tensors(shell_bvals, sh_order_max=8).normalized()
    sphere = HealpixSphere(2, hemisphere=True)
    prior = linear_deconvolution_operator(response, shell_bvals, sphere.vertices, 4)
    torch.manual_seed(0)
    unet = build_unet("e3so3-stem", sphere, 3, 3, depth=1, filter_start=2, kernel_size=3,
                      spatial_kernel_size=3, spatial_layers=1, signed_output=True)
    network = DeconvolutionNetwork(unet, sphere, 4, prior=prior).eval()
    grid = torch.rand(1, 3, sphere.n_vertices, 2, 2, 2)
    network.zero_correction()
    linear = np.einsum("csv,bsvxyz->bcxyz", prior, grid.numpy().astype(np.float64))
    linear[:, n_coeffs(4):] = np.maximum(linear[:, n_coeffs(4):], 0)
    fractions = np.sqrt(4 * np.pi) * (linear[:, :1] + linear[:, n_coeffs(4):].sum(1, keepdims=True))
    with torch.no_grad():
        output = network(grid).numpy()
    np.testing.assert_allclose(output, linear / fractions, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="prior"):
        DeconvolutionNetwork(unet, sphere, 4).zero_correction()


def test_normalisation_never_divides_by_a_vanishing_fraction_sum():
    """A correction that cancels the prior's fractions must not blow the output up."""
    from esdmri.reconst.network import (DeconvolutionNetwork, build_unet,
                                        linear_deconvolution_operator,
                                        volume_fractions_from_coefficients)
    from esdmri.response import TissueResponse
    from esdmri.sphere import HealpixSphere

    shell_bvals = np.array([0.0, 1000.0, 3000.0])
    response = TissueResponse.from_tensors(shell_bvals, sh_order_max=8).normalized()
    sphere = HealpixSphere(2, hemisphere=True)
    prior = linear_deconvolution_operator(response, shell_bvals, sphere.vertices, 4)
    unet = build_unet("spherical", sphere, 3, 3, depth=1, filter_start=2, kernel_size=3,
                      spatial_kernel_size=3, spatial_layers=1, signed_output=True)
    raw_network = DeconvolutionNetwork(unet, sphere, 4, normalize=False, prior=prior).eval()
    network = DeconvolutionNetwork(unet, sphere, 4, prior=prior).eval()
    grid = torch.rand(1, 3, sphere.n_vertices, 2, 2, 2)
    network.zero_correction()
    head = unet.head
    def fraction_sums(coefficients):
        return volume_fractions_from_coefficients(coefficients.movedim(1, -1), 15).sum(-1)

    with torch.no_grad():
        # A constant WM function that cancels the largest fraction sum of the
        # prior and takes it a little below zero.
        head.bias[0] = -float(fraction_sums(raw_network(grid)).max()) / (4 * np.pi) * 1.01
        raw, normalised = raw_network(grid), network(grid)
    assert (fraction_sums(raw) < 0).any()
    assert torch.isfinite(normalised).all()
    # At most a tenfold scaling (the floor 0.1); a floor of 1e-6 scaled by 1e6.
    assert normalised.abs().max() <= 10 * raw.abs().max() * (1 + 1e-6)


def _rician_magnitudes(signal, sigma, size, rng):
    """Magnitudes of ``signal`` with Gaussian noise of ``sigma`` in both channels."""
    real = signal + rng.normal(scale=sigma, size=size)
    return np.hypot(real, rng.normal(scale=sigma, size=size))


def test_debiasing_takes_the_rician_floor_off_monte_carlo():
    from esdmri.reconst.inputs import debias_magnitudes
    from esdmri.response import rician_mean

    rng = np.random.default_rng(0)
    sigma = 1.0
    signal = np.array([0.0, 0.5, 1.0, 2.0, 4.0, 10.0])
    magnitudes = _rician_magnitudes(signal, sigma, (200_000, signal.size), rng)
    raw_bias = magnitudes.mean(axis=0) - signal
    # The sampled floor is the analytic one (scipy-checked rician_mean).
    np.testing.assert_allclose(raw_bias, rician_mean(signal, sigma) - signal, atol=0.01)
    debiased = debias_magnitudes(magnitudes[:, None, None], np.ones((200_000, 1, 1), bool),
                                 sigma**2)[:, 0, 0]
    # E[M^2] = S^2 + 2 sigma^2: the power is unbiased wherever the clip at 0 is rare.
    np.testing.assert_allclose((debiased**2).mean(axis=0)[4:], signal[4:]**2, rtol=0.01)
    bias = debiased.mean(axis=0) - signal
    # Analytic at S = 0: E[sqrt(max(M^2 - 2 sigma^2, 0))] = sigma sqrt(2) Gamma(3/2) / e
    # (M^2 / sigma^2 is exponential of mean 2), against the floor sigma sqrt(pi / 2).
    np.testing.assert_allclose(debiased.mean(axis=0)[0], np.sqrt(np.pi / 2) / np.e, atol=0.01)
    # Under the floor (S <= sigma) at most 0.4 of the raw bias is left. Above it
    # the correction, unbiased in S^2, puts the mean about as far under S as the
    # magnitudes' mean lies over it (measured: 1.05-1.15 times, S = 2-10 sigma).
    assert np.all(np.abs(bias[:3]) <= 0.4 * raw_bias[:3])
    assert np.all(bias[3:] < 0) and np.all(np.abs(bias[3:]) <= 1.2 * raw_bias[3:])
    # The Rician-mean inversion: less exact under the floor, closer above it.
    inverted = debias_magnitudes(magnitudes[:, None, None], np.ones((200_000, 1, 1), bool),
                                 sigma**2, method="rician_mean")[:, 0, 0]
    inverted_bias = inverted.mean(axis=0) - signal
    assert np.all(np.abs(inverted_bias[:3]) <= 0.5 * raw_bias[:3])
    assert np.all(np.abs(inverted_bias[3:]) <= 0.5 * raw_bias[3:])
    # Its exact case: the mean magnitude itself maps back to the signal.
    exact = debias_magnitudes(rician_mean(signal, 2.0)[None, None, None], np.ones((1, 1, 1), bool),
                              4.0, method="rician_mean")[0, 0, 0]
    np.testing.assert_allclose(exact, signal, rtol=1e-4, atol=1e-3)
    # Outside the mask nothing changes; a negative variance is refused by name.
    outside = debias_magnitudes(magnitudes[:2, None, None], np.zeros((2, 1, 1), bool), 1.0)
    np.testing.assert_array_equal(outside, magnitudes[:2, None, None])
    with pytest.raises(ValueError, match="mask must have the data's spatial shape"):
        debias_magnitudes(magnitudes[:2, None, None], np.ones((2, 1), bool), 1.0)
    with pytest.raises(ValueError, match="variance must be >= 0"):
        debias_magnitudes(magnitudes[:2, None, None], np.ones((2, 1, 1), bool), -1.0)
    with pytest.raises(ValueError, match="method must be 'power' or 'rician_mean'"):
        debias_magnitudes(magnitudes[:2, None, None], np.ones((2, 1, 1), bool), 1.0, "koay")


def test_noise_floor_variance_against_the_noise_it_was_given():
    from dipy.core.gradients import gradient_table

    from esdmri.reconst.inputs import noise_floor_variance

    rng = np.random.default_rng(1)
    sigma = 3.0
    # One tissue, signal far above the floor (Gaussian regime), two regions of
    # another b0 so that the neighbours' median ignores the border.
    signal = np.full((10, 10, 10, 30), 100.0)
    signal[:5] = 60.0
    data = _rician_magnitudes(signal, sigma, signal.shape, rng)
    mask = np.ones(signal.shape[:3], bool)
    directions = rng.normal(size=(30, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    six_b0 = gradient_table(np.r_[np.zeros(6), np.full(24, 1000.0)], bvecs=directions)
    assert noise_floor_variance(data, six_b0, mask) == pytest.approx(sigma**2, rel=0.05)
    single = np.zeros_like(mask)
    single[0, 0, 0] = True
    one_b0 = gradient_table(np.r_[0.0, np.full(29, 1000.0)], bvecs=directions)
    assert noise_floor_variance(data, one_b0, single) == 0.0


def test_model_with_a_noise_floor_option_sees_the_floor_taken_off():
    from dipy.data import get_3shell_gtab

    from esdmri import RTESDModel
    from esdmri.response import TissueResponse

    gtab_3shell = get_3shell_gtab()

    # Isotropic signal decaying below the noise at the highest shell.
    rng = np.random.default_rng(2)
    diffusivity, s0, sigma = 1.5e-3, 100.0, 10.0
    truth = s0 * np.exp(-gtab_3shell.bvals * diffusivity)
    data = _rician_magnitudes(truth, sigma, (6, 6, 6, truth.size), rng)
    response = TissueResponse.from_tensors([0.0, 1000.0, 2000.0, 3500.0], sh_order_max=8)
    normalized = {}
    for noise_floor in (None, "power", "rician_mean"):
        model = RTESDModel(gtab_3shell, response, noise_floor=noise_floor, verbose=False)
        normalized[noise_floor] = model.prepare(data).normalized.reshape(-1, truth.size)
    high = gtab_3shell.bvals > 3000
    target = truth[high] / s0  # about 0.005: under the floor (0.125)
    raw = normalized[None][:, high].mean() - target.mean()
    low = np.abs(gtab_3shell.bvals - 1000) < 50  # S about 2.2 sigma
    raw_low = normalized[None][:, low].mean() - truth[low].mean() / s0
    # (method, floor left at b 3500, bias left at b 1000), of the raw bias: the
    # Monte-Carlo bounds above, with the neighbours' noise estimate, which runs a
    # little low on floor magnitudes (Rayleigh spread) and leaves more floor.
    for method, high_left, low_left in (("power", 0.6, 1.3), ("rician_mean", 0.7, 0.5)):
        debiased = normalized[method][:, high].mean() - target.mean()
        assert raw > 0.1 and abs(debiased) < high_left * raw, method
        debiased_low = normalized[method][:, low].mean() - truth[low].mean() / s0
        assert abs(debiased_low) < low_left * raw_low, method
