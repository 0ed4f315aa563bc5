"""DIPY-style unsupervised deconvolution models: ESD, RT-ESD and C-ESD.

``model = RTESDModel(gtab, response); fit = model.fit(data, mask)`` returns a
fit with ``shm_coeff``, ``odf``, ``predict``, ``volume_fractions`` and
``peaks``. The loss is unsupervised (the fODFs, convolved with the response
functions, must reproduce the measured signal). By default the network is not
trained (``epochs=0``, the most accurate setting measured): the fit is its
linear prior refined by the spatially coupled descent of that loss. With
``epochs=N`` the U-Net is first trained on the scan itself, as in the papers.
"""

import copy
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from dipy.reconst.base import ReconstModel

from .. import serialization
from ..response import TissueResponse, estimate_response
from ..shm import ShellInterpolator, count_unique_axes, group_shells, n_coeffs
from .config import (DeconvolutionConfig, NetworkConfig, default_sh_order, option_defaults,
                     options_docstring)
from .fit import DeconvolutionFit
from .inputs import check_data, check_gtab, check_mask, normalize_by_b0, resolve_device
from .network import (DeconvolutionNetwork, build_fodf_sampler, build_forward_model,
                      build_unet, linear_deconvolution_operator)
from .refine import refine_coefficients
from .subjects import ScanBlocks
from .tiling import inference_windows, receptive_radius
from .training import (PRECISIONS, DistributedContext, Trainer, check_training_options,
                       group_response, predict_coefficients)


