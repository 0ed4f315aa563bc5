"""A data term that knows the Rician noise floor (``noise_floor="model"``, issue 26).

A magnitude ``M`` of a signal ``A`` under Gaussian noise of standard deviation
``sigma`` in each channel is Rician, with mean

``E[M | A, sigma] = sigma sqrt(pi / 2) L_{1/2}(-A^2 / (2 sigma^2))``

(Gudbjartsson & Patz 1995). Where ``A`` is far under ``sigma`` (along a fibre at
high b, at low SNR) the magnitudes sit on a floor near ``sigma sqrt(pi / 2)``.
The refinement's least-squares term compares the noise-free forward signal
``F^T c`` with the magnitudes, so a fit explains the floor with a fatter
response or extra lobes. :class:`RicianVoxelLoss` compares the magnitudes with
the Rician mean of the forward signal instead, so the floor is predicted by the
noise model and the fODF and responses can stay noise-free (the responses
fitted as Rician means, ``estimate_response(rician=True)``). Voxel-wise
debiasing of the magnitudes (``noise_floor="power"`` or ``"rician_mean"``,
:func:`esdmri.reconst.inputs.debias_magnitudes`) cannot remove the floor where
``A ~ 0``; a term on the mean has no such residual.
"""

import dataclasses
import math

import torch

_SQRT_HALF_PI = math.sqrt(math.pi / 2)
# |A| / sigma beyond which the Rician mean is |A| (see _scaled_mean_exact).
_FAR = 1e4
# The closed form's h(u) = 1 + (pi / 2 - 1) / (1 + b u + c u^2) (see
# rician_mean_and_slope): b, c by least squares on the exact mean and slope (weight
# 0.3) over |A| / sigma in [0, 1000], reweighted toward the largest error.
_H_FLOOR = math.pi / 2 - 1
_H_LINEAR, _H_QUADRATIC = 0.38890026, 0.0533366


def _scaled_mean_exact(ratio):
    """``E / sigma`` and its derivative in ``ratio = |A| / sigma``, through ``i0e``, ``i1e``."""
    half = ratio * ratio / 4
    zeroth, first = torch.special.i0e(half), torch.special.i1e(half)
    scaled = _SQRT_HALF_PI * ((1 + 2 * half) * zeroth + 2 * half * first)
    slope = _SQRT_HALF_PI * ratio / 2 * (zeroth + first)
    # Beyond |A| = 1e4 sigma the mean is |A| to 5e-9 relative, and x overflows
    # float32 as sigma -> 0.
    far = ratio > _FAR
    return torch.where(far, ratio, scaled), torch.where(far, 1.0, slope)


def _scaled_mean_approximate(ratio):
    """``E / sigma`` and its derivative as ``sqrt(u + h(u))``, ``u = ratio^2``: no Bessel function.

    Elementwise products and sums only, in place where a value is not reused
    (a fresh ``(n, N)`` array costs several in-place passes, ``torch.where``
    too): in ``h`` the ``u`` is held at ``1e8`` (``h - 1`` is under ``1e-16``
    there, so ``sqrt(u + 1)`` is what counts beyond).
    """
    held = ratio.square().clamp_(max=_FAR**2)
    weight = held.mul(_H_QUADRATIC).add_(_H_LINEAR).mul_(held).add_(1).reciprocal_()
    scaled = weight.mul(_H_FLOOR).add_(1).addcmul_(ratio, ratio).sqrt_()
    # h'(u) = -(pi / 2 - 1) (b + 2 c u) / (1 + b u + c u^2)^2
    slope = held.mul_(2 * _H_QUADRATIC).add_(_H_LINEAR).mul_(weight).mul_(weight)
    slope = slope.mul_(-_H_FLOOR).add_(1).mul_(ratio).div_(scaled)
    return scaled, slope


