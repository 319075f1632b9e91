"""LightningModule for DiT training: thin glue around `WanDiT`, rectified flow and packing.

    python train.py experiment=dit/stage1 "data.train.shards='latents/256px/{00000..00999}.tar'"
    python train.py experiment=dit/stage2 model.init_from=outputs/dit_stage1/<run>
    python train.py experiment=dit/stage1 trainer=fsdp2 trainer.devices=8      # FSDP2

Two data modes, chosen by the data config:

- ``data=latents`` (LatentDataModule): batches ``{"packed": PackedBatch}`` of precomputed,
  normalised latents with their text embeddings, packed to a token budget in the workers.
- ``data=video`` + ``model.vae_path=<VAE>``: batches of raw clips; the module holds a frozen
  VAE and text encoder (not part of the state dict, never trained), encodes each batch
  (caption dropout ``cfg_dropout`` for guidance), and packs it with the same
  ``pack_samples`` into sequences of at most ``max_tokens`` tokens.

Training step (manual optimisation, one optimizer step per batch): for each packed sample
draw t (logit-normal or uniform; shifted per sample from its token count with
``resolution_shift`` when ``flow.resolution_shift`` is on) and eps, form x_t = (1-t) x0 + t eps,
predict the velocity with ``forward_packed`` and take ``flow_loss`` (per-sample mean, then mean
over the samples of the batch). Noise and timesteps come from a generator seeded with
(seed, rank, step), so a resumed run draws exactly what the uninterrupted one drew. A step
whose gradient norm is not finite is skipped on every rank and counted; more than
``max_consecutive_nonfinite`` in a row stop the run.

Validation: the flow loss at fixed timesteps (``val.timesteps``) with fixed noise, and, on the
first validation batch, samples for its first ``val.num_samples`` captions with fixed seeds
(flow Euler/Heun + CFG) shown under the real clips (decoded with the VAE when ``vae_path`` is
set, else the first latent channels) in ``<run>/samples/``. At the end of training the DiT
(EMA weights when EMA is on) is exported to ``<run>/dit/`` with ``pipeline.json`` naming the
VAE and text encoder, which is all ``python -m vidgen.sample ckpt=<run>`` needs.

Image-to-video (``experiment=dit/i2v``): a DiT with conditioning channels (``dit.in_channels``
= 16 + 4 + 16) and, with an image encoder, ``dit.image_dim``. Each sample carries its first-frame
condition and image tokens (stored by ``encode_latents i2v=true``, or computed here from the
clip in the on-the-fly mode), dropped for image guidance with probability ``image_dropout``
(latents: ``data.train.image_dropout``) independently of the caption. ``init_from`` a
text-to-video DiT expands it (``vidgen.models.dit.expand_t2v``): the new input channels and image
values start at zero, so training starts from exactly the T2V model's predictions. The loss
covers every latent frame, the conditioning one included: its target is the velocity towards
the given frame's latent, which the model reads from ``cond``, so it is easy but it keeps the
first frame's prediction consistent with the rest of the clip at every t (as Wan trains).

FSDP2: under Lightning's ``ModelParallelStrategy`` (``trainer=fsdp2``) ``configure_model`` shards
every block, then the root, over all ranks (``apply_fsdp``, vidgen/models/dit/parallelize.py);
EMA shadows are sharded like the parameters and gathered one tensor at a time for checkpoints
and the export (``gather_full``).

Context parallelism (``context_parallel=N``, one top-level key that sets model.context_parallel
and data.context_parallel): the ranks form a ("dp", "cp") DeviceMesh; each group of N neighbouring
ranks reads the same packed batch and draws the same noise and times (the loader and the
generators use the data-parallel rank), each runs 1/N of the tokens through the DiT
(``forward_packed_tokens(packed, cp)``) and takes the loss of its own tokens, summed over the
group. DDP or FSDP2 then averages the gradients over all ranks, which is the data-parallel mean
(see vidgen/models/dit/context_parallel.py). Validation losses run split the same way; the
validation samples run whole on every rank.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from vidgen import text as text_encoders  # module attribute: tests swap build_text_encoder
from vidgen.data.latents import INFO_NAME
from vidgen.data.packing import PackedBatch
from vidgen.data.streams import check_context_parallel
from vidgen.diffusion import SOLVERS, FlowOptions, interpolate, sample_timesteps, token_flow_loss
from vidgen.diffusion.generate import PIPELINE_NAME, generate_latents, sampling_shift
from vidgen.i2v import drop_condition, encode_condition
from vidgen.image_encoder import build_image_encoder
from vidgen.models.dit import (
    WanDiT,
    build_wan_dit,
    init_weights_from,
    pack_samples,
    packing_efficiency,
)
from vidgen.models.dit.context_parallel import ContextParallel, check_heads, context_parallel_group
from vidgen.models.dit.lora import LoraOptions, add_lora, export_lora, lora_tensors
from vidgen.models.dit.parallelize import (
    FsdpOptions,
    apply_fsdp,
    compile_blocks,
    distribute_like,
    full_state_dict,
    gather_full,
    is_dtensor,
)
from vidgen.models.vae import load_vae
from vidgen.models.vae.stats import check_not_identity, check_same_stats, stats_of
from vidgen.text import drop_captions, trim_padding
from vidgen.utils.config import as_dict, typed_options
from vidgen.utils.ema import EMA, ValidateWithEMA
from vidgen.utils.guards import NonFiniteGuard
from vidgen.utils.logging import add_data_counts, log_video_grid
from vidgen.utils.optim import build_optimizer, optim_options
from vidgen.utils.schedule import optim_lr_lambda, trainer_max_steps


def packed_flow_loss(dit: WanDiT, noisy: PackedBatch, x0: torch.Tensor, eps: torch.Tensor,
                     cp: ContextParallel | None = None) -> torch.Tensor:
    """``flow_loss`` of the packed samples: ``noisy`` holds x_t and t, x0 / eps the [N, D] tokens.

    With ``cp`` each rank takes the loss of its own tokens (padding weighs 0), summed over the
    group: every rank returns the whole loss (context_parallel.py).
    """
    weight = noisy.loss_weights()
    if cp is None:
        return token_flow_loss(dit.forward_packed_tokens(noisy), x0, eps, weight)
    shard = cp.shard(noisy.num_tokens)
    pred = dit.forward_packed_tokens(noisy, cp)
    return shard.sum(token_flow_loss(pred, shard.split(x0), shard.split(eps), shard.split(weight)))


@dataclass
class ValOptions:
    """``model.val``: what each validation runs."""

    num_samples: int = 2        # captions of the first val batch sampled at each validation
    steps: int = 20
    solver: str = "euler"       # euler | heun | unipc
    cfg_scale: float = 5.0
    timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # fixed-noise loss at these t

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"model.val.solver={self.solver!r}; valid: {', '.join(SOLVERS)}")


class DiTModule(ValidateWithEMA, L.LightningModule):
    """Train a `WanDiT` with rectified flow on packed latents.

    size: WAN_PRESETS key (tiny | 1.3B | 14B) or None. dit: WanDiT kwargs (None = preset's).
    flow: ``FlowOptions`` (timestep_mode, logit_mean, logit_std, shift, resolution_shift and its
        anchors). val, fsdp, lora: ``ValOptions``, ``FsdpOptions``, ``LoraOptions``. Each is a
        dict checked against its dataclass (``typed_options``).
    optim: lr, optimizer (a Hydra _partial_ spec, vidgen.utils.optim), warmup_steps, decay,
    grad_clip. ema: {decay, warmup_steps} or None.
    init_from: an earlier stage's DiT (run folder, dit/ folder or .ckpt) to start from.
    vae_path: VAE for on-the-fly encoding (data=video) and for decoding validation samples.
    trust_checkpoint: load init_from / vae_path .ckpt files in full, not weights-only (they may
        run code: README, Trust).
    text_encoder: encoder for on-the-fly mode (latent shards carry their own embeddings).
    cfg_dropout, max_tokens: caption dropout and packing budget of the on-the-fly mode.
    image_encoder, image_dropout: I2V, on-the-fly mode: the CLIP vision directory giving image
        tokens (None / "none": latent condition only) and the image-condition dropout.
    lora: None (train every weight) or {rank, alpha, dropout, target_modules, base_dtype}: peft
        LoRA adapters on the base (``init_from``), which stays frozen (``base_dtype``: cast it,
        e.g. "bfloat16", under mixed precision). Only the adapters are optimised, averaged by
        EMA and saved in checkpoints; the run exports ``<run>/lora/`` (models/dit/lora.py).
    context_parallel: ranks that split each packed sequence (Ulysses, context_parallel.py);
        they read the same batches (data.context_parallel) and draw the same noise.
    allow_identity_latent_stats, allow_latent_stats_mismatch: opt-outs of the latent-statistics
        checks in setup() (a VAE without statistics; a decoding VAE whose statistics differ
        from those the latents were normalised with).
    """

    def __init__(
        self,
        dit: dict,
        flow: dict,
        optim: dict,
        size: str | None = None,
        ema: dict | None = None,
        init_from: str | None = None,
        require_init_from: bool = False,
        vae_path: str | None = None,
        trust_checkpoint: bool = False,
        text_encoder: str = "minilm",
        cfg_dropout: float = 0.1,
        max_tokens: int | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        fsdp: dict | None = None,
        max_consecutive_nonfinite: int = 20,
        val: dict | None = None,
        seed: int = 0,
        allow_identity_latent_stats: bool = False,
        allow_latent_stats_mismatch: bool = False,
        image_encoder: str | None = None,
        image_dropout: float = 0.0,
        context_parallel: int = 1,
        lora: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.optim_cfg = optim_options(optim)
        if require_init_from and not init_from:
            raise ValueError(
                "this stage continues from the previous stage's DiT: set model.init_from=<run "
                "folder of the previous stage | its dit/ folder | a .ckpt>"
            )
        self.dit = build_wan_dit(size, **dit)
        if init_from:
            init_weights_from(self.dit, init_from, trust=trust_checkpoint)
        self.lora = typed_options("model.lora", lora, LoraOptions) if lora else None
        if self.lora:
            if not init_from:
                rank_zero_warn("model.lora without model.init_from: the adapters train on a frozen, "
                               "randomly initialised base")
            add_lora(self.dit, **as_dict(self.lora))
            # Checkpoints hold the adapters only (on_save_checkpoint); the base comes from init_from.
            self.strict_loading = False
        if not 0.0 <= image_dropout <= 1.0:
            raise ValueError(f"model.image_dropout must be in [0, 1], got {image_dropout}")
        self.dit.gradient_checkpointing = activation_checkpointing
        check_heads(check_context_parallel(context_parallel), self.dit.num_heads)
        self._cp: ContextParallel | None = None  # the cp group, made in configure_model
        self.flow = typed_options("model.flow", flow, FlowOptions)
        self.val_cfg = typed_options("model.val", val, ValOptions)
        self.fsdp = typed_options("model.fsdp", fsdp, FsdpOptions)
        self.guard = NonFiniteGuard(max_consecutive=max_consecutive_nonfinite,
                                    knob="model.max_consecutive_nonfinite")
        self.ema: EMA | None = None  # built in on_fit_start, once sharded and on its device
        self._pending_ema: dict | None = None
        self.steps_done = 0
        self.skipped_samples = 0
        self.data_counts: dict[str, int] = {}  # loader counters (probed_meta, per-source samples)
        self._frozen: dict[str, Any] = {}  # frozen VAE / text encoder: kept out of the state dict
        self._empty_text: torch.Tensor | None = None
        self._pipeline: dict = {}
        self._configured = False

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        """Check the data against the model and note the VAE / text encoder for the export.

        The latents must be normalised (the VAE that made them has latent statistics) and the
        VAE decoding validation samples must share those statistics; both are recorded in
        pipeline.json so that sampling can check its VAE the same way.
        """
        if self.lora and self.lora.base_dtype and self._trainer is not None \
                and "mixed" not in str(self.trainer.precision):
            raise ValueError(f"model.lora.base_dtype={self.lora.base_dtype} needs autocast: set "
                             f"trainer.precision=bf16-mixed (got {self.trainer.precision})")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        info = getattr(dm, "info", None)
        cfg = self.dit.config
        identity = dict(allow=self.hparams.allow_identity_latent_stats,
                        knob="model.allow_identity_latent_stats")
        if info is not None:  # precomputed latents
            self._check_i2v_latents(info)
            checks = [("dit.out_channels", cfg["out_channels"], info["vae_config"]["z_dim"], "latent channels"),
                      ("dit.text_dim", cfg["text_dim"], info["text_dim"], f"{info['text_encoder']} text width"),
                      ("dit.patch_size", list(cfg["patch_size"]), list(dm.patch_size), "data.patch_size")]
            for knob, ours, theirs, what in checks:
                if ours != theirs:
                    raise ValueError(f"model.{knob}={ours} but the latents in {info['folder']} have "
                                     f"{what} {theirs}: set model.{knob}={theirs}")
            stats = dict(mean=info["vae_config"]["latents_mean"], std=info["vae_config"]["latents_std"])
            source = os.path.join(info["folder"], INFO_NAME)
            check_not_identity(stats, info["vae"], latents=info["folder"], **identity)
            if self.hparams.vae_path:  # it decodes the validation samples: must undo that normalisation
                check_same_stats(stats, source, stats_of(self._vae()), self.hparams.vae_path,
                                 allow=self.hparams.allow_latent_stats_mismatch,
                                 knob="model.allow_latent_stats_mismatch",
                                 fix=f"Set model.vae_path to the VAE the latents were encoded with "
                                     f"({info['vae']}, with its statistics of then), or re-encode them")
            self._empty_text = dm.empty_text
            vae = os.path.abspath(self.hparams.vae_path) if self.hparams.vae_path else info["vae"]
            self._pipeline = dict(vae=vae, text_encoder=info["text_encoder"], text_dim=info["text_dim"],
                                  latents=info["folder"])
        else:  # raw video, encoded here
            if not self.hparams.vae_path:
                raise ValueError("training from video shards (data=video) encodes on the fly: set "
                                 "model.vae_path=<VAE folder | run folder> (or use data=latents)")
            stats = stats_of(self._vae())
            check_not_identity(stats, self.hparams.vae_path, **identity)
            if self.dit.cond_channels:
                encoder = self._image_encoder()
                i2v = dict(temporal=int(self._vae().temporal_compression),
                           image_dim=None if encoder is None else int(encoder.dim))
                self._check_i2v_latents(dict(i2v=i2v, folder=f"model.vae_path={self.hparams.vae_path}"))
            source = f"the VAE at {os.path.abspath(self.hparams.vae_path)} (encoded on the fly)"
            self._pipeline = dict(vae=os.path.abspath(self.hparams.vae_path),
                                  text_encoder=self.hparams.text_encoder, text_dim=cfg["text_dim"])
        self._pipeline.update(latent_channels=cfg["out_channels"], patch_size=list(cfg["patch_size"]),
                              flow=as_dict(self.flow), latent_stats=dict(stats, source=source))
        if self.dit.cond_channels:
            i2v = (info or {}).get("i2v") or dict(image_encoder=self._image_encoder_ref())
            self._pipeline["i2v"] = dict(image_encoder=i2v.get("image_encoder"),
                                         cond_channels=self.dit.cond_channels,
                                         image_dim=self.dit.image_dim)

    def _check_i2v_latents(self, info: dict) -> None:
        """The data's image-to-video condition (``info["i2v"]``) must be what the DiT takes."""
        i2v, where = info.get("i2v"), info["folder"]
        cond, image_dim = self.dit.cond_channels, self.dit.image_dim
        if not cond:
            if i2v:
                rank_zero_warn(f"the latents in {where} carry an image condition this text-to-video DiT ignores")
            return
        if not i2v:
            raise ValueError(f"model.dit.in_channels={self.dit.in_channels} (image-to-video) but the latents "
                             f"in {where} carry no first-frame condition: encode them with "
                             "encode_latents i2v=true, or train a text-to-video DiT")
        z_dim = self.dit.out_channels
        if cond != i2v["temporal"] + z_dim:
            raise ValueError(f"the DiT takes {cond} conditioning channels but {where} gives "
                             f"{i2v['temporal']} mask + {z_dim} latent: set model.dit.in_channels="
                             f"{2 * z_dim + i2v['temporal']}")
        if i2v.get("image_dim") != image_dim:
            raise ValueError(f"model.dit.image_dim={image_dim} but {where} holds image tokens of width "
                             f"{i2v.get('image_dim')} (image encoder {i2v.get('image_encoder')}): set "
                             f"model.dit.image_dim={i2v.get('image_dim')}")

    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel group: the ranks of a cp group share it (and its draws)."""
        return self.global_rank // self.hparams.context_parallel

    def configure_model(self) -> None:
        """torch.compile per block (optional), the context-parallel groups, and FSDP2 sharding
        under ModelParallelStrategy."""
        if self._configured:
            return
        self._configured = True
        if self.hparams.compile:
            compile_blocks(self.dit)
        if self.hparams.context_parallel > 1:
            self._cp = context_parallel_group(self.hparams.context_parallel,
                                              self.trainer.strategy.root_device.type)
        if self.device_mesh is None:
            return
        if self.lora and self.lora.base_dtype:
            raise ValueError("model.lora.base_dtype with FSDP2: FSDP2 needs one dtype per sharded group; "
                             "set model.fsdp.param_dtype=bfloat16 instead (the base is frozen either way)")
        apply_fsdp(self.dit, self.device_mesh.device_type, self.fsdp)

    def on_fit_start(self) -> None:
        if self.hparams.ema and self.ema is None:
            self.ema = EMA(self.dit, **dict(self.hparams.ema))
            if self._pending_ema is not None:
                self._load_ema(self._pending_ema)
                self._pending_ema = None

    # ---------------------------------------------------------------- frozen helpers
    def _vae(self):
        if "vae" not in self._frozen:
            vae = load_vae(self.hparams.vae_path, trust=self.hparams.trust_checkpoint)
            self._frozen["vae"] = vae.eval().requires_grad_(False)
        return self._frozen["vae"].to(self.device)

    def _text_encoder(self):
        if "text" not in self._frozen:
            self._frozen["text"] = text_encoders.build_text_encoder(self.hparams.text_encoder, device=self.device)
        return self._frozen["text"].to(self.device)

    def _image_encoder_ref(self) -> str | None:
        name = self.hparams.image_encoder
        return None if name in (None, "", "none") else os.path.abspath(name)

    def _image_encoder(self):
        if "image" not in self._frozen:
            self._frozen["image"] = build_image_encoder(self._image_encoder_ref(), device=self.device)
        encoder = self._frozen["image"]
        return None if encoder is None else encoder.to(self.device)

    def _empty(self) -> torch.Tensor:
        if self._empty_text is None:
            self._empty_text = trim_padding(*self._text_encoder().encode([""]))[0].float()
        return self._empty_text.to(self.device)

    def _generator(self, *key: int, device: torch.device | None = None) -> torch.Generator:
        """A generator seeded by (seed, data-parallel rank, *key): the same draws in a resumed run
        and on every rank of a cp group."""
        seed = np.random.SeedSequence([self.hparams.seed, self.data_parallel_rank, *key]).generate_state(1)[0]
        return torch.Generator(device=device or self.device).manual_seed(int(seed))

    # ---------------------------------------------------------------- batches
    @torch.no_grad()
    def _packs(self, batch: dict, train: bool) -> list[PackedBatch]:
        """The batch as packed sequences (latent mode: as loaded; video mode: encoded here)."""
        if "packed" in batch:
            return [batch["packed"]]
        if "video" not in batch:
            raise ValueError(f"a DiT batch holds 'packed' (data=latents) or 'video' (data=video), got {sorted(batch)}")
        vae = self._vae()
        mu, _ = vae.encode(batch["video"])
        z = vae.normalize(mu).float()
        captions = list(batch["caption"])
        gen = self._generator(self.steps_done, 2, device=torch.device("cpu"))
        if train and self.hparams.cfg_dropout > 0:
            captions = drop_captions(captions, self.hparams.cfg_dropout, gen)
        texts = trim_padding(*self._text_encoder().encode(captions))
        samples = [dict(latent=z[i], context=texts[i].float(), key=batch["key"][i], caption=captions[i])
                   for i in range(len(z))]
        if self.dit.cond_channels:  # the same condition encode_latents i2v=true stores
            cond = encode_condition(vae, batch["video"])
            encoder = self._image_encoder()
            image = None if encoder is None else encoder.encode(batch["video"][:, :, 0])
            dropped = torch.zeros(len(z), dtype=torch.bool)
            if train and self.hparams.image_dropout > 0:
                dropped = torch.rand(len(z), generator=gen) < self.hparams.image_dropout
            for i, s in enumerate(samples):
                c, im = cond[i], None if image is None else image[i]
                if dropped[i]:
                    c, im = drop_condition(c, im)
                s.update(cond=c, **({} if im is None else {"image": im.float()}))
        # No budget: the whole batch (clips of one bucket) in one sequence.
        per_clip = math.prod(n // p for n, p in zip(z.shape[2:], self.dit.patch_size))
        budget = self.hparams.max_tokens or per_clip * len(samples)
        return pack_samples(samples, self.dit.patch_size, budget)

    def _pack_loss(self, p: PackedBatch, gen: torch.Generator, t: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss of one packed sequence (t: [S] fixed times, else sampled)."""
        if t is None:
            f = self.flow
            shift = f.shifts([math.prod(g) for g in p.grids])
            t = sample_timesteps(p.num_samples, f.timestep_mode, f.logit_mean, f.logit_std,
                                 shift, generator=gen, device=self.device)
        # Every token is noised and in the loss, the first (conditioning) frame's too: see the
        # module docstring.
        x0 = p.x.float()
        eps = torch.randn(x0.shape, generator=gen, device=x0.device)
        noisy = replace(p, x=interpolate(x0, eps, p.per_token(t)), t=t)
        return packed_flow_loss(self.dit, noisy, x0, eps, self._cp)

    # ---------------------------------------------------------------- training
    def configure_optimizers(self):
        o = self.optim_cfg
        params = [p for p in self.dit.parameters() if p.requires_grad]  # LoRA: the adapters only
        opt = build_optimizer(o.optimizer, params, o.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, optim_lr_lambda(o, trainer_max_steps(self)))
        return [opt], [sched]

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the DiT's gradients (all-reduced under FSDP); non-finite if any is."""
        grads = [p.grad for p in self.dit.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        return norm.full_tensor() if is_dtensor(norm) else norm

    def training_step(self, batch: dict, batch_idx: int) -> None:
        packs = self._packs(batch, train=True)
        self.skipped_samples += int(batch.get("num_skipped", 0))
        data_logs = add_data_counts(self.data_counts, batch)
        gen = self._generator(self.steps_done, 1)
        total = sum(p.num_samples for p in packs)
        loss = sum(self._pack_loss(p, gen) * p.num_samples for p in packs) / total

        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        norm = self._grad_norm()
        if self.guard.check(norm, "loss", self.global_step):
            clip = self.optim_cfg.grad_clip
            if clip:
                params = [p for p in self.dit.parameters() if p.grad is not None]
                torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
            opt.step()
            sched.step()
            if self.ema is not None:
                self.ema.update(self.dit, self.steps_done)
        else:
            opt.zero_grad(set_to_none=True)
        self.steps_done += 1

        log = dict(batch_size=total, sync_dist=False)
        self.log("train/loss", loss.detach(), prog_bar=True, **log)
        self.log("train/grad_norm", norm.detach().float(), **log)
        self.log("train/packing_efficiency", packing_efficiency(packs), prog_bar=True, **log)
        self.log("train/tokens", float(sum(p.num_tokens for p in packs)), **log)
        self.log("train/samples", float(total), **log)
        self.log("train/max_tokens", float(packs[0].budget), **log)
        self.log("train/stage", float(batch.get("stage", 0)), **log)
        self.log("train/nonfinite", float(self.guard.total_nonfinite), **log)
        self.log("data/skipped", float(self.skipped_samples), **log)
        self.log_dict(data_logs, **log)
        self.log("lr", opt.param_groups[0]["lr"], **log)

    # ---------------------------------------------------------------- validation
    def ema_model(self) -> torch.nn.Module:  # ValidateWithEMA: validation uses EMA weights
        return self.dit

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        packs = self._packs(batch, train=False)
        total = sum(p.num_samples for p in packs)
        per_t = []
        for t in self.val_cfg.timesteps:
            gen = self._generator(10**6 + batch_idx, int(round(t * 1000)))  # fixed noise per (batch, t)
            loss = sum(self._pack_loss(p, gen, torch.full((p.num_samples,), float(t), device=self.device))
                       * p.num_samples for p in packs) / total
            self.log(f"val/loss_t{t:.2f}", loss, sync_dist=True, batch_size=total)
            per_t.append(loss)
        self.log("val/loss", torch.stack(per_t).mean(), prog_bar=True, sync_dist=True, batch_size=total)
        if batch_idx == 0 and self.val_cfg.num_samples > 0:
            self._sample_and_log(packs[0])

    def _sample_and_log(self, p: PackedBatch) -> None:
        """Generate the first captions of ``p`` with fixed seeds; save them under the real clips.

        Every rank generates (a sharded model needs every rank in each forward); rank 0 writes.
        """
        v = self.val_cfg
        n = min(v.num_samples, p.num_samples)
        x0 = p.unpack(p.x.float())
        bounds = p.cu_seqlens_ctx.tolist()
        conds = p.unpack(p.cond.float()) if p.cond is not None else None
        image_bounds = p.cu_seqlens_img.tolist() if p.image is not None else None
        fakes = []
        for i in range(n):
            shift = sampling_shift(self.flow, math.prod(p.grids[i]))
            text = p.context[bounds[i]: bounds[i + 1]].float()
            i2v = {}
            if conds is not None:
                i2v["cond"] = conds[i][None]
            if image_bounds is not None:
                i2v["image"] = p.image[image_bounds[i]: image_bounds[i + 1]].float()[None]
            fakes.append(generate_latents(self.dit, [text], self._empty(), x0[i].shape, steps=v.steps,
                                          solver=v.solver, cfg_scale=v.cfg_scale, shift=shift,
                                          seed=self.hparams.seed + i, **i2v)[0])
        if not self.trainer.is_global_zero:
            return
        reals = [self._to_pixels(x) for x in x0[:n]]
        fakes = [self._to_pixels(z) for z in fakes]
        path = log_video_grid(self.trainer, "val/samples", reals, fakes, self.global_step)
        captions = [m.get("caption", "") for m in p.meta[:n]]
        path.with_suffix(".txt").write_text("".join(f"{i}: {c}\n" for i, c in enumerate(captions)))

    @torch.no_grad()
    def _to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent [C, T, h, w] -> [3, T', H, W] in [-1, 1]: VAE decode, else channels."""
        if self.hparams.vae_path:
            vae = self._vae()
            with torch.autocast(self.device.type, enabled=False):
                return vae.decode(vae.denormalize(z[None].float()))[0].float().cpu()
        z = z.float().cpu()
        return (z[:3] if z.shape[0] >= 3 else z[:1]).div(2).clamp(-1, 1)  # ~N(0,1) -> [-1, 1]

    # ---------------------------------------------------------------- checkpoints
    def _ema_state(self) -> dict | None:
        if self.ema is None:
            return None
        state = self.ema.state_dict()
        keep = self.trainer.is_global_zero
        return dict(state, shadow=gather_full(state["shadow"], keep), buffers=gather_full(state["buffers"], keep))

    def _load_ema(self, state: dict) -> None:
        self.ema.load_state_dict(dict(state, shadow=distribute_like(self.ema.shadow, state["shadow"]),
                                      buffers=distribute_like(self.ema.buffers, state["buffers"])))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora:  # the frozen base is init_from's: keep the adapters only
            keep = {f"dit.{name}" for name in lora_tensors(self.dit)}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["vidgen"] = {
            "ema": self._ema_state(),
            "guard": self.guard.state_dict(),
            "steps_done": self.steps_done,
            "skipped_samples": self.skipped_samples,
            "data_counts": dict(self.data_counts),
            "pipeline": self._pipeline,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("vidgen", {})
        theirs = bool(checkpoint.get("hyper_parameters", {}).get("lora"))
        if theirs != bool(self.lora):
            raise ValueError("cannot resume: the checkpoint is from a " + ("LoRA" if theirs else "full")
                             + " run and this run is " + ("a LoRA" if self.lora else "a full") + " run (model.lora)")
        if self.lora and "state_dict" in checkpoint:
            missing = sorted({f"dit.{n}" for n in lora_tensors(self.dit)} - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(f"the checkpoint lacks {len(missing)} of this run's LoRA tensors, e.g. "
                                 f"{missing[0]}: another model.lora (rank, target_modules)?")
        if extra.get("ema") and self.hparams.ema:
            if self.ema is not None:
                self._load_ema(extra["ema"])
            else:
                self._pending_ema = extra["ema"]
        if "guard" in extra:
            self.guard.load_state_dict(extra["guard"])
        self.steps_done = extra.get("steps_done", 0)
        self.skipped_samples = extra.get("skipped_samples", 0)
        self.data_counts = dict(extra.get("data_counts", {}))

    def on_train_end(self) -> None:
        """Export ``<run_dir>/dit/`` (EMA weights when kept) and ``pipeline.json``; LoRA runs
        export ``<run_dir>/lora/`` instead."""
        rank0 = self.trainer.is_global_zero
        if self.lora:
            self._export_lora(rank0)
            return
        state = full_state_dict(self.dit, sharded=self.device_mesh is not None)  # collective
        if self.ema is not None:
            state.update(gather_full(self.ema.shadow, rank0))
        if not rank0:
            return
        with torch.device("meta"):
            model = WanDiT(**self.dit.config)
        model.load_state_dict({k: v.detach().cpu().to(state[k].dtype) for k, v in state.items()}, assign=True)
        out = Path(self.trainer.default_root_dir) / "dit"
        model.save_pretrained(out)
        pipeline = dict(self._pipeline, ema=self.ema is not None, steps=self.steps_done,
                        run=os.path.abspath(self.trainer.default_root_dir))
        (out / PIPELINE_NAME).write_text(json.dumps(pipeline, indent=2) + "\n")

    def _export_lora(self, rank0: bool) -> None:
        """``<run_dir>/lora/``: the adapters (EMA when kept) in diffusers' and Wan's formats."""
        state = gather_full(lora_tensors(self.dit), rank0)
        if self.ema is not None:
            state.update(gather_full(self.ema.shadow, rank0))
        if not rank0:
            return
        init_from = self.hparams.init_from
        info = dict(base=os.path.abspath(init_from) if init_from else None,
                    target_modules=list(self.lora.target_modules), dropout=self.lora.dropout,
                    ema=self.ema is not None, steps=self.steps_done,
                    run=os.path.abspath(self.trainer.default_root_dir), pipeline=self._pipeline)
        export_lora(state, Path(self.trainer.default_root_dir) / "lora", self.lora.rank,
                    self.lora.alpha, info)
