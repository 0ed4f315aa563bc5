"""Unsupervised deconvolution models (ESD, RT-ESD, C-ESD) with a DIPY interface."""

# The models pull in torch; importing them on first use lets light modules
# (the input checks that every command-line tool runs) load without it.
_LAZY = {"CESDModel": ".models", "DeconvolutionFit": ".fit", "ESDModel": ".models",
         "RTESDModel": ".models", "load_model": ".models", "train_group": ".group"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'esdmri.reconst' has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(_LAZY[name], __name__), name)
