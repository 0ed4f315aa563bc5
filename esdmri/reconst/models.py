"""DIPY-style unsupervised deconvolution models: ESD, RT-ESD and C-ESD.

``model = RTESDModel(gtab, response); fit = model.fit(data, mask)`` trains a
U-Net on the scan itself (no labels: the loss asks the fODFs, convolved with
the response functions, to reproduce the measured signal) and returns a fit
with ``shm_coeff``, ``odf``, ``predict``, ``volume_fractions`` and ``peaks``.
"""

import copy
import dataclasses
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from dipy.reconst.base import ReconstModel

from .. import serialization
from ..response import TissueResponse, estimate_response
from ..shm import ShellInterpolator, count_unique_axes, group_shells, n_coeffs
from ..sphere import HealpixSphere
from .fit import DeconvolutionFit
from .inputs import check_data, check_gtab, check_mask, normalize_by_b0, resolve_device
from .losses import LossWeights
from .network import (DeconvolutionNetwork, build_fodf_sampler, build_forward_model,
                      build_unet, linear_deconvolution_operator)
from .refine import refine_coefficients
from .subjects import ScanBlocks
from .tiling import inference_windows, receptive_radius
from .training import (PRECISIONS, DistributedContext, Trainer, check_training_options,
                       group_response, predict_coefficients)


@dataclass
class DeconvolutionConfig:
    """Hyperparameters of a deconvolution model (saved with its weights)."""

    conv_kind: str
    sh_order_max: int = 8
    nside: int = 4
    hemisphere: bool = True
    depth: int = 2
    filter_start: int = 8
    kernel_size: int = 3
    spatial_kernel_size: int = 3
    spatial_layers: int = 1
    block_size: int = 8
    normalize: Optional[bool] = None
    linear_prior: bool = True
    refine_steps: int = 300
    refine_lr: float = 1e-3
    refine_tv: float = 20.0
    refine_smoothing: float = 1e-3
    refine_similarity: bool = False
    refine_tolerance: float = 1e-3
    loss_weights: LossWeights = field(default_factory=LossWeights)
    epochs: int = 30
    train_windows: int = 100
    batch_size: int = 1
    lr: float = 1.7e-3
    patience: int = 3
    seed: int = 0


