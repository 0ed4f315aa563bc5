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
# |A| / (2 sigma) beyond which the Rician mean is |A| (see rician_mean_and_slope).
_FAR = 5e3


def rician_mean_and_slope(signal, sigma):
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

    Parameters
    ----------
    signal : Tensor
        Noise-free signal ``A``.
    sigma : Tensor or float
        Noise standard deviation of each channel, ``> 0``, broadcastable
        against ``signal``.

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
    ratio = signal.abs() / (2 * sigma)
    half = ratio * ratio
    zeroth, first = torch.special.i0e(half), torch.special.i1e(half)
    floor = sigma * _SQRT_HALF_PI
    excess = floor * ((1 + 2 * half) * zeroth + 2 * half * first - 1)
    slope = _SQRT_HALF_PI * ratio * (zeroth + first)
    # Beyond |A| = 1e4 sigma the mean is |A| to 5e-9 relative, and x overflows
    # float32 as sigma -> 0.
    far = ratio > _FAR
    excess = torch.where(far, signal.abs() - floor, excess)
    slope = torch.where(far, 1.0, slope)
    return floor + signal.sign() * excess, slope


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

    Notes
    -----
    Same interface as ``VoxelLoss``: :meth:`project` gives what the loss
    keeps of the measured signals, and a call evaluates rows of them.
    """

    def __init__(self, forward_matrix, fodf_sampler, n_wm_coeffs, weights, noise_sigma,
                 voxel_loss):
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
        mean, slope = rician_mean_and_slope(coefficients @ self.forward, sigma.unsqueeze(1))
        residual = mean.sub_(measured)
        if return_loss:
            loss += (self.intensity / self.n_measurements
                     * torch.linalg.vector_norm(residual, dim=1).double().square_())
        gradient.addmm_(residual.mul_(slope), self.forward_t, alpha=self.residual_scale)
        return (gradient, loss) if return_loss else gradient