class _DeconvolutionModel(ReconstModel):
    """Shared machinery of the ESD family; subclasses pick the convolution."""

    conv_kind = None

    def __init__(self, gtab, response=None, *, device="cpu", verbose=True, **options):
        check_gtab(gtab)
        super().__init__(gtab)
        config = DeconvolutionConfig.from_options(self.conv_kind, **options)
        if config.network.sh_order_max is None:
            config = config.replace(sh_order_max=default_sh_order(_distinct_axes(gtab)))
        self.config = config
        self.device = resolve_device(device)
        self.verbose = verbose
        if response is not None and not isinstance(response, TissueResponse):
            raise TypeError("response must be an esdmri.response.TissueResponse or None, "
                            f"got {type(response).__name__}")
        if response is not None:
            response.validate(gtab)
        self.response = response
        _warn_underdetermined(gtab, self.config.network.sh_order_max)
        self.sphere = self.config.network.sphere()
        self.network = None
        self.training_history = []
        self.training_summary = None

    # -- construction -----------------------------------------------------
    @property
    def normalizes(self):
        """Whether tissue fractions are scaled to sum to 1 (``normalize``).

        ``normalize=None`` (the default) normalises with two or more tissues
        and two or more diffusion-weighted shells (or a non-shelled scheme).
        With WM alone a unit integral would force every voxel onto the WM
        response's b-decay (GM- and CSF-like voxels could not be fitted:
        issue 16 reports a signal error of 0.27 against CSD's 0.10). With b0
        plus one shell the constraint trusts the b0 volumes exactly; on
        small_64D (one b0) the WM + CSF fit then depended on the seed (signal
        error 0.23 to 0.47, CSD 0.23) against 0.22 unconstrained, as in
        MSMT-CSD, which does not constrain the sum either. Unnormalised, the
        fODF keeps its scale (an apparent fibre density) and
        ``volume_fractions`` still sum to 1.
        """
        if self.config.network.normalize is not None:
            return bool(self.config.network.normalize)
        if self.response is None or len(self.response.tissues) < 2:
            return False
        return len(group_shells(self.gtab)[0]) - 1 >= 2

    def _build(self, n_shells=None):
        config = self.config.network
        interpolator = ShellInterpolator(self.gtab, self.sphere.vertices)
        channel_bvals = interpolator.shell_bvals
        if n_shells is not None and n_shells != len(channel_bvals):
            raise ValueError(f"the gtab gives {len(channel_bvals)} input channels, "
                             f"not {n_shells}")
        n_shells = len(channel_bvals)
        torch.manual_seed(self.config.training.seed)
        unet = build_unet(
            self.config.conv_kind, self.sphere, in_channels=n_shells,
            out_channels=len(self.response.tissues), depth=config.depth,
            filter_start=config.filter_start, kernel_size=config.kernel_size,
            spatial_kernel_size=config.spatial_kernel_size,
            spatial_layers=config.spatial_layers, signed_output=config.linear_prior,
            norm=config.norm)
        prior = None
        if config.linear_prior:
            response = self.response.normalized()
            if interpolator.resampled:
                # Virtual shells lie between the response's rows.
                response = response.at_bvals(np.concatenate([[0.0], channel_bvals[1:]]))
                channel_bvals = response.bvals
            prior = linear_deconvolution_operator(response, channel_bvals,
                                                  self.sphere.vertices, config.sh_order_max)
        network = DeconvolutionNetwork(unet, self.sphere, config.sh_order_max,
                                       normalize=self.normalizes, prior=prior).to(self.device)
        self.halo = receptive_radius(network, n_shells, self.sphere.n_vertices,
                                     device=self.device)
        if prior is not None:
            network.zero_correction()
        self.network = network

    # -- fitting ----------------------------------------------------------
    def fit(self, data, mask=None, *, retrain=None):
        """Deconvolve a scan, training on it first when ``epochs`` > 0.

        Parameters
        ----------
        data : ndarray, shape (X, Y, Z, N)
        mask : ndarray of bool, shape (X, Y, Z), optional
            Voxels to train on and deconvolve (default: every voxel with a
            positive b0 signal).
        retrain : bool, optional
            Train even if the model is already trained (default: train only
            an untrained model). Nothing is trained with ``epochs=0``.

        Returns
        -------
        fit : DeconvolutionFit
        """
        data = check_data(data, self.gtab, mask)
        # Voxels of the user's own mask that cannot be fitted are reported.
        warn_dropped = mask is not None
        mask = check_mask(mask, data.shape[:3])
        normalized, mask = normalize_by_b0(data, self.gtab, mask, warn_dropped=warn_dropped)
        if self.response is None:
            self.response = estimate_response(self.gtab, data, mask)
        interpolator = ShellInterpolator(self.gtab, self.sphere.vertices)
        if self.network is None:
            self._build()
        # epochs=0 leaves the head at zero: the linear prior, then refinement.
        training = self.config.training
        if training.epochs and (retrain or (retrain is None and not self.training_history)):
            self.train(ScanBlocks(normalized, mask, self.gtab, interpolator.operator,
                                  training.block_size, self.device),
                       max_steps=training.train_windows)
        coefficients = self._infer(normalized, mask, interpolator)
        if self.config.refinement.refine_steps:
            coefficients = self._refine(coefficients, normalized, mask)
        return DeconvolutionFit(self, coefficients, mask)

    def train(self, source, *, max_steps=None, precision="fp32", compile=False,
              num_workers=0, checkpoint=None, resume=False, context=None):
        """Train the network on the blocks of one scan or many.

        :meth:`fit` calls this on the scan it is given; group training
        (:func:`esdmri.reconst.group.train_group`) on a cohort. The network
        is built first if the model has none (from the source's shells),
        and the response is the model's, or the average of the subjects'
        own and estimated ones (:func:`esdmri.reconst.training.group_response`).
        Each subject's loss uses its own response where it has one.

        Parameters
        ----------
        source : ScanBlocks or SubjectBlocks
            A block source (:mod:`esdmri.reconst.subjects`) on this model's
            grid (``self.sphere``) with blocks of ``block_size``; its
            subjects need the shells of the model's gtab.
        max_steps : int, optional
            Most optimiser steps over all epochs (None: no limit; :meth:`fit`
            passes ``train_windows``).
        precision : {"fp32", "bf16", "fp16"}
            Autocast dtype of the network on CUDA (the loss stays float32;
            fp16 adds a gradient scaler). On CPU training runs in float32:
            bf16 autocast gave no speed-up there, so "bf16" falls back to
            float32 with a warning, and "fp16" is refused.
        compile : bool
            ``torch.compile`` the network (see docs/benchmarks.md for when
            it pays).
        num_workers : int
            DataLoader processes reading blocks (0: read in this process).
        checkpoint : Path, optional
            File rewritten (atomically, by the main process) after every
            epoch.
        resume : bool
            Continue from ``checkpoint`` when it exists; an interrupted run
            resumed to the same ``epochs`` (with as many processes) ends
            with the weights of an uninterrupted one.
        context : DistributedContext, optional
            This process in a torchrun launch whose process group is
            initialised (default: one process).

        Returns
        -------
        self
            Trained, in eval mode, with ``training_history`` (per epoch:
            mean training loss terms, ``total``, the evaluation loss
            ``eval_total``, ``epoch`` and ``lr``) and ``training_summary``
            (:attr:`esdmri.reconst.training.Trainer.summary`: the starting
            and best evaluation losses, whether training fell back to the
            starting weights, and what stopped it).
        """
        if not self.config.training.epochs:
            raise ValueError("epochs is 0, so there is nothing to train: give the model "
                             "epochs=N (e.g. model.with_options(epochs=30))")
        context = context if context is not None else DistributedContext()
        precision = check_training_options(precision, compile, num_workers, self.device)
        if resume and checkpoint is None:
            raise ValueError("resume=True needs a checkpoint file")
        state = None
        if resume and Path(checkpoint).exists():
            state = serialization.read_checkpoint(checkpoint)
            self._check_checkpoint(state, source, checkpoint)
        if state is not None:
            saved = TissueResponse.from_dict(state["response"])
            if self.response is not None and not _same_response(self.response, saved):
                raise ValueError(f"response differs from the one checkpoint {checkpoint} was "
                                 "trained with: resume with the same response, or start "
                                 "afresh")
            self.response = saved
        elif self.response is None:
            if not hasattr(source, "load_subject"):
                raise ValueError("the model has no response and the source cannot estimate "
                                 "one: give the model a response")
            self.response = group_response(source, context)
        responses = [own if own is not None else self.response for own in source.responses]
        for index, (name, response) in enumerate(zip(source.names, responses)):
            if response.tissues != self.response.tissues:
                raise ValueError(f"subjects[{index}] ({name}) has a response of tissues "
                                 f"{response.tissues} but the group's are "
                                 f"{self.response.tissues}: one network needs the same tissues "
                                 "for every subject")
            response.validate(source.gtabs[index])
        if self.network is None:
            self._build(source.n_shells)
        config = self.config.training
        sh_order_max = self.config.network.sh_order_max
        trainer = Trainer(
            self.network, source,
            [build_forward_model(response, gtab, sh_order_max, self.device)
             for response, gtab in zip(responses, source.gtabs)],
            build_fodf_sampler(sh_order_max, self.device), config.loss_weights,
            epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
            patience=config.patience, seed=config.seed,
            max_blocks=None if max_steps is None else max_steps * config.batch_size,
            mask_fraction=config.mask_fraction, halo=self.halo,
            warmup_steps=config.warmup_steps, context=context,
            autocast_dtype=PRECISIONS[precision], compile=compile, num_workers=num_workers,
            verbose=self.verbose)
        if state is not None:
            trainer.restore(state)
        identity = {"model": type(self).__name__, "config": self.config.to_dict(),
                    "subjects": list(source.names),
                    "response": self.response.to_dict()}
        save_state = None
        if checkpoint is not None:
            def save_state(trainer_state):
                serialization.write_checkpoint({**identity, **trainer_state}, checkpoint)
        self.training_history = trainer.run(save_state)
        self.training_summary = trainer.summary
        return self

    def _check_checkpoint(self, state, source, checkpoint):
        """Refuse a checkpoint written with other settings (only epochs may change)."""
        ours = self.config.to_dict()
        # An option the checkpoint lacks (written before it existed) had its default.
        theirs = {**option_defaults(), **state["config"]}
        differing = sorted(name for name in ours
                           if name != "epochs" and theirs.get(name) != ours[name])
        if state["model"] != type(self).__name__:
            differing.insert(0, "model")
        if state["subjects"] != list(source.names):
            differing.append("subjects")
        if differing:
            raise ValueError(f"checkpoint {checkpoint} was written with other settings "
                             f"({', '.join(differing)}"
                             "): resume with the same settings (only epochs may change), or "
                             "start afresh without resume")

    def with_gtab(self, gtab):
        """This trained model for scans of another acquisition with the same shells.

        Parameters
        ----------
        gtab : GradientTable
            The scans' acquisition; its shells must match the model's
            response, its directions may differ (signals are interpolated
            onto the network's grid).

        Returns
        -------
        model
            A copy sharing this model's network, with ``gtab``.
        """
        check_gtab(gtab)
        if self.response is not None:
            self.response.validate(gtab)
        model = copy.copy(self)
        model.gtab = gtab
        return model

    def with_options(self, **options):
        """This model with other training, tiling or refinement hyperparameters.

        Parameters
        ----------
        **options
            Keyword arguments of the constructor, e.g. ``refine_steps=0``
            or ``batch_size=8`` (blocks per network pass at inference).
            Those that shape the network (``sh_order_max``, ``nside``,
            ``depth``, ...) cannot change once it is built.

        Returns
        -------
        model
            A copy sharing this model's network (trained or not), with the
            options validated as the constructor validates them.
        """
        fixed = sorted(set(options) & {f.name for f in dataclasses.fields(NetworkConfig)})
        if fixed and self.network is not None:
            raise ValueError(f"{', '.join(fixed)} shape the network, which is already built: "
                             "make a new model to change them")
        config = self.config.replace(**options)
        model = copy.copy(self)
        model.config = config
        model.sphere = config.network.sphere()
        return model

    def _infer(self, normalized, mask, interpolator):
        core = self.config.training.block_size
        starts, pad_width = inference_windows(mask.shape, mask, core, self.halo)
        padded = np.pad(normalized, pad_width + [(0, 0)])
        padded_mask = np.pad(mask, pad_width)
        source = ScanBlocks(padded, padded_mask, self.gtab, interpolator.operator,
                            core + 2 * self.halo, self.device)
        coefficients = predict_coefficients(self.network, source, starts, pad_width, core,
                                            self.halo, self.config.training.batch_size)
        coefficients[~mask] = 0
        return coefficients

    def _refine(self, coefficients, normalized, mask):
        order, config = self.config.network.sh_order_max, self.config.refinement
        refined, self.refine_history = refine_coefficients(
            coefficients, normalized, mask,
            build_forward_model(self.response, self.gtab, order, self.device).matrix,
            build_fodf_sampler(order, self.device), n_coeffs(order), order,
            self.config.training.loss_weights, steps=config.refine_steps, lr=config.refine_lr,
            total_variation=config.refine_tv, smoothing=config.refine_smoothing,
            similarity=config.refine_similarity, tolerance=config.refine_tolerance,
            normalize=self.normalizes, verbose=self.verbose)
        return refined

    # -- persistence ------------------------------------------------------
    def save(self, path, force=False):
        """Write weights, configuration, response and versions to one file.

        The layout is :func:`esdmri.serialization.write_model_file`'s;
        :func:`load_model` reads it back.

        Parameters
        ----------
        path : str or Path
        force : bool
            Overwrite an existing file.
        """
        if self.network is None:
            raise ValueError("the model has not been fitted yet: call model.fit(data, mask) "
                             "first")
        kind = next(name for name, cls in MODEL_CLASSES.items() if isinstance(self, cls))
        serialization.write_model_file(
            path, kind=kind, config=self.config.to_dict(), response=self.response,
            gtab=self.gtab, halo=self.halo, state_dict=self.network.state_dict(),
            training_history=self.training_history, force=force)

    @classmethod
    def _from_saved(cls, saved, gtab, device, verbose):
        """The trained model of the contents of a model file."""
        config = DeconvolutionConfig.from_dict(saved["config"])
        model = cls(gtab, saved["response"], device=device, verbose=verbose,
                    **config.options())
        model._build()
        model.network.load_state_dict(saved["state_dict"])
        model.training_history = saved["training_history"]
        return model