class _DeconvolutionModel(ReconstModel):
    """Shared machinery of the ESD family; subclasses pick the convolution."""

    conv_kind = None

    def __init__(self, gtab, response=None, *, sh_order_max=8, nside=4, hemisphere=True,
                 depth=2, filter_start=8, kernel_size=3, spatial_kernel_size=3,
                 spatial_layers=1, block_size=8, normalize=None, linear_prior=True,
                 refine_steps=300, refine_lr=1e-3, refine_tv=20.0, refine_smoothing=1e-3,
                 refine_similarity=False, refine_tolerance=1e-3, sparsity=1e-4,
                 nonnegativity=0.1, total_variation=0.0, epochs=30, train_windows=100,
                 batch_size=1, lr=1.7e-3, patience=3, device="cpu", seed=0, verbose=True):
        check_gtab(gtab)
        super().__init__(gtab)
        self.device = resolve_device(device)
        self.verbose = verbose
        if response is not None and not isinstance(response, TissueResponse):
            raise TypeError("response must be an esdmri.response.TissueResponse or None, "
                            f"got {type(response).__name__}")
        if response is not None:
            response.validate(gtab)
        if normalize not in (None, True, False):
            raise ValueError(f"normalize must be None, True or False, got {normalize!r}")
        self.response = response
        _warn_underdetermined(gtab, sh_order_max)
        self.config = DeconvolutionConfig(
            conv_kind=self.conv_kind, sh_order_max=sh_order_max, nside=nside,
            hemisphere=hemisphere, depth=depth, filter_start=filter_start,
            kernel_size=kernel_size, spatial_kernel_size=spatial_kernel_size,
            spatial_layers=spatial_layers, block_size=block_size, normalize=normalize,
            linear_prior=linear_prior, refine_steps=refine_steps, refine_lr=refine_lr,
            refine_tv=refine_tv, refine_smoothing=refine_smoothing,
            refine_similarity=refine_similarity, refine_tolerance=refine_tolerance,
            loss_weights=LossWeights(sparsity=sparsity, nonnegativity=nonnegativity,
                                     total_variation=total_variation),
            epochs=epochs, train_windows=train_windows, batch_size=batch_size, lr=lr,
            patience=patience, seed=seed)
        self.sphere = _check_config(self.config)
        self.network = None
        self.training_history = []

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
        if self.config.normalize is not None:
            return bool(self.config.normalize)
        if self.response is None or len(self.response.tissues) < 2:
            return False
        return len(group_shells(self.gtab)[0]) - 1 >= 2

    def _build(self, n_shells=None):
        config = self.config
        interpolator = ShellInterpolator(self.gtab, self.sphere.vertices)
        channel_bvals = interpolator.shell_bvals
        if n_shells is not None and n_shells != len(channel_bvals):
            raise ValueError(f"the gtab gives {len(channel_bvals)} input channels, "
                             f"not {n_shells}")
        n_shells = len(channel_bvals)
        torch.manual_seed(config.seed)
        unet = build_unet(
            config.conv_kind, self.sphere, in_channels=n_shells,
            out_channels=len(self.response.tissues), depth=config.depth,
            filter_start=config.filter_start, kernel_size=config.kernel_size,
            spatial_kernel_size=config.spatial_kernel_size,
            spatial_layers=config.spatial_layers, signed_output=config.linear_prior)
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
        """Train on this scan (unless already trained) and deconvolve it.

        Parameters
        ----------
        data : ndarray, shape (X, Y, Z, N)
        mask : ndarray of bool, shape (X, Y, Z), optional
            Voxels to train on and deconvolve (default: every voxel with a
            positive b0 signal).
        retrain : bool, optional
            Train even if the model is already trained (default: train only
            an untrained model).

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
        if self.config.epochs and (retrain or (retrain is None and not self.training_history)):
            self.train(ScanBlocks(normalized, mask, self.gtab, interpolator.operator,
                                  self.config.block_size, self.device),
                       max_steps=self.config.train_windows)
        coefficients = self._infer(normalized, mask, interpolator)
        if self.config.refine_steps:
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
            mean loss terms, ``total``, ``epoch`` and ``lr``).
        """
        context = context if context is not None else DistributedContext()
        precision = check_training_options(precision, compile, num_workers, self.device)
        if resume and checkpoint is None:
            raise ValueError("resume=True needs a checkpoint file")
        state = None
        if resume and Path(checkpoint).exists():
            state = serialization.read_checkpoint(checkpoint)
            self._check_checkpoint(state, source, checkpoint)
        if state is not None:
            saved = serialization.response_from_dict(state["response"])
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
        config = self.config
        sh_order_max = config.sh_order_max
        trainer = Trainer(
            self.network, source,
            [build_forward_model(response, gtab, sh_order_max, self.device)
             for response, gtab in zip(responses, source.gtabs)],
            build_fodf_sampler(sh_order_max, self.device), config.loss_weights,
            epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
            patience=config.patience, seed=config.seed,
            max_blocks=None if max_steps is None else max_steps * config.batch_size,
            context=context, autocast_dtype=PRECISIONS[precision], compile=compile,
            num_workers=num_workers, verbose=self.verbose)
        if state is not None:
            trainer.restore(state)
        identity = {"model": type(self).__name__, "config": config_to_dict(config),
                    "subjects": list(source.names),
                    "response": serialization.response_to_dict(self.response)}
        save_state = None
        if checkpoint is not None:
            def save_state(trainer_state):
                serialization.write_checkpoint({**identity, **trainer_state}, checkpoint)
        self.training_history = trainer.run(save_state)
        return self

    def _check_checkpoint(self, state, source, checkpoint):
        """Refuse a checkpoint written with other settings (only epochs may change)."""
        ours = config_to_dict(self.config)
        differing = sorted(name for name in ours
                           if name != "epochs" and state["config"].get(name) != ours[name])
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
        weights = {name: options.pop(name) for name in LOSS_WEIGHT_OPTIONS
                   if name in options}
        fields = {f.name for f in dataclasses.fields(DeconvolutionConfig)} - {"conv_kind",
                                                                               "loss_weights"}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; expected some of "
                            f"{sorted(fields | set(LOSS_WEIGHT_OPTIONS))}")
        fixed = sorted(set(options) & set(NETWORK_OPTIONS))
        if fixed and self.network is not None:
            raise ValueError(f"{', '.join(fixed)} shape the network, which is already built: "
                             "make a new model to change them")
        config = dataclasses.replace(
            self.config, loss_weights=dataclasses.replace(self.config.loss_weights, **weights),
            **options)
        model = copy.copy(self)
        model.sphere = _check_config(config)
        model.config = config
        return model

    def _infer(self, normalized, mask, interpolator):
        core = self.config.block_size
        starts, pad_width = inference_windows(mask.shape, mask, core, self.halo)
        padded = np.pad(normalized, pad_width + [(0, 0)])
        padded_mask = np.pad(mask, pad_width)
        source = ScanBlocks(padded, padded_mask, self.gtab, interpolator.operator,
                            core + 2 * self.halo, self.device)
        coefficients = predict_coefficients(self.network, source, starts, pad_width, core,
                                            self.halo, self.config.batch_size)
        coefficients[~mask] = 0
        return coefficients

    def _refine(self, coefficients, normalized, mask):
        config = self.config
        refined, self.refine_history = refine_coefficients(
            coefficients, normalized, mask,
            build_forward_model(self.response, self.gtab, config.sh_order_max,
                                self.device).matrix,
            build_fodf_sampler(config.sh_order_max, self.device),
            n_coeffs(config.sh_order_max), config.sh_order_max, config.loss_weights,
            steps=config.refine_steps, lr=config.refine_lr,
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
            path, kind=kind, config=config_to_dict(self.config), response=self.response,
            gtab=self.gtab, halo=self.halo, state_dict=self.network.state_dict(),
            training_history=self.training_history, force=force)

    @classmethod
    def _from_saved(cls, saved, gtab, device, verbose):
        """The trained model of the contents of a model file."""
        config = dict(saved["config"])
        config.pop("conv_kind")
        weights = config.pop("loss_weights")  # intensity is always 1
        model = cls(gtab, saved["response"], device=device, verbose=verbose, **config,
                    **{name: weights[name] for name in LOSS_WEIGHT_OPTIONS})
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
    sh_order_max : int
        Even SH order of the WM fODF.
    nside : int
        HEALPix resolution of the grid (a power of 2).
    hemisphere : bool
        Use one vertex per antipodal pair (half the cost, same result).
    depth : int
        U-Net levels; each level halves nside.
    filter_start : int
        Channels of the first level, doubled at each level.
    kernel_size : int
        Number of Chebyshev polynomials of the spherical filters.
    spatial_kernel_size : int
        Odd edge of the isotropic spatial kernel.
    spatial_layers : int
        E(3) x SO(3) convolutions before the spherical U-Net; the network
        sees ``spatial_layers * (spatial_kernel_size // 2)`` voxels around
        each voxel (the published patch of 3 is 1 layer of kernel 3).
    block_size : int
        Edge of the training windows and of the inference core blocks.
    normalize : bool or None
        Scale the tissue coefficients to volume fractions summing to 1.
        None (default): with two or more tissues and two or more
        diffusion-weighted shells; single-shell fits keep their scale (see
        :attr:`normalizes`).
    linear_prior : bool
        The network corrects a regularised least-squares deconvolution of the
        signal instead of producing the fODFs from scratch (its head starts at
        zero, so training starts from a fit that explains the signal).
        Trained from scratch (False), the networks underfit on a CPU budget;
        see docs/benchmarks.md.
    refine_steps : int
        Most steps of descent of the same loss, plus a total variation
        between neighbouring voxels (``refine_tv``), from the network's
        output (:mod:`esdmri.reconst.refine`; rotation equivariant). 0 keeps
        the network's output as is. Where the accuracy comes from:
        docs/benchmarks.md, "Spatial context" (dev phantoms) and the held-out
        section (the old voxel-wise refinement's test scores).
    refine_lr : float
        Step size of the refinement.
    refine_tv : float
        Weight of the total variation between neighbouring voxels' tissue
        coefficients inside the refinement, relative to the Gaussian
        likelihood of the signal with a noise level estimated from the data
        (so one value serves every SNR; 0: voxel by voxel).
    refine_smoothing : float
        Coefficient-difference scale below which that total variation is
        quadratic (it is linear above).
    refine_similarity : bool
        Couple neighbours less where their measured signals differ by more
        than noise (:func:`esdmri.reconst.refine.signal_similarity`).
    refine_tolerance : float
        Stop the refinement once its objective falls by less than this
        fraction in 10 steps (0: always ``refine_steps`` steps).
    sparsity, nonnegativity, total_variation : float
        Weights of the loss terms (the signal fit has weight 1).
    epochs : int
        Training passes over the mask. 0 trains nothing: the fODFs are the
        linear prior's regularised least-squares fit refined voxel-wise by
        ``refine_steps`` of the loss (the ablation without a network; needs
        ``linear_prior=True``).
    train_windows : int
        Most optimiser steps over all epochs, so a large scan trains for
        less than one pass (measured on the dev phantoms: training does not
        bring the loss below the linear prior's on a CPU budget;
        docs/benchmarks.md, "Spatial context").
    batch_size : int
        Windows per optimiser step.
    lr : float
        Adam learning rate.
    patience : int
        Plateau epochs before halving the learning rate; twice as many stop
        training.
    device : str
        "cpu", "cuda" or "cuda:N".
    seed : int
        Seeds the weights and the window order (training is deterministic on CPU).
    verbose : bool
        Show a progress bar.
    """

    conv_kind = "mixed"


class CESDModel(_DeconvolutionModel):
    """Concatenated-neighbourhood ESD: the spatial neighbours' signals stacked as
    extra input channels of a spherical network (baseline of the RT-ESD paper).
    Parameters as :class:`RTESDModel`."""

    conv_kind = "concat"


MODEL_CLASSES = {"esd": ESDModel, "rtesd": RTESDModel, "cesd": CESDModel}

# Constructor options that become the loss weights.
LOSS_WEIGHT_OPTIONS = ("sparsity", "nonnegativity", "total_variation")

# Configuration fields that shape the network's weights.
NETWORK_OPTIONS = ("sh_order_max", "nside", "hemisphere", "depth", "filter_start",
                   "kernel_size", "spatial_kernel_size", "spatial_layers", "normalize",
                   "linear_prior")


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


def _check_config(config):
    """Validate hyperparameters before any work; returns the grid sphere."""
    if config.sh_order_max < 2 or config.sh_order_max % 2:
        raise ValueError(f"sh_order_max must be an even integer >= 2, got {config.sh_order_max}")
    sphere = HealpixSphere(config.nside, hemisphere=config.hemisphere)
    sphere.pyramid(config.depth)  # raises if nside is too small for the depth
    # The grid must hold more samples than coefficients for the least-squares
    # projection of the WM function onto SH to be well posed.
    if n_coeffs(config.sh_order_max) > sphere.n_vertices:
        raise ValueError(
            f"sh_order_max={config.sh_order_max} needs {n_coeffs(config.sh_order_max)} "
            f"coefficients but the grid (nside={config.nside}, hemisphere="
            f"{config.hemisphere}) has only {sphere.n_vertices} vertices: raise nside")
    if config.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {config.block_size}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    epochs = config.epochs
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if epochs == 0 and not config.linear_prior:
        raise ValueError("epochs=0 needs linear_prior=True: an untrained network without "
                         "the prior outputs noise")
    steps = config.refine_steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"refine_steps must be an integer >= 0, got {steps!r}")
    if not config.refine_lr > 0:
        raise ValueError(f"refine_lr must be > 0, got {config.refine_lr}")
    for name in ("refine_tv", "refine_tolerance"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    windows = config.train_windows
    if isinstance(windows, bool) or not isinstance(windows, (int, np.integer)) or windows < 1:
        raise ValueError(f"train_windows must be an integer >= 1, got {windows!r}")
    if not config.refine_smoothing > 0:
        raise ValueError(f"refine_smoothing must be > 0, got {config.refine_smoothing}")
    return sphere


def _warn_underdetermined(gtab, sh_order_max):
    """Warn when the WM fODF has more SH coefficients than distinct directions.

    Like DIPY's CSD: the fit is then underdetermined and rests on the
    non-negativity and sparsity terms.
    """
    weighted = ~np.asarray(gtab.b0s_mask, dtype=bool)
    if not weighted.any():
        return
    n_axes = count_unique_axes(np.asarray(gtab.bvecs)[weighted])
    if n_coeffs(sh_order_max) > n_axes:
        lower = max(2, sh_order_max - 2)
        while lower > 2 and n_coeffs(lower) > n_axes:
            lower -= 2
        warnings.warn(
            f"sh_order_max={sh_order_max} has {n_coeffs(sh_order_max)} SH coefficients but "
            f"the gtab has only {n_axes} distinct gradient directions: the fODF is "
            f"underdetermined by the signal and rests on the non-negativity and sparsity "
            f"terms; sh_order_max={lower} ({n_coeffs(lower)} coefficients) is determined",
            UserWarning, stacklevel=4)


def config_to_dict(config):
    """A JSON-ready dict of a DeconvolutionConfig."""
    return asdict(config)


def _same_response(a, b):
    return (a.tissues == b.tissues and np.allclose(a.bvals, b.bvals)
            and all(x.shape == y.shape and np.allclose(x, y)
                    for x, y in zip(a.coefficients, b.coefficients)))
