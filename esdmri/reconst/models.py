"""DIPY-style unsupervised deconvolution models: ESD, RT-ESD and C-ESD.

``model = RTESDModel(gtab, response); fit = model.fit(data, mask=mask)`` returns a
fit with ``shm_coeff``, ``odf``, ``predict``, ``volume_fractions`` and
``peaks``. The loss is unsupervised (the fODFs, convolved with the response
functions, must reproduce the measured signal). By default no network is
trained on the scan (``epochs=0``): the network's linear prior, computed without
building the per-scan network, is corrected by a small network shipped with
esdmri (pretrained on simulated scans of many acquisitions, reading the prior's
fODF so that it serves any acquisition; each model class has its own, of its own
architecture: :mod:`esdmri.reconst.pretrained`), then
refined by the spatially coupled descent of the loss. ``pretrained=False``
gives the network-free fit. With ``epochs=N`` the shipped correction is first
fine-tuned on the scan itself by the scan's unsupervised loss
(:mod:`esdmri.reconst.finetune`); with ``pretrained=False, epochs=N`` a U-Net
reading the signal is trained on the scan from scratch, as in the papers.
Fits leave the model as it was, except for the network that training gives it.
"""

import copy
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from dipy.reconst.base import ReconstModel

from .. import serialization
from ..deprecation import keyword_only_from
from ..response import TissueResponse, estimate_response, low_shell
from ..shm import ShellInterpolator, count_weighted_shells, group_shells, n_coeffs
from .config import (DEBIAS_METHODS, RICIAN_MODEL, HIGH_SHELL_SH_ORDER, LOW_SHELL_SH_ORDER,
                     LOW_SHELL_SPARSITY, DeconvolutionConfig, NetworkConfig, canonical_conv_kind,
                     default_isotropic_charges, default_refine_tv, default_sh_order,
                     default_sparsity, option_defaults, options_docstring)
from .finetune import (HeldOutError, finetune_correction, holdout_volumes, retained_scan,
                       weights_origin)
from .fit import DeconvolutionFit
from .inference import network_coefficients, prior_coefficients, prior_operator
from .inputs import (PreparedScan, check_gtab, check_scan, count_weighted_measurements,
                     debias_magnitudes, noise_floor_variance,
                     normalize_by_b0, resolve_device, super_resolved_shell,
                     voxel_noise_sigma)
from .network import (DeconvolutionNetwork, build_fodf_sampler, build_forward_model,
                      build_unet)
from .pretrained import PriorCorrection, apply_correction, load_correction
from .refine import refine_coefficients
from .subjects import ScanBlocks
from .tiling import receptive_radius
from .training import (PRECISIONS, DistributedContext, Trainer, check_training_options,
                       group_response)

def _response_type_message(response):
    """Why ``response`` is not a TissueResponse, and which converter DIPY users need."""
    message = ("response must be an esdmri.response.TissueResponse or None, got "
               f"{type(response).__name__}")
    if isinstance(response, tuple):
        # auto_response_ssst(gtab, data)[0] is DIPY's (evals, S0) tensor response.
        return (f"{message}: for DIPY's single-shell (evals, S0) response of "
                "auto_response_ssst use TissueResponse.from_dipy_ssst(gtab, data), which "
                "runs the same estimate and keeps its shell's b-value")
    if type(response).__name__ == "MultiShellResponse":
        return (f"{message}: for DIPY's multi-shell responses use "
                "TissueResponse.from_dipy_msmt(gtab, data, mask)")
    return message