class ESDModel(_DeconvolutionModel):
    """Equivariant Spherical Deconvolution (Elaldi et al. 2021).

    Voxel-wise: spherical Chebyshev convolutions on a HEALPix grid, so each
    voxel is deconvolved from its own signal only. Parameters as
    :class:`RTESDModel`.
    """

    conv_kind = "spherical"


class RTESDModel(_DeconvolutionModel):
    """Roto-Translation Equivariant Spherical Deconvolution (Elaldi et al. 2023).

    E(3) x SO(3) convolutions: a Chebyshev filter on the sphere times an
    isotropic 3D kernel, so neighbouring voxels inform each fODF while the
    network stays equivariant to grid translations, rotations and reflections
    and to voxel-wise sphere rotations.

    Parameters
    ----------
    gtab : dipy.core.gradients.GradientTable
    response : esdmri.response.TissueResponse, optional
        Tissue responses matching the gtab's shells. Estimated from the data
        at fit time when None, by :func:`esdmri.response.estimate_response`
        (as many tissues as the shells separate: WM and CSF from b0 plus one
        shell, WM, GM and CSF from two or more shells or a non-shelled scan).
    device : str
        "cpu", "cuda" or "cuda:N".
    verbose : bool
        Show a progress bar.
    OPTIONS

    The options (all keyword-only) are the fields of
    :class:`esdmri.reconst.config.NetworkConfig`, :class:`~esdmri.reconst.config.TrainingConfig`
    and :class:`~esdmri.reconst.config.RefinementConfig`, with their defaults;
    ``model.config`` holds them (frozen), :meth:`with_options` changes them.
    """

    # Not "mixed": UNet(conv="mixed") has E(3) x SO(3) convolutions at every
    # level, RT-ESD only in its stem. Model files written before this name
    # hold "mixed"; load_model takes the kind from the class, not the file.
    conv_kind = "mixed-stem"


