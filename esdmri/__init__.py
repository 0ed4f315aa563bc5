"""esdmri: rotation-equivariant deep spherical deconvolution for diffusion MRI.

``model = RTESDModel(gtab, response); fit = model.fit(data, mask=mask)``, then
``fit.shm_coeff``, ``fit.odf(sphere)``, ``fit.peaks()`` and DIPY tractography.
"""

__version__ = "0.1.0"

# First, before anything here imports torch: OpenMP threads that sleep
# instead of spinning while they wait, so that a machine shared with other
# jobs does not stall every small parallel operation (esdmri.threads; a
# user's OMP_WAIT_POLICY wins).
from esdmri import threads as _threads  # noqa: E402, F401

# The models pull in torch; importing them on first use keeps light commands
# (plots, evaluation, fetching) quick to start.
_LAZY = {"CESDModel": ".reconst", "ESDModel": ".reconst", "RTESDModel": ".reconst",
         "load_model": ".reconst", "TissueResponse": ".response"}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'esdmri' has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(_LAZY[name], __name__), name)
