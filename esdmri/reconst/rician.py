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

import math

import torch

from .losses import CAUCHY_SIGMA

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
    the coefficients to all ``N`` measurements, through one ``C x (N + V)``
    operator (the forward matrix and the sampler stacked), and back. As
    ``sigma -> 0`` the mean tends to ``|F^T c|`` and the term to the least
    squares one.

    Parameters
    ----------
    forward_matrix : Tensor, shape (C_total, N)
    fodf_sampler : Tensor, shape (V, C_wm)
        Its device and dtype are the evaluation's.
    n_wm_coeffs : int
    weights : LossWeights
    noise_sigma : Tensor or array, shape (n,)
        ``sigma`` of each voxel, in the units of its normalised signal
        (the scan's ``sigma`` over the voxel's mean b0), ``> 0``.

    Notes
    -----
    Same interface as ``VoxelLoss``: :meth:`project` gives what the loss
    keeps of the measured signals, and a call evaluates rows of them.
    """

    def __init__(self, forward_matrix, fodf_sampler, n_wm_coeffs, weights, noise_sigma):
        device, dtype = fodf_sampler.device, fodf_sampler.dtype
        n_coefficients, self.n_measurements = forward_matrix.shape
        self.n_samples = fodf_sampler.shape[0]
        sigma = torch.as_tensor(noise_sigma, dtype=dtype, device=device).reshape(-1)
        if not bool((sigma > 0).all()):
            raise ValueError("noise_sigma must be > 0 in every voxel")
        self.sigma = sigma
        operator = torch.zeros((n_coefficients, self.n_measurements + self.n_samples),
                               dtype=dtype, device=device)
        operator[:, :self.n_measurements] = forward_matrix.to(device, dtype)
        operator[:n_wm_coeffs, self.n_measurements:] = fodf_sampler.T
        self.operator, self.operator_t = operator, operator.T.contiguous()
        self.weights = weights
        self.residual_scale = 2 * weights.intensity / self.n_measurements
        self.sparsity_scale = 2 * weights.sparsity / (self.n_samples * CAUCHY_SIGMA)
        self.negative_scale = 2 * weights.nonnegativity / self.n_samples

    def project(self, measured):
        """The measured signals in the evaluation's dtype, and each voxel's ``sigma``.

        Parameters
        ----------
        measured : Tensor, shape (n, N)

        Returns
        -------
        measured : Tensor, shape (n, N)
        sigma : Tensor, shape (n,)
        """
        if len(measured) != len(self.sigma):
            raise ValueError(f"noise_sigma has {len(self.sigma)} voxels, the signal "
                             f"{len(measured)}")
        return measured.to(self.operator.device, self.operator.dtype), self.sigma

    def __call__(self, coefficients, measured, sigma, out=None, return_loss=False):
        """Gradient of each voxel's loss, and the loss.

        Parameters
        ----------
        coefficients : Tensor, shape (n, C_total)
        measured, sigma : Tensor
            :meth:`project` of the voxels.
        out : Tensor, shape (n, C_total), optional
            Where the gradient is written.
        return_loss : bool, optional
            Also return each voxel's loss.

        Returns
        -------
        gradient : Tensor, shape (n, C_total)
        loss : Tensor, float64, shape (n,)
            Only with ``return_loss``.
        """
        mapped = coefficients @ self.operator
        forward, samples = mapped[:, :self.n_measurements], mapped[:, self.n_measurements:]
        mean, slope = rician_mean_and_slope(forward, sigma.unsqueeze(1))
        residual = mean.sub_(measured)
        spread = torch.addcmul(torch.ones((), dtype=samples.dtype, device=samples.device),
                               samples, samples, value=0.5 / CAUCHY_SIGMA)
        negative = samples.clamp(max=0)
        if return_loss:
            weights = self.weights
            loss = (weights.intensity / self.n_measurements
                    * torch.linalg.vector_norm(residual, dim=1).double().square_()
                    + weights.nonnegativity / self.n_samples
                    * torch.linalg.vector_norm(negative, dim=1).double().square_()
                    + 2 * weights.sparsity / self.n_samples
                    * spread.log().sum(dim=1).double())
        torch.mul(residual.mul_(slope), self.residual_scale, out=forward)
        torch.addcdiv(negative.mul_(self.negative_scale), samples, spread,
                      value=self.sparsity_scale, out=samples)
        gradient = torch.mm(mapped, self.operator_t, out=out)
        return (gradient, loss) if return_loss else gradient
