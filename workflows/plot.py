"""``esdmri_plot``: fODF glyphs of a slice (and tissue fraction maps) as PNG.

Examples
--------
``esdmri_plot fit/fodf_sh.nii.gz --background fit/fractions.nii.gz
--fractions fit/fractions.nii.gz --axis 2 --out_dir figures`` draws the
middle axial slice's fODF glyphs over the WM fraction, and the fraction maps
of the same slice in a second figure.
"""

import matplotlib.pyplot as plt
import numpy as np

from esdmri.viz import plot_fraction_maps, plot_odf_slice, plot_peaks_slice, save_figure

from .io import (EsdmriWorkflow, display_name, load_fodf, load_fractions, match_optional,
                 run_workflow)
from .io import logger


def load_background(path, spatial_shape):
    """A 3D map for the figure background and what it shows, for its colour bar.

    A 4D map gives its first volume (the WM fraction of esdmri_fit's
    fractions.nii.gz).
    """
    values, names = load_fractions(path, "background")
    if values.shape[:3] != tuple(spatial_shape):
        raise ValueError(f"background {path} has shape {values.shape[:3]} but the fODF grid "
                         f"is {tuple(spatial_shape)}")
    what = f"{names[0]} fraction" if names[0] != "map 0" else "values"
    return values[..., 0], f"{what} of {display_name(path)}"


class PlotFlow(EsdmriWorkflow):
    @classmethod
    def get_short_name(cls):
        return "esdmri_plot"

    def run(self, input_files, background=None, fractions=None, axis=2, index=None,
            peaks=False, scale=0.9, norm="max", dpi=150, out_dir="",
            out_png="odf_slice.png", out_fractions_png="fraction_maps.png"):
        """Draw the fODF glyphs of one slice, and optionally tissue fraction maps.

        Each glyph is the fODF projected onto the slice plane, coloured by
        direction (red, green, blue = x, y, z). Slices are shown in voxel
        coordinates: for --axis 2 (axial) x runs left to right and y bottom
        to top; the edges are labelled with the anatomical direction (R/L,
        A/P, S/I) that the image's affine gives each voxel axis. Example:
        esdmri_plot fit/fodf_sh.nii.gz --background fit/fractions.nii.gz
        --fractions fit/fractions.nii.gz --out_dir figures.

        Parameters
        ----------
        input_files : string
            fODF SH NIfTI (DIPY default basis) or .pam5 file(s); a glob
            processes one subject at a time.
        background : string, optional
            Scalar NIfTI map drawn in grey below the glyphs (e.g. GFA; of a
            4D map such as esdmri_fit's fractions, the first volume: WM).
        fractions : string, optional
            Tissue-fraction NIfTI (esdmri_fit's fractions map) drawn as a
            second figure, one panel per tissue.
        axis : int, optional
            Array axis normal to the slice: 2 axial, 1 coronal, 0 sagittal.
        index : int, optional
            Slice index along axis (default: the middle slice).
        peaks : bool, optional
            Also draw the peaks of a .pam5 input as line segments.
        scale : float, optional
            Glyph size relative to the voxel.
        norm : string, optional
            max: every glyph scaled to its own maximum (shapes); global: all
            scaled by the slice's largest value (sizes show fODF amplitude).
        dpi : int, optional
            Resolution of the PNG files.
        out_dir : string, optional
            Output folder (default: current folder).
        out_png : string, optional
            fODF glyph figure.
        out_fractions_png : string, optional
            Fraction-map figure (with --fractions).

        Returns
        -------
        figures : list of str
            Files written.

        References
        ----------
        .. [1] Elaldi A, Dey N, Kim H, Gerig G. Equivariant Spherical Deconvolution:
           Learning Sparse Orientation Distribution Functions from Spherical Data.
           Information Processing in Medical Imaging (IPMI), 2021.

        .. [2] Elaldi A, Gerig G, Dey N. E(3) x SO(3)-Equivariant Networks for
           Spherical Deconvolution in Diffusion MRI. Medical Imaging with Deep
           Learning (MIDL), 2023.
        """
        io_it = self.get_io_iterator(
            skip_outputs=() if fractions else ("out_fractions_png",))
        backgrounds = match_optional("background", background, len(io_it))
        fraction_maps = match_optional("fractions", fractions, len(io_it))
        written = []
        for paths, background_path, fractions_path in zip(io_it, backgrounds, fraction_maps):
            fodf_path, png_path, fractions_png_path = paths
            shm_coeff, affine, pam = load_fodf(fodf_path)
            if peaks and pam is None:
                raise ValueError(f"--peaks needs a .pam5 input, got {fodf_path}")
            spatial_shape = shm_coeff.shape[:3]
            shown, label = (None, None) if background_path is None else \
                load_background(background_path, spatial_shape)
            ax = plot_odf_slice(
                shm_coeff, axis=axis, index=index, legacy=True, scale=scale, norm=norm,
                mask=np.any(shm_coeff != 0, axis=-1), affine=affine, background=shown,
                background_label=label)
            if peaks:
                # Default overlay: thin black lines through the coloured lobes.
                plot_peaks_slice(pam.peak_dirs, pam.peak_values, axis=axis, index=index,
                                 ax=ax, affine=affine)
            ax.set_title(f"fODFs{' and peaks' if peaks else ''} of {display_name(fodf_path)}\n"
                         f"{ax.get_title()}")
            save_figure(ax.figure, png_path, force=True, dpi=dpi)
            plt.close(ax.figure)
            files = [png_path]
            if fractions_path is not None:
                volumes, names = load_fractions(fractions_path)
                if volumes.shape[:3] != spatial_shape:
                    raise ValueError(f"fractions {fractions_path} has shape "
                                     f"{volumes.shape[:3]} but the fODF grid is "
                                     f"{spatial_shape}")
                figure = plot_fraction_maps(volumes, names, axis=axis, index=index,
                                            affine=affine)
                figure.suptitle(f"tissue fractions of {display_name(fractions_path)}")
                save_figure(figure, fractions_png_path, force=True, dpi=dpi)
                plt.close(figure)
                files.append(fractions_png_path)
            logger.info(f"{fodf_path}: wrote {', '.join(files)}")
            written += files
        return written


def main():
    """Entry point of ``esdmri_plot``."""
    run_workflow(PlotFlow())


if __name__ == "__main__":
    main()