def rician_mean_and_slope(signal, sigma, approximate=False):
    """The Rician mean of a noise-free signal and its derivative with respect to the signal.

    With ``x = A^2 / (4 sigma^2)``, ``L_{1/2}(-2x) = e^{-x} ((1 + 2x) I_0(x) +
    2x I_1(x))``, written through the exponentially scaled Bessel functions
    ``i0e``, ``i1e`` (finite at every ``x``, so stable in float32); its
    derivative in ``x`` is ``i0e(x) + i1e(x)``, so for ``A >= 0``

    ``dE/dA = sqrt(pi / 2) A / (2 sigma) (i0e(x) + i1e(x))``,

    0 at ``A = 0`` (the floor ``sigma sqrt(pi / 2)``) and tending to 1 for ``A
    >> sigma``, where ``E`` tends to ``A``. A noise-free signal is not
    negative, but a forward model's can be (an fODF with negative lobes):
    there the prediction is the point reflection of the mean through the
    floor, ``E(-A) = 2 sigma sqrt(pi / 2) - E(A)``, which keeps it increasing
    in ``A`` (a negative signal cannot pass for a positive one, as it would
    under the even mean of ``|A|``), smooth at 0 (the slope is even, 0
    there), and ``A`` itself as ``sigma -> 0``, where the data term becomes
    least squares.

    ``approximate=True`` replaces the Bessel functions (which take most of an
    evaluation of the data term on CPU: ``torch.special.i0e`` alone costs
    about twenty matrix products of the forward model) by a closed form of ``u =
    (A / sigma)^2``: ``E = sigma sqrt(u + h(u))`` with ``h(u) = 1 + (pi / 2 -
    1) / (1 + b u + c u^2)``, ``b, c > 0`` (``h(0) = pi / 2``, so the floor
    is exact, and ``h -> 1`` as ``E^2 -> A^2 + sigma^2`` far above it). Its
    error against the exact form, in float64 over ``A / sigma`` in ``[0,
    1e6]``: at most ``8.3e-4 sigma`` in the mean (a sixtieth of the ``5 %``
    to which ``sigma`` itself is measured, see
    :func:`esdmri.reconst.inputs.noise_floor_variance`) and ``2.2e-3`` in the
    slope, which is the exact derivative of the approximated mean (so the
    objective and its gradient agree); float32 adds its rounding, ``2e-7
    (sigma + |A|)``.

    Parameters
    ----------
    signal : Tensor
        Noise-free signal ``A``.
    sigma : Tensor or float
        Noise standard deviation of each channel, ``> 0``, broadcastable
        against ``signal``.
    approximate : bool, optional
        Use the closed form above instead of the Bessel functions.

    Returns
    -------
    mean, slope : Tensor
        ``E[M | A, sigma]`` (extended to ``A < 0`` as above) and ``dE/dA``,
        the broadcast shape.

    References
    ----------
    .. [1] Gudbjartsson H, Patz S. The Rician distribution of noisy MRI
       data. Magn Reson Med 1995;34(6):910-914.
    """
    ratio = signal.abs().div_(sigma)
    scaled, slope = (_scaled_mean_approximate if approximate else _scaled_mean_exact)(ratio)
    floor = sigma * _SQRT_HALF_PI
    # The excess over the floor is >= 0 (the mean increases in |A|): the sign
    # of A reflects it.
    return scaled.mul_(sigma).sub_(floor).copysign_(signal) + floor, slope


