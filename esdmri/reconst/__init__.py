"""Unsupervised deconvolution models (ESD, RT-ESD, C-ESD) with a DIPY interface."""

from .fit import DeconvolutionFit
from .models import CESDModel, ESDModel, RTESDModel, estimate_response
from .serialization import load_model

__all__ = ["CESDModel", "DeconvolutionFit", "ESDModel", "RTESDModel", "estimate_response",
           "load_model"]
