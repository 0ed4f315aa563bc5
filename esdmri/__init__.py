"""esdmri: rotation-equivariant deep spherical deconvolution for diffusion MRI."""

__version__ = "0.1.0"