class RicianVoxelLoss:
    """Each voxel's loss with a Rician-mean data term, and its gradient.

    The loss of a voxel with coefficients ``c``, magnitudes ``y`` and noise
    level ``sigma`` (normalised like ``y``) is that of
    :class:`esdmri.reconst.refine.VoxelLoss` with the forward signal passed
    through the Rician mean (:func:`rician_mean_and_slope`, extended to
    negative signals so that it increases with them):

    ``w_i / N |E[M | F^T c, sigma] - y|^2 + w_s / V sum_v 2 log(1 + f_v^2 /
    (2 sigma_c)) + w_n / V sum_v min(f_v, 0)^2``,  ``f = S c_wm``.

    The term is not quadratic in ``c``, so the least-squares term's reduced
    QR form (``k = min(N, C)`` columns) does not apply: each evaluation maps
    the coefficients to all ``N`` measurements and back. The fODF's terms
    are ``VoxelLoss``'s own, evaluated with a zero intensity weight on a
    one-column placeholder signal (one place for them). As ``sigma -> 0``
    the data term tends to the least-squares one.

    Parameters
    ----------
    forward_matrix, fodf_sampler, n_wm_coeffs, weights
        As in ``VoxelLoss``.
    noise_sigma : Tensor or array, shape (n,)
        ``sigma`` of each voxel, in the units of its normalised signal
        (the scan's ``sigma`` over the voxel's mean b0), ``> 0``.
    voxel_loss : type
        :class:`esdmri.reconst.refine.VoxelLoss`, whose fODF terms are used
        (passed in: the refinement imports this module).
    approximate : bool, optional
        The Rician mean's closed form (:func:`rician_mean_and_slope`,
        ``approximate=True``: within ``8.3e-4 sigma`` of the exact mean; an
        evaluation 1.7-2.8x cheaper than with the Bessel form at N = 65-301,
        measured by ``benchmarks/bench_rician.py``) or its Bessel form. The
        attribute of the same name can be switched after construction
        (``benchmarks/bench_rician.py`` times both).

    Notes
    -----
    Same interface as ``VoxelLoss``: :meth:`project` gives what the loss
    keeps of the measured signals, and a call evaluates rows of them.
    """

    def __init__(self, forward_matrix, fodf_sampler, n_wm_coeffs, weights, noise_sigma,
                 voxel_loss, approximate=True):
        self.approximate = approximate
        # No reference state: the Rician data term is not quadratic (VoxelLoss.incremental).
        self.incremental = False
        device, dtype = fodf_sampler.device, fodf_sampler.dtype
        n_coefficients, self.n_measurements = forward_matrix.shape
        sigma = torch.as_tensor(noise_sigma, dtype=dtype, device=device).reshape(-1)
        if not bool((sigma > 0).all()):
            raise ValueError("noise_sigma must be > 0 in every voxel")
        self.sigma = sigma
        self.forward = forward_matrix.to(device, dtype)
        self.forward_t = self.forward.T.contiguous()
        self.intensity = weights.intensity
        self.residual_scale = 2 * weights.intensity / self.n_measurements
        placeholder = torch.zeros((n_coefficients, 1), dtype=dtype, device=device)
        self.fodf_terms = voxel_loss(placeholder, fodf_sampler, n_wm_coeffs,
                                     dataclasses.replace(weights, intensity=0.0))

    def project(self, measured):
        """``measured`` (shape (n, N)) in the evaluation's dtype, and each voxel's ``sigma``."""
        if len(measured) != len(self.sigma):
            raise ValueError(f"noise_sigma has {len(self.sigma)} voxels, the signal "
                             f"{len(measured)}")
        return measured.to(self.forward.device, self.forward.dtype), self.sigma

    def __call__(self, coefficients, measured, sigma, out=None, return_loss=False):
        """Each voxel's gradient, written to ``out`` when given (and loss, float64).

        As :meth:`esdmri.reconst.refine.VoxelLoss.__call__`, with ``measured``
        and ``sigma`` from :meth:`project` in place of the projection.
        """
        n = len(coefficients)
        placeholder = coefficients.new_zeros((n, 1))
        result = self.fodf_terms(coefficients, placeholder,
                                 torch.zeros(n, dtype=torch.float64, device=placeholder.device),
                                 out=out, return_loss=return_loss)
        gradient, loss = result if return_loss else (result, None)
        mean, slope = rician_mean_and_slope(coefficients @ self.forward, sigma.unsqueeze(1),
                                            approximate=self.approximate)
        residual = mean.sub_(measured)
        if return_loss:
            loss += (self.intensity / self.n_measurements
                     * torch.linalg.vector_norm(residual, dim=1).double().square_())
        gradient.addmm_(residual.mul_(slope), self.forward_t, alpha=self.residual_scale)
        return (gradient, loss) if return_loss else gradient