# The options' entries come from the configuration classes, their one source.
RTESDModel.__doc__ = RTESDModel.__doc__.replace("    OPTIONS", "    " + options_docstring())


class CESDModel(_DeconvolutionModel):
    """Concatenated-neighbourhood ESD: the spatial neighbours' signals stacked as
    extra input channels of a spherical network (baseline of the RT-ESD paper).
    Parameters as :class:`RTESDModel`."""

    conv_kind = "concat"


MODEL_CLASSES = {"esd": ESDModel, "rtesd": RTESDModel, "cesd": CESDModel}


def load_model(path, gtab=None, device="cpu", verbose=True):
    """Read a model written by :meth:`RTESDModel.save` (or by group training).

    Parameters
    ----------
    path : str or Path
    gtab : GradientTable, optional
        Gradient table of the scans the model will be applied to (default:
        the training scan's). Its shells must match the saved response's;
        its directions may differ, since signals are re-interpolated onto
        the HEALPix grid.
    device : str
    verbose : bool

    Returns
    -------
    model : ESDModel, RTESDModel or CESDModel
        Trained: ``model.fit(data, mask)`` only infers.
    """
    saved = serialization.read_model_file(path)
    model_class = MODEL_CLASSES[saved["model"]]
    return model_class._from_saved(saved, saved["gtab"] if gtab is None else gtab, device,
                                   verbose)


