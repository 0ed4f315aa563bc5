"""The result of deconvolving a scan: fODFs, tissue fractions, predictions."""

import numpy as np
from dipy.reconst.odf import gfa

from ..peaks import default_peak_sphere, peaks_from_sh, peaks_to_dipy
from ..response import TissueResponse
from ..shm import DEFAULT_BVAL_TOLERANCE, b0_mask, descoteaux_to_legacy, group_shells, sh_matrix
from .config import PEAK_THRESHOLD
from .network import stacked_forward_matrix
from .inference import fractions_of


class DeconvolutionFit:
    """Per-voxel output of an ESD-family model.

    Like DIPY's fits, a fit can be indexed over its voxel axes:
    ``fit[2:4, :, :]`` or ``fit[10, 20, 30]`` is the fit of those voxels
    (its maps then have the indexed shape instead of (X, Y, Z)).

    Parameters
    ----------
    model : esdmri.reconst.models._DeconvolutionModel
    coefficients : ndarray, shape (X, Y, Z, C_total)
        WM SH coefficients (non-legacy descoteaux07) then one l = 0
        coefficient per isotropic tissue, for responses normalised to a unit
        b0 signal; zero outside the mask.
    mask : ndarray of bool, shape (X, Y, Z)
    response : TissueResponse, optional
        The response the coefficients were fitted with (default: the
        model's).
    refine_history : RefinementHistory, optional
        The refinement's objective every 10 steps, with its ``stop_reason``
        and step counts (:class:`esdmri.reconst.refine.RefinementHistory`;
        empty without refinement).

    Attributes
    ----------
    response : TissueResponse
        This fit's response: the model's, or the one estimated from the scan
        when the model has none.
    refine_history : RefinementHistory or list
    """

    def __init__(self, model, coefficients, mask, response=None, refine_history=None):
        self.model = model
        self.mask = mask
        self.response = model.response if response is None else response
        if self.response is None:
            raise ValueError("a fit needs the response its coefficients were fitted with: the "
                             "model has none, so give response")
        # The refinement's RefinementHistory keeps its stop reason and step counts.
        self.refine_history = [] if refine_history is None else refine_history
        self.sh_order_max = model.config.network.sh_order_max
        self._n_wm = coefficients.shape[-1] - len(self.response.tissues) + 1
        self._coefficients = coefficients

    @property
    def normalizes(self):
        """Whether this fit's tissue fractions were scaled to sum to 1 (``normalize``)."""
        return self.model.normalizes_with(self.response)

    @property
    def shape(self):
        """Voxel shape of the fit, (X, Y, Z) unless it was indexed."""
        return self.mask.shape

    def __getitem__(self, index):
        """The fit of the voxels ``index`` selects (an index over the voxel axes)."""
        if not isinstance(index, tuple):
            index = (index,)
        named = [item for item in index if item is not None and item is not Ellipsis]
        if len(named) > self.mask.ndim:
            raise IndexError(f"the fit has {self.mask.ndim} voxel axes {self.mask.shape} but "
                             f"the index has {len(named)} entries")
        # The trailing slice keeps every coefficient of each selected voxel.
        return DeconvolutionFit(self.model, self._coefficients[index + (slice(None),)],
                                self.mask[index], self.response, self.refine_history)

    @property
    def shm_coeff(self):
        """WM fODF SH coefficients in DIPY's default basis, shape (X, Y, Z, C).

        DIPY's default is the legacy ``descoteaux07`` basis (what ``sh_to_sf``,
        ``ProbabilisticDirectionGetter.from_shcoeff`` and DIPY's CSD use with
        default arguments), so these coefficients plug into DIPY unchanged.
        """
        return descoteaux_to_legacy(self._coefficients[..., :self._n_wm], self.sh_order_max)

    @property
    def shm_coeff_descoteaux07(self):
        """WM fODF SH coefficients in the non-legacy ``descoteaux07`` basis."""
        return self._coefficients[..., :self._n_wm]

    @property
    def volume_fractions(self):
        """Signal fraction of each tissue, dict name -> (X, Y, Z), summing to 1 in the mask.

        The keys are the response's tissues, which depend on the scan (see
        :func:`esdmri.response.estimate_response`):

        - ``("wm", "gm", "csf")``: two or more diffusion-weighted shells, or
          a non-shelled scheme (WM, GM and CSF signal fractions at b0).
        - ``("wm", "csf")``: b0 plus one shell (as MSMT-CSD can separate), or
          a multi-shell scan without GM voxels.
        - ``("wm",)``: no CSF voxel found; the fraction is 1 in the mask
          (nothing else is modelled) and the WM fODF integral
          (``shm_coeff[..., 0] * sqrt(4 pi)``) carries the apparent fibre
          density instead.

        Code that works on any scan should iterate over the keys, e.g.
        ``fit.volume_fractions.get("gm")``.
        """
        fractions = fractions_of(self._coefficients, self._n_wm)
        total = fractions.sum(-1, keepdims=True)
        fractions = np.divide(fractions, total, out=np.zeros_like(fractions), where=total > 0)
        return dict(zip(self.response.tissues, np.moveaxis(fractions, -1, 0)))

    def odf(self, sphere):
        """WM fODF sampled on a DIPY sphere, shape (X, Y, Z, n_vertices)."""
        return self.shm_coeff_descoteaux07 @ sh_matrix(self.sh_order_max, sphere.vertices).T

    @property
    def gfa(self):
        """Generalised fractional anisotropy of the WM fODF, shape (X, Y, Z)."""
        from dipy.data import default_sphere
        return np.where(self.mask, gfa(np.clip(self.odf(default_sphere), 0, None)), 0)

    def predict(self, gtab=None, S0=None):
        """Predicted signal, shape (X, Y, Z, N).

        Parameters
        ----------
        gtab : GradientTable, optional
            Gradient table to predict at (default: the model's). Its shells
            must be among the response's shells (all of them, or some).
        S0 : float or ndarray of shape (X, Y, Z), optional
            Non-diffusion-weighted signal (default 1: the normalised signal).
        """
        gtab = self.model.gtab if gtab is None else gtab
        response = _response_on_shells(self.response.normalized(), gtab)
        # One tissue at a time: a response validates against a gtab with fewer
        # shells than tissues (tissues cannot be separated there, but they can
        # be predicted).
        matrix = np.concatenate([
            stacked_forward_matrix(response.select_tissues(tissue), gtab, self.sh_order_max)
            for tissue in response.tissues])
        signal = self._coefficients @ matrix
        if S0 is not None:
            signal = signal * np.asarray(S0)[..., None]
        return signal

    def peaks(self, sphere=None, relative_peak_threshold=PEAK_THRESHOLD, min_separation_angle=25,
              npeaks=5, affine=None, subvertex=True):
        """Peak directions of the WM fODF as DIPY ``PeaksAndMetrics``.

        Parameters
        ----------
        sphere : dipy.core.sphere.Sphere, optional
            Search sphere (default: :func:`esdmri.peaks.default_peak_sphere`,
            about 3.8 degrees between vertices).
        relative_peak_threshold : float
            Peaks below this fraction of the largest peak are dropped (above
            ``max(0, min fODF)``, as DIPY measures it). Default 0.2, chosen on
            the dev phantoms (:data:`esdmri.reconst.config.PEAK_THRESHOLD`),
            not DIPY's 0.5.
        min_separation_angle : float
            Degrees; closer peaks are merged.
        npeaks : int
        affine : ndarray, shape (4, 4), optional
            Stored on the result (``save_pam`` writes it).
        subvertex : bool
            Refine each peak's direction between the sphere's vertices
            (:func:`esdmri.peaks.subvertex_directions`; False: DIPY's vertices).

        Returns
        -------
        peaks : dipy.direction.peaks.PeaksAndMetrics
            ``shm_coeff`` and ``B`` in DIPY's default (legacy) basis, like
            :attr:`shm_coeff`.
        """
        sphere = default_peak_sphere() if sphere is None else sphere
        # The peak search works on volumes; an indexed fit is searched as a row.
        coefficients = self.shm_coeff_descoteaux07
        as_volume = coefficients.reshape((-1, 1, 1, coefficients.shape[-1]))
        directions, values = peaks_from_sh(
            as_volume, sphere=sphere, relative_peak_threshold=relative_peak_threshold,
            min_separation_angle=min_separation_angle, npeaks=npeaks,
            mask=self.mask.reshape(as_volume.shape[:3]), subvertex=subvertex)
        directions = directions.reshape(self.shape + directions.shape[-2:])
        values = values.reshape(self.shape + values.shape[-1:])
        return peaks_to_dipy(directions, values, self.shm_coeff, sphere,
                             affine=np.eye(4) if affine is None else affine, legacy=True)

    @property
    def training_history(self):
        """Per-epoch loss terms of the model's training (the network is the model's)."""
        return self.model.training_history


def _response_on_shells(response, gtab, tolerance=DEFAULT_BVAL_TOLERANCE):
    """``response`` restricted to the b0 row and the shells ``gtab`` has.

    Raises ValueError naming the gtab shells the response does not have.
    """
    shell_bvals, _ = group_shells(gtab, tolerance=tolerance)
    weighted = shell_bvals[1:] if b0_mask(gtab).any() else shell_bvals
    distance = np.abs(weighted[:, None] - response.bvals[None, 1:])
    unknown = weighted[distance.min(axis=1, initial=np.inf) > tolerance]
    if unknown.size:
        raise ValueError(
            f"gtab has shells {np.round(unknown, 1).tolist()} that the response (shells "
            f"{np.round(response.bvals, 1).tolist()}) does not have: the signal can only be "
            "predicted at the response's shells or a subset of them")
    rows = np.r_[0, 1 + np.unique(distance.argmin(axis=1))]
    return TissueResponse(response.tissues, response.bvals[rows],
                          [coefficients[rows] for coefficients in response.coefficients])