class _DeconvolutionModel(ReconstModel):
    """Shared machinery of the ESD family; subclasses pick the convolution.

    What a model keeps between fits is data-independent, as in DIPY: the
    gtab, the options, the response it was given (or that its network was
    trained with), and a trained or loaded network. A fit's own response
    (estimated from its scan when the model has none), its refinement history
    and its coefficients belong to the fit, so ``model.fit(a)`` then
    ``model.fit(b)`` gives the fit of ``b`` that a fresh model gives.
    """

    conv_kind = None
    # What ``pretrained=None`` means: the class's shipped correction (True)
    # where it was not worse than the network-free fit on any dev phantom
    # (docs/benchmarks.md, "Pretrained network"), else the network-free fit.
    pretrained_by_default = True

    def __init__(self, gtab, response=None, *, device="cpu", verbose=True, **options):
        check_gtab(gtab)
        super().__init__(gtab)
        self.config = scan_defaults(DeconvolutionConfig.from_options(self.conv_kind, **options),
                                    gtab)
        self.device = resolve_device(device)
        self.verbose = verbose
        self.response = _checked_response(response, gtab)
        _warn_underdetermined(gtab, self.config.network.sh_order_max)
        _warn_low_shell_tissues(gtab, self.response, self.config)
        self.sphere = self.config.network.sphere()
        self.network = None
        self.halo = None
        self._correction = (None, None)
        # The weights a fine-tuned correction started from (file and SHA-256);
        # None while the correction is the pretrained weights as loaded.
        self.correction_origin = None
        self.pretrained_correction()  # a bad weights file fails here, not in a fit
        self.training_history = []
        self.training_summary = None

    # -- construction -----------------------------------------------------
    @property
    def normalizes(self):
        """Whether fits with the model's response scale tissue fractions to sum to 1.

        A fit's own answer (its response may be estimated from its scan) is
        :attr:`DeconvolutionFit.normalizes`.

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
        return self.normalizes_with(self.response)

    def normalizes_with(self, response):
        """Whether fits with ``response`` scale their tissue fractions to sum to 1.

        See :attr:`normalizes`; False for ``response=None``.
        """
        if self.config.network.normalize is not None:
            return bool(self.config.network.normalize)
        if response is None or len(response.tissues) < 2:
            return False
        return len(group_shells(self.gtab)[0]) - 1 >= 2

    def with_response(self, response):
        """This model with an explicit response for its fits.

        Parameters
        ----------
        response : TissueResponse or None
            Matching the gtab's shells; None: each fit estimates its own.

        Returns
        -------
        model
            A copy sharing this model's network (trained or not, kept as it
            is: its linear prior was built with the response it was trained
            with), whose fits and refinement use ``response``.
        """
        model = copy.copy(self)
        model.response = _checked_response(response, self.gtab)
        _warn_low_shell_tissues(self.gtab, model.response, model.config)
        return model

    def _new_network(self, response, n_shells=None):
        """An untrained network for ``response`` and its receptive radius."""
        config = self.config.network
        interpolator = ShellInterpolator(self.gtab, self.sphere.vertices)
        if n_shells is not None and n_shells != len(interpolator.shell_bvals):
            raise ValueError(f"the gtab gives {len(interpolator.shell_bvals)} input channels, "
                             f"not {n_shells}")
        n_shells = len(interpolator.shell_bvals)
        torch.manual_seed(self.config.training.seed)
        unet = build_unet(
            self.config.conv_kind, self.sphere, in_channels=n_shells,
            out_channels=len(response.tissues), depth=config.depth,
            filter_start=config.filter_start, kernel_size=config.kernel_size,
            spatial_kernel_size=config.spatial_kernel_size,
            spatial_layers=config.spatial_layers, signed_output=config.linear_prior,
            norm=config.norm)
        prior = None
        if config.linear_prior:
            prior = prior_operator(response, interpolator, self.sphere.vertices,
                                   config.sh_order_max)
        network = DeconvolutionNetwork(unet, self.sphere, config.sh_order_max,
                                       normalize=self.normalizes_with(response),
                                       prior=prior).to(self.device)
        halo = receptive_radius(network, n_shells, self.sphere.n_vertices, device=self.device)
        if prior is not None:
            network.zero_correction()
        return network, halo

    def build_network(self, response=None):
        """Give the model an untrained network (to train it with :meth:`train`).

        :meth:`fit` and :meth:`train` build one when they need it; a model
        with ``epochs=0`` needs none (its fits start from the linear prior).

        Parameters
        ----------
        response : TissueResponse, optional
            The response the network is built (and will be trained) with;
            it becomes the model's. Default: the model's.

        Returns
        -------
        self
        """
        if response is not None:
            self.response = _checked_response(response, self.gtab)
        if self.response is None:
            raise ValueError("the model has no response to build its network with: give "
                             "build_network a response")
        self.network, self.halo = self._new_network(self.response)
        return self

    # -- the steps of a fit -----------------------------------------------
    def prepare(self, data, *, mask=None):
        """Check a scan, normalise it by its b0 and find its response.

        The first step of :meth:`fit`; the others read what it returns, so
        a scan is checked once per fit.

        Parameters
        ----------
        data : ndarray, shape (X, Y, Z, N)
        mask : ndarray of bool, shape (X, Y, Z), optional
            Voxels to deconvolve (default: every voxel with a positive b0
            signal); those of a given mask without one are left out with a
            warning.

        Returns
        -------
        scan : esdmri.reconst.inputs.PreparedScan
            With the model's response, or one estimated from the scan
            (:func:`esdmri.response.estimate_response`) when the model has
            none; the model is left as it was.
        """
        data, checked = check_scan(data, self.gtab, mask)
        noise_floor = self.config.network.noise_floor
        signal, noise_sigma = data, None
        if noise_floor in DEBIAS_METHODS:
            signal = debias_magnitudes(data, checked,
                                       noise_floor_variance(data, self.gtab, checked),
                                       method=noise_floor)
        normalized, checked = normalize_by_b0(signal, self.gtab, checked,
                                              warn_dropped=mask is not None)
        if noise_floor == RICIAN_MODEL:
            noise_sigma = voxel_noise_sigma(data, self.gtab, checked,
                                            noise_floor_variance(data, self.gtab, checked))
        response = self.response
        if response is None:
            # With the floor taken off, the response is fitted to the magnitudes as
            # Rician means: a log-linear fit of debiased signals (zeros along the
            # fibre at high b) gave a response across the fibres on the dev set.
            response = estimate_response(self.gtab, data, checked,
                                          sh_order_max=self.config.network.sh_order_max,
                                          rician=noise_floor is not None)
        return PreparedScan(self.gtab, normalized, checked, response,
                            ShellInterpolator(self.gtab, self.sphere.vertices), noise_sigma)

    def prior_coefficients(self, scan):
        """The linear prior's tissue coefficients of a prepared scan, without a network.

        What an untrained network with ``linear_prior=True`` outputs (its
        correction starts at zero): :func:`esdmri.reconst.inference.prior_coefficients`.

        Parameters
        ----------
        scan : PreparedScan
            From :meth:`prepare`.

        Returns
        -------
        coefficients : ndarray, float32, shape (X, Y, Z, C_total)
            WM SH coefficients (non-legacy descoteaux07) then one l = 0
            coefficient per isotropic tissue; zero outside ``scan.mask``.
        """
        order = self.config.network.sh_order_max
        operator = prior_operator(scan.response, scan.interpolator, self.sphere.vertices,
                                  order)
        return prior_coefficients(scan.normalized, scan.mask, operator,
                                  scan.interpolator.operator, n_coeffs(order),
                                  self.normalizes_with(scan.response))

    def pretrained_correction(self):
        """The pretrained correction of the prior (option ``pretrained``), or None.

        Returns
        -------
        correction : esdmri.reconst.pretrained.PriorCorrection or None
            Loaded (checksum and architecture checked) once per weights;
            after fine-tuning (``epochs=N``), the fine-tuned correction.
        """
        pretrained = self._pretrained_option()
        if pretrained is False:
            return None
        if self._correction[0] != pretrained:
            self._correction = (pretrained, load_correction(pretrained, self.device,
                                                            kind=self.conv_kind))
        return self._correction[1]

    def _pretrained_option(self):
        """The ``pretrained`` option, None resolved by :attr:`pretrained_by_default`."""
        pretrained = self.config.network.pretrained
        return self.pretrained_by_default if pretrained is None else pretrained

    def corrected_prior(self, coefficients, scan):
        """The linear prior corrected by the pretrained network (``pretrained`` option).

        Parameters
        ----------
        coefficients : ndarray, shape (X, Y, Z, C_total)
            :meth:`prior_coefficients` of ``scan``.
        scan : PreparedScan

        Returns
        -------
        coefficients : ndarray, float32, shape (X, Y, Z, C_total)
            As given when the model has no pretrained network.
        """
        correction = self.pretrained_correction()
        if correction is None:
            return coefficients
        return apply_correction(correction, coefficients, scan.mask, scan.response.tissues)

    def network_coefficients(self, scan):
        """The network's tissue coefficients of a prepared scan, run block by block.

        Parameters
        ----------
        scan : PreparedScan
            What :meth:`prepare` returned for the scan.

        Returns
        -------
        coefficients : ndarray, shape (X, Y, Z, C_total)
            Laid out as :meth:`prior_coefficients`'s (float32, zero outside
            ``scan.mask``).

        Raises
        ------
        ValueError
            The model has no network (see :meth:`build_network`, :meth:`train`
            and :func:`load_model`).
        """
        if self.network is None:
            raise ValueError("the model has no network: train one (epochs=N), load one "
                             "(load_model) or build one (model.build_network())")
        training = self.config.training
        return network_coefficients(
            self.network, scan.normalized, scan.mask, self.gtab, scan.interpolator.operator,
            halo=self.halo, block_size=training.block_size,
            batch_size=training.recipe(finetune=False)["batch_size"],
            device=self.device)

    def refine(self, coefficients, scan):
        """Descend the deconvolution loss from some coefficients (the refinement step).

        The spatially coupled refinement of :func:`esdmri.reconst.refine.refine_coefficients`
        with the model's refinement options (``refine_steps`` and the other
        ``refine_*``) and the scan's response.

        Parameters
        ----------
        coefficients : ndarray, shape (X, Y, Z, C_total)
            The starting point (:meth:`prior_coefficients` or
            :meth:`network_coefficients`).
        scan : PreparedScan
            From :meth:`prepare`.

        Returns
        -------
        refined : ndarray, float32, shape (X, Y, Z, C_total)
        history : list of float
            The objective every 10 steps.
        """
        order, config = self.config.network.sh_order_max, self.config.refinement
        return refine_coefficients(
            coefficients, scan.normalized, scan.mask,
            build_forward_model(scan.response, self.gtab, order, self.device).matrix,
            build_fodf_sampler(order, self.device), n_coeffs(order), order,
            self.config.training.loss_weights, **config.solver_options(),
            normalize=self.normalizes_with(scan.response), verbose=self.verbose,
            noise_sigma=scan.noise_sigma,
            tissues=scan.response.tissues)

    # -- fitting ----------------------------------------------------------
    @keyword_only_from("mask", since="0.2")
    def fit(self, data, *, mask=None, retrain=None):
        """Deconvolve a scan, training on it first when ``epochs`` > 0.

        The steps, each public: :meth:`prepare` (checks, b0 normalisation,
        the response) -> :meth:`prior_coefficients` corrected by the
        shipped pretrained network (:meth:`corrected_prior`, option
        ``pretrained``; with ``epochs=N`` fine-tuned on the scan first,
        :meth:`train`), or :meth:`network_coefficients` when the model has a
        per-scan network (``pretrained=False, epochs=N``, or loaded) ->
        :meth:`refine` -> :class:`DeconvolutionFit`. No per-scan network is
        built unless ``pretrained=False`` and ``epochs=N``.

        Parameters
        ----------
        data : ndarray, shape (X, Y, Z, N)
        mask : ndarray of bool, shape (X, Y, Z), optional
            Keyword-only. Voxels to train on and deconvolve (default: every
            voxel with a positive b0 signal).
        retrain : bool, optional
            Train even if the model is already trained (default: train only
            an untrained model). Nothing is trained with ``epochs=0``.

        Returns
        -------
        fit : DeconvolutionFit
            With its own ``response`` and ``refine_history``. Training is
            the one step that changes the model: the trained network (and
            the response it was trained with) stay on it for later fits.
        """
        scan = self.prepare(data, mask=mask)
        training = self.config.training
        if training.epochs and (retrain or (retrain is None and not self.training_history)):
            self.train(scan, max_steps=training.train_windows)
        if self.network is not None:
            coefficients = self.network_coefficients(scan)
        else:
            coefficients = self.corrected_prior(self.prior_coefficients(scan), scan)
        history = []
        if self.config.refinement.refine_steps:
            coefficients, history = self.refine(coefficients, scan)
        return DeconvolutionFit(self, coefficients, scan.mask, response=scan.response,
                                refine_history=history)

    def train(self, source, *, max_steps=None, precision="fp32", compile=False,
              num_workers=0, checkpoint=None, resume=False, context=None, on_epoch=None):
        """Train on the blocks of one scan or many: fine-tune the correction, or a network.

        With a ``pretrained`` correction (the default), this fine-tunes it
        on one prepared scan (:func:`esdmri.reconst.finetune.finetune_correction`:
        the refinement's objective, the scan's windows, keep-best on the
        evaluation loss, or on the error of the held-out volumes with
        ``holdout``); the model then keeps the fine-tuned weights and,
        in ``correction_origin``, the file and SHA-256 of the weights they
        started from. With ``pretrained=False`` it trains the model's
        per-scan network (built here if the model has none) as follows.

        :meth:`fit` calls this on the scan it is given; group training
        (:func:`esdmri.reconst.group.train_group`) on a cohort. The network
        is built first if the model has none (from the source's shells),
        and the response is the model's, or the average of the subjects'
        own and estimated ones (:func:`esdmri.reconst.training.group_response`).
        Each subject's loss uses its own response where it has one.

        Parameters
        ----------
        source : PreparedScan, ScanBlocks or SubjectBlocks
            A scan from :meth:`prepare` (trained on in blocks of
            ``block_size``; a model without a response takes the scan's), or
            a block source (:mod:`esdmri.reconst.subjects`) on this model's
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
        on_epoch : callable, optional
            Called after every epoch (on the main process) with the
            trainer's state (:meth:`esdmri.reconst.training.Trainer.state`;
            its ``"network"``: the weights of that epoch), e.g. to record
            the path of training.

        Returns
        -------
        self
            Trained, in eval mode, with ``training_history`` (per epoch:
            mean training loss terms, ``total``, the evaluation loss
            ``eval_total``, ``epoch`` and ``lr``) and ``training_summary``
            (:attr:`esdmri.reconst.training.Trainer.summary`: the starting
            and best evaluation losses, whether training fell back to the
            starting weights, and what stopped it; after fine-tuning also
            ``loss_weights`` and ``started_from``, the starting weights'
            SHA-256).
        """
        if not self.config.training.epochs:
            raise ValueError("epochs is 0, so there is nothing to train: give the model "
                             "epochs=N (e.g. model.with_options(epochs=30))")
        if self._pretrained_option() is not False:
            return self._finetune(source, max_steps, precision, compile, num_workers,
                                  checkpoint is not None or resume, context, on_epoch)
        if isinstance(source, PreparedScan):
            if self.response is None:
                # The network is trained with the scan's response and keeps it.
                self.response = source.response
            source = ScanBlocks.from_scan(source, self.config.training.block_size, self.device)
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
            self.network, self.halo = self._new_network(self.response, source.n_shells)
        config = self.config.training
        recipe = config.recipe(finetune=False)
        sh_order_max = self.config.network.sh_order_max
        trainer = Trainer(
            self.network, source,
            [build_forward_model(response, gtab, sh_order_max, self.device)
             for response, gtab in zip(responses, source.gtabs)],
            build_fodf_sampler(sh_order_max, self.device), config.loss_weights,
            epochs=config.epochs, batch_size=recipe["batch_size"], lr=recipe["lr"],
            patience=config.patience, seed=config.seed,
            max_blocks=None if max_steps is None else max_steps * recipe["batch_size"],
            mask_fraction=config.mask_fraction, halo=self.halo,
            warmup_steps=config.warmup_steps, context=context,
            autocast_dtype=PRECISIONS[precision], compile=compile, num_workers=num_workers,
            verbose=self.verbose)
        if state is not None:
            trainer.restore(state)
        identity = {"model": type(self).__name__, "config": self.config.to_dict(),
                    "subjects": list(source.names),
                    "response": self.response.to_dict()}
        save_state = on_epoch
        if checkpoint is not None:
            def save_state(trainer_state):
                serialization.write_checkpoint({**identity, **trainer_state}, checkpoint)
                if on_epoch is not None:
                    on_epoch(trainer_state)
        self.training_history = trainer.run(save_state)
        self.training_summary = trainer.summary
        return self

    def _finetune(self, scan, max_steps, precision, compile, num_workers, checkpointing,
                  context, on_epoch):
        """:meth:`train` of a model with a pretrained correction: fine-tune it on one scan."""
        pretrained = self._pretrained_option()
        if not isinstance(scan, PreparedScan):
            raise ValueError(f"pretrained={pretrained!r} fine-tunes the pretrained correction "
                             "on one scan (model.fit, or model.train(model.prepare(data, "
                             "mask=mask))); give pretrained=False to train a network on "
                             "blocks or a cohort")
        if (checkpointing or compile or num_workers
                or (context is not None and context.world_size > 1)):
            raise ValueError("fine-tuning the pretrained correction runs in one process "
                             "without checkpoint, resume, compile or num_workers; give "
                             "pretrained=False for those")
        precision = check_training_options(precision, compile, num_workers, self.device)
        if self.response is None:
            # As a per-scan network, the fine-tuned correction keeps the scan's response.
            self.response = scan.response
        origin = self.correction_origin or weights_origin(pretrained, self.conv_kind)
        training, fitted, selection = self.config.training, scan, None
        if training.holdout:
            held = holdout_volumes(scan.gtab, training.holdout, training.seed)
            fitted = retained_scan(scan, held, self.sphere.vertices)
        prior = self.prior_coefficients(fitted)
        if training.holdout:
            selection = HeldOutError(scan, held, prior, self.config, self.device)
        tuned, self.training_history, summary = finetune_correction(
            self.pretrained_correction(), fitted, prior, self.config, max_steps=max_steps,
            device=self.device, autocast_dtype=PRECISIONS[precision], verbose=self.verbose,
            selection=selection, on_epoch=on_epoch)
        self._correction = (pretrained, tuned)
        self.correction_origin = origin
        self.training_summary = {**summary, "started_from": origin["sha256"]}
        return self

    def _check_checkpoint(self, state, source, checkpoint):
        """Refuse a checkpoint written with other settings (only epochs may change)."""
        ours = self.config.to_dict()
        # An option the checkpoint lacks (written before it existed) had its default.
        theirs = {**option_defaults(), **state["config"]}
        theirs["conv_kind"] = canonical_conv_kind(theirs.get("conv_kind"))
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
        config = scan_defaults(self.config.replace(**options), self.gtab)
        model = copy.copy(self)
        model.config = config
        model.sphere = config.network.sphere()
        return model

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
        network, halo = self.network, self.halo
        correction = None
        if self.correction_origin is not None:
            # A fine-tuned correction: its weights, and those it started from.
            network = self.pretrained_correction()
            halo = network.halo
            correction = {**self.correction_origin, "architecture": network.architecture}
        elif network is None:
            if self.response is None:
                raise ValueError("the model has neither a network nor a response to save: "
                                 "give it a response (model.with_response) or train it")
            # An untrained network, whose output is the linear prior: the file
            # then serves load_model like any other.
            network, halo = self._new_network(self.response)
        kind = next(name for name, cls in MODEL_CLASSES.items() if isinstance(self, cls))
        serialization.write_model_file(
            path, kind=kind, config=self.config.to_dict(), response=self.response,
            gtab=self.gtab, halo=halo, state_dict=network.state_dict(),
            training_history=self.training_history, training_summary=self.training_summary,
            correction=correction, force=force)

    @classmethod
    def _from_saved(cls, saved, gtab, device, verbose):
        """The trained model of the contents of a model file."""
        config = DeconvolutionConfig.from_dict(saved["config"])
        correction = saved.get("correction")
        if correction is not None:
            # A fine-tuned correction: the file holds its weights, so the ones
            # it started from need not be on this machine.
            model = cls(gtab, saved["response"], device=device, verbose=verbose,
                        **{**config.options(), "pretrained": False})
            model.config = config
            tuned = PriorCorrection(correction["architecture"])
            tuned.load_state_dict(saved["state_dict"])
            model._correction = (model._pretrained_option(), tuned.to(model.device).eval())
            model.correction_origin = {"weights": correction["weights"],
                                       "sha256": correction["sha256"]}
            model.training_history = saved["training_history"]
            model.training_summary = saved.get("training_summary")
            return model
        model = cls(gtab, saved["response"], device=device, verbose=verbose,
                    **config.options())
        model.training_history = saved["training_history"]
        model.training_summary = saved.get("training_summary")
        if model.training_history or not config.network.linear_prior:
            model.build_network()
            model.network.load_state_dict(saved["state_dict"])
        # else the file holds an untrained network, whose output is the linear
        # prior: the model's fits compute that prior without it.
        return model


class ESDModel(_DeconvolutionModel):
    """Equivariant Spherical Deconvolution (Elaldi et al. 2021).

    Voxel-wise: spherical Chebyshev convolutions on a HEALPix grid, so each
    voxel is deconvolved from its own signal only. Its shipped pretrained
    correction is voxel-wise too (``esdmri/data/pretrained_esd.pt``,
    ``pretrained=True``), but the default fit is network-free: with those
    weights the refined fit lost to the network-free one on five of the ten
    dev phantoms (straight bundles at SNR 10: 10.3 against 5.8 degrees).
    Parameters as :class:`RTESDModel`.
    """

    conv_kind = "spherical"
    pretrained_by_default = False


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
        Tissue responses matching the gtab's shells. When None, each fit
        estimates its own from its scan (``fit.response``), by
        :func:`esdmri.response.estimate_response` (as many tissues as the
        shells separate: WM and CSF from b0 plus one shell, WM, GM and CSF
        from two or more shells, a non-shelled scan or b0 plus one shell at
        b <= 1500 with 30 axes or more); the model keeps none,
        unless it trains a network (which keeps the response it was trained
        with).
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

    # Not "e3so3": UNet(conv="e3so3") has E(3) x SO(3) convolutions at every
    # level, RT-ESD only in its stem. Model files written before this name
    # hold "mixed" or "mixed-stem" (config.FORMER_CONV_KINDS); load_model
    # takes the kind from the class, not the file.
    conv_kind = "e3so3-stem"


# The options' entries come from the configuration classes, their one source.
RTESDModel.__doc__ = RTESDModel.__doc__.replace("    OPTIONS", "    " + options_docstring())


class CESDModel(_DeconvolutionModel):
    """Concatenated-neighbourhood ESD: the spatial neighbours' signals stacked as
    extra input channels of a spherical network (baseline of the RT-ESD paper);
    its shipped pretrained correction is built the same way
    (``esdmri/data/pretrained_cesd.pt``). Parameters as :class:`RTESDModel`."""

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
        Trained: ``model.fit(data, mask=mask)`` only infers.
    """
    saved = serialization.read_model_file(path)
    model_class = MODEL_CLASSES[saved["model"]]
    return model_class._from_saved(saved, saved["gtab"] if gtab is None else gtab, device,
                                   verbose)


def scan_defaults(config, gtab):
    """A configuration with the options that default to the scan's resolved.

    ``sh_order_max=None`` (:func:`esdmri.reconst.config.default_sh_order`),
    ``sparsity=None`` (:func:`esdmri.reconst.config.default_sparsity`),
    ``gm_charge=None`` and ``csf_charge=None``
    (:func:`esdmri.reconst.config.default_isotropic_charges`) and
    ``refine_tv=None`` (:func:`esdmri.reconst.config.default_refine_tv`) stand
    for values that depend on the gtab's directions and shells
    (:func:`esdmri.reconst.inputs.super_resolved_shell`,
    :func:`esdmri.shm.count_weighted_shells`). A default order
    that the grid cannot hold (14 on nside 4) raises ``nside`` to the
    smallest that holds it, as the order was measured; an order given by
    the user never does (the grid's check names the nside to raise).

    Parameters
    ----------
    config : DeconvolutionConfig
    gtab : dipy.core.gradients.GradientTable

    Returns
    -------
    config : DeconvolutionConfig
    """
    super_resolved, low = super_resolved_shell(gtab), low_shell(gtab)
    if config.network.sh_order_max is None:
        order = default_sh_order(count_weighted_measurements(gtab), super_resolved=super_resolved,
                                 low_shell=low)
        grid = config.network
        while grid.sphere().n_vertices < n_coeffs(order):
            grid = dataclasses.replace(grid, nside=2 * grid.nside)
        config = config.replace(sh_order_max=order, nside=grid.nside)
    if config.training.sparsity is None:
        config = config.replace(sparsity=default_sparsity(super_resolved,
                                                          config.network.sh_order_max, low))
    gm_charge, csf_charge = default_isotropic_charges(low)
    if config.training.gm_charge is None:
        config = config.replace(gm_charge=gm_charge)
    if config.training.csf_charge is None:
        config = config.replace(csf_charge=csf_charge)
    if config.refinement.refine_tv is None:
        config = config.replace(refine_tv=default_refine_tv(count_weighted_shells(gtab) == 1))
    return config


def _warn_underdetermined(gtab, sh_order_max):
    """Warn when the WM fODF has more SH coefficients than distinct measurements.

    Like DIPY's CSD: the fit is then underdetermined and rests on the
    non-negativity and sparsity terms.
    """
    n_measurements = count_weighted_measurements(gtab)
    if super_resolved_shell(gtab) and sh_order_max <= HIGH_SHELL_SH_ORDER:
        return  # the default's super-resolution on one shell above b = 1500 (default_sh_order)
    if low_shell(gtab) and sh_order_max <= LOW_SHELL_SH_ORDER:
        return  # and on one shell at b <= 1500, with the isotropic tissues charged
    if n_measurements and n_coeffs(sh_order_max) > n_measurements:
        lower = max(2, sh_order_max - 2)
        while lower > 2 and n_coeffs(lower) > n_measurements:
            lower -= 2
        warnings.warn(
            f"sh_order_max={sh_order_max} has {n_coeffs(sh_order_max)} SH coefficients but "
            f"the gtab has only {n_measurements} distinct (shell, gradient direction) "
            f"measurements: the fODF is underdetermined by the signal and rests on the "
            f"non-negativity and sparsity terms; sh_order_max={lower} "
            f"({n_coeffs(lower)} coefficients) is determined",
            UserWarning, stacklevel=4)


def _same_response(a, b):
    return (a.tissues == b.tissues and np.allclose(a.bvals, b.bvals)
            and all(x.shape == y.shape and np.allclose(x, y)
                    for x, y in zip(a.coefficients, b.coefficients)))


def _warn_low_shell_tissues(gtab, response, config):
    """Warn when one shell at b <= 1500 gets its defaults with a response without GM.

    Those defaults (SH order 12, a stronger sparsity, charges on the GM and
    CSF fractions) were chosen with the three tissues that
    :func:`esdmri.response.estimate_response` gives there; with WM and CSF
    alone order 12 added spurious peaks on dispersed dev bundles.
    """
    if (response is None or "gm" in response.tissues or not low_shell(gtab)
            or config.network.sh_order_max != LOW_SHELL_SH_ORDER
            or config.training.sparsity != LOW_SHELL_SPARSITY):
        return
    warnings.warn(
        f"the defaults of one shell at b <= 1500 (sh_order_max={LOW_SHELL_SH_ORDER}, "
        f"sparsity={LOW_SHELL_SPARSITY:g}, charges on the GM and CSF fractions) were chosen "
        "with WM, GM and CSF responses (estimate_response's default there), but this "
        f"response has {response.tissues}: with it order {LOW_SHELL_SH_ORDER} adds spurious "
        "peaks where grey matter shares a voxel; estimate the three tissues, or pass "
        "sh_order_max=8, sparsity=1e-4, csf_charge=0 for the fit chosen for two "
        "(docs/benchmarks.md, "
        '"One shell at b <= 1500")', UserWarning, stacklevel=3)


def _checked_response(response, gtab):
    """A model's response: None or a TissueResponse matching the gtab's shells."""
    if response is not None and not isinstance(response, TissueResponse):
        raise TypeError(_response_type_message(response))
    if response is not None:
        response.validate(gtab)
    return response
