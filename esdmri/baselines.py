"""DIPY's constrained spherical deconvolution as the baseline of esdmri's models.

The demo (``esdmri_demo``) and the benchmarks compare the networks with
DIPY's single-shell CSD [1]_ fitted here, on one shell of the scan, with a
WM response given as a :class:`esdmri.response.TissueResponse` (the one the
networks get: the ground truth of a phantom or the estimate of
:func:`esdmri.response.estimate_response`).

References
----------
.. [1] Tournier, J.-D., Calamante, F., Connelly, A. (2007). Robust
   determination of the fibre orientation distribution in diffusion MRI:
   non-negativity constrained super-resolved spherical deconvolution.
   NeuroImage 35, 1459-1472.
"""

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.csdeconv import AxSymShResponse, ConstrainedSphericalDeconvModel

from esdmri.response import TissueResponse
from esdmri.shm import (DEFAULT_BVAL_TOLERANCE, b0_mask, group_shells, legacy_to_descoteaux,
                        n_coeffs)


def fit_csd(gtab, data, response, mask=None, bval=None, sh_order_max=8):
    """DIPY's single-shell CSD on the b0 volumes and one shell.

    The response kernel is the WM row of that shell: its zonal SH
    coefficients are the same in DIPY's and MRtrix3's bases, and the b0
    row's ``l = 0`` coefficient is ``sqrt(4 pi)`` times the b0 signal
    (DIPY's ``AxSymShResponse``).

    Parameters
    ----------
    gtab : GradientTable
        The scan's, with b0 volumes.
    data : ndarray (X, Y, Z, N)
    response : TissueResponse
        With a WM response whose shells match the gtab's (see
        :meth:`TissueResponse.validate`).
    mask : ndarray (X, Y, Z) bool, optional
        Voxels to fit (default: all).
    bval : float, optional
        b-value of the shell to fit, within ``DEFAULT_BVAL_TOLERANCE`` of one
        of the gtab's shells (default: the highest shell).
    sh_order_max : int, optional
        Even SH order of the fODF.

    Returns
    -------
    shm_coeff : ndarray (X, Y, Z, C) float64
        WM fODF in DIPY's non-legacy ``descoteaux07`` basis, ``C =
        (sh_order_max + 1) (sh_order_max + 2) / 2``; zeros outside ``mask``.
    """
    if not isinstance(response, TissueResponse):
        raise TypeError(f"response must be a TissueResponse, got {type(response).__name__}")
    if "wm" not in response.tissues:
        raise ValueError(f"response must hold a WM response, got tissues {response.tissues}")
    if isinstance(sh_order_max, bool) or not isinstance(sh_order_max, (int, np.integer)) \
            or sh_order_max < 2 or sh_order_max % 2:
        raise ValueError(f"sh_order_max must be an even int >= 2, got {sh_order_max!r}")
    data = np.asarray(data)
    if data.ndim != 4 or data.shape[-1] != len(gtab.bvals):
        raise ValueError(f"data must have shape (X, Y, Z, {len(gtab.bvals)}) to match the "
                         f"gtab, got {data.shape}")
    mask = np.ones(data.shape[:3], bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != data.shape[:3]:
        raise ValueError(f"mask must have shape {data.shape[:3]}, got {mask.shape}")
    if not b0_mask(gtab).any():
        raise ValueError("fit_csd needs b0 volumes in the gtab")
    # Only the WM response enters: a single-shell scan need not separate tissues.
    response.select_tissues(("wm",)).validate(gtab)
    shell_bvals, shell_index = group_shells(gtab)
    if bval is None:
        shell = len(shell_bvals) - 1
    else:
        gaps = np.abs(shell_bvals[1:] - bval)
        if gaps.size == 0 or gaps.min() > DEFAULT_BVAL_TOLERANCE:
            raise ValueError(f"bval={bval!r} is not one of the gtab's shells "
                             f"{np.round(shell_bvals[1:], 1).tolist()}")
        shell = int(np.argmin(gaps)) + 1
    volumes = (shell_index == 0) | (shell_index == shell)
    shell_gtab = gradient_table(gtab.bvals[volumes], bvecs=gtab.bvecs[volumes],
                                b0_threshold=gtab.b0_threshold)
    wm = response["wm"]
    model = ConstrainedSphericalDeconvModel(
        shell_gtab, AxSymShResponse(wm[0, 0] / np.sqrt(4 * np.pi),
                                    wm[shell, :sh_order_max // 2 + 1]),
        sh_order_max=sh_order_max)
    legacy = model.fit(data[..., volumes][mask].astype(np.float64)).shm_coeff
    shm_coeff = np.zeros(mask.shape + (n_coeffs(sh_order_max),))
    shm_coeff[mask] = legacy_to_descoteaux(legacy, sh_order_max)
    return shm_coeff