def _distinct_axes(gtab):
    """Distinct diffusion-weighted gradient axes of a gtab (0 without any)."""
    weighted = ~np.asarray(gtab.b0s_mask, dtype=bool)
    if not weighted.any():
        return 0
    return count_unique_axes(np.asarray(gtab.bvecs)[weighted])


def _warn_underdetermined(gtab, sh_order_max):
    """Warn when the WM fODF has more SH coefficients than distinct directions.

    Like DIPY's CSD: the fit is then underdetermined and rests on the
    non-negativity and sparsity terms.
    """
    n_axes = _distinct_axes(gtab)
    if n_axes and n_coeffs(sh_order_max) > n_axes:
        lower = max(2, sh_order_max - 2)
        while lower > 2 and n_coeffs(lower) > n_axes:
            lower -= 2
        warnings.warn(
            f"sh_order_max={sh_order_max} has {n_coeffs(sh_order_max)} SH coefficients but "
            f"the gtab has only {n_axes} distinct gradient directions: the fODF is "
            f"underdetermined by the signal and rests on the non-negativity and sparsity "
            f"terms; sh_order_max={lower} ({n_coeffs(lower)} coefficients) is determined",
            UserWarning, stacklevel=4)


def _same_response(a, b):
    return (a.tissues == b.tissues and np.allclose(a.bvals, b.bvals)
            and all(x.shape == y.shape and np.allclose(x, y)
                    for x, y in zip(a.coefficients, b.coefficients)))
