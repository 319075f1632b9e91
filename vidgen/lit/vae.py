"""LightningModule for all three VAE stages: thin glue around `WanVAE` and the losses.

Stage 1 trains the 2D image VAE (`vae.temporal=false`) on single frames; stage 2 builds the
3D causal VAE and inflates the stage-1 weights into it (`init_from=<stage-1 run>`); stage 3
continues from stage 2 with a 3D discriminator (`disc` set) on multi-resolution buckets.

Optimisation is manual for every stage so that one code path serves all three: the generator
and (stage 3) the discriminator have their own AdamW, warm-up schedule and gradient clipping,
and a step whose loss or gradients are not finite is skipped on every rank (the flag is
all-reduced, so all ranks agree) and counted, so a NaN never reaches the weights.

Data parallelism (`trainer=ddp`): DDP's reducer averages the VAE's gradients in the
generator backward, except for two groups kept out of DDP (`_ddp_params_and_buffers_to_ignore`)
that a DDP reducer without `find_unused_parameters` would refuse: the discriminator (the
generator's backward never reaches it, and before `gan.start_step` it is idle) and the VAE's
temporal resampling convs (unused by a batch of 1-frame clips, which image buckets give).
Their gradients are averaged here, one collective after each backward
(`vidgen.utils.distributed.average_grads_`), and their initial weights are broadcast from
rank 0 at the start of fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vidgen.losses.gan import LeCam, adaptive_weight, gradient_penalty, hinge_d_loss, hinge_g_loss
from vidgen.losses.lpips import build_lpips
from vidgen.losses.recon import vae_loss
from vidgen.metrics.frames import psnr_per_frame
from vidgen.models.vae import build_wan_vae, inflate_2d_to_3d, load_vae
from vidgen.models.vae.discriminator import Discriminator3D
from vidgen.utils.config import typed_options
from vidgen.utils.distributed import average_grads_, broadcast_
from vidgen.utils.ema import EMA, ValidateWithEMA
from vidgen.utils.guards import NonFiniteGuard, grads_finite_flag
from vidgen.utils.logging import add_data_counts, log_video_grid
from vidgen.utils.optim import build_optimizer, optim_options
from vidgen.utils.schedule import optim_lr_lambda, trainer_max_steps


@dataclass
class LossOptions:
    """``model.loss``: the weights of ``vae_loss`` and the LPIPS network."""

    l1_weight: float = 1.0
    kl_weight: float = 1e-6
    lpips_weight: float = 1.0
    lpips_net: str = "vgg"               # vgg (torchvision vgg16, the usual training choice) | alex
    lpips_weights: str | None = None     # None: the torch hub cache ($TORCH_HOME/hub/checkpoints/...)
    lpips_random_backbone: bool = False  # tests only: a random backbone, no weights file
    lpips_frames: int | None = None      # LPIPS on a random subset of this many frames per clip


@dataclass
class GanOptions:
    """``model.gan`` (stage 3, with ``model.disc``). adaptive_max is in the units of the summed
    loss (taming-transformers / Wan: L1 and KL summed per clip), see VAEModule.training_step."""

    start_step: int = 0              # batches of reconstruction-only warm-up before the GAN term
    weight: float = 0.1              # times the adaptive weight
    adaptive_max: float = 1e4
    reg: str = "lecam"               # lecam | r1 | none
    reg_weight: float | None = None  # LeCam's weight or R1's gamma; None: GAN_REGS[reg]
    lecam_decay: float = 0.999

    def __post_init__(self):
        if self.reg not in GAN_REGS:
            raise ValueError(f"model.gan.reg={self.reg!r}; valid: {', '.join(GAN_REGS)}")
        if self.reg_weight is None:
            self.reg_weight = GAN_REGS[self.reg]


# model.gan.reg -> the default reg_weight: LeCam's weight, R1's gamma (the loss adds gamma / 2 * R1)
GAN_REGS = {"lecam": 0.001, "r1": 1.0, "none": 0.0}
# VAE options that inflation takes from the stage-2 config rather than the 2D model's
INFLATION_KEYS = ("temporal_downsample", "dropout")


def _same(value):
    """Config values compared across stages: tuples and lists alike."""
    return [_same(v) for v in value] if isinstance(value, (list, tuple)) else value


class VAEModule(ValidateWithEMA, L.LightningModule):
    """Train a `WanVAE` (stages 1-3).

    vae: `WanVAE` keyword arguments over the preset `size` (`VAE_PRESETS`; None: none); a None
        value means the preset's. loss: weights of `vae_loss` plus LPIPS settings.
    optim: lr, optimizer (a Hydra _partial_ spec), warmup_steps, decay, grad_clip; for stage 3
        disc_lr and disc_optimizer (vidgen.utils.optim).
    init_from: earlier stage's VAE (folder, run folder or .ckpt); a 2D VAE is inflated
        into the 3D one, a same-shaped VAE is loaded as is. trust_checkpoint: load an
        init_from .ckpt in full, not weights-only (it may run code: README, Trust).
    ema: {decay, warmup_steps} or None. disc: `Discriminator3D` kwargs or None (no GAN).
    gan: start_step, weight, adaptive_max, reg ("lecam" | "r1" | "none"), reg_weight (LeCam's
        weight, or R1's gamma), lecam_decay; see GanOptions.
    """

    def __init__(
        self,
        vae: dict,
        loss: dict,
        optim: dict,
        init_from: str | None = None,
        require_init_from: bool = False,
        trust_checkpoint: bool = False,
        ema: dict | None = None,
        disc: dict | None = None,
        gan: dict | None = None,
        max_consecutive_nonfinite: int = 20,
        val_grid_videos: int = 4,
        seed: int = 0,
        audit_data: bool = False,
        size: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.vae = build_wan_vae(size, **dict(vae))
        if require_init_from and not init_from:
            raise ValueError(
                "this stage starts from the previous stage's VAE: set model.init_from=<run "
                "folder of the previous stage | its vae/ folder | a .ckpt>"
            )
        if init_from:
            self._init_from(init_from)
        self.optim_cfg = optim_options(optim)
        self.loss_cfg = lp = typed_options("model.loss", loss, LossOptions)
        self.lpips = None
        if lp.lpips_weight > 0:
            self.lpips = build_lpips(net=lp.lpips_net, weights_path=lp.lpips_weights,
                                     random_backbone=lp.lpips_random_backbone)
        self.disc = Discriminator3D(**dict(disc)) if disc else None
        self.gan = typed_options("model.gan", gan, GanOptions)
        self.lecam = LeCam(decay=self.gan.lecam_decay) if self.disc else None
        # averaged by _step and broadcast at fit start, not by DDP (module docstring)
        outside = set(map(id, self.vae.multi_frame_parameters()))
        if self.disc is not None:
            outside |= set(map(id, self.disc.parameters()))
        self._ddp_params_and_buffers_to_ignore = [
            n for n, p in self.named_parameters() if id(p) in outside
        ] + ([f"disc.{n}" for n, _ in self.disc.named_buffers()] if self.disc is not None else [])
        self.bucket_counts: dict[str, int] = {}  # training clips per bucket, this rank
        self.ema = EMA(self.vae, **dict(ema)) if ema else None
        self.guard = NonFiniteGuard(
            max_consecutive=max_consecutive_nonfinite, knob="model.max_consecutive_nonfinite"
        )
        self.noise = torch.Generator()
        self.noise.manual_seed(seed)
        self.skipped_samples = 0
        self.data_counts: dict[str, int] = {}  # loader counters (probed_meta, per-source samples)
        self.steps_done = 0
        self.seen_keys: list[str] = []  # with audit_data: sample keys this rank trained on

    def _init_from(self, path: str) -> None:
        """Load the earlier stage's VAE: inflated when it is 2D (with this stage's temporal
        settings), else as is, where every shape-defining option must match."""
        src = load_vae(path, trust=self.hparams.trust_checkpoint)
        ours = self.vae.config
        if not src.config["temporal"] and ours["temporal"]:
            try:
                src = inflate_2d_to_3d(src, **{k: ours[k] for k in INFLATION_KEYS})
            except ValueError as e:
                raise ValueError(f"model.init_from={path}: {e}") from e
        stats = ("latents_mean", "latents_std", "dropout")
        diff = {k: (v, ours.get(k)) for k, v in src.config.items()
                if k not in stats and _same(v) != _same(ours.get(k))}
        if diff:
            detail = "; ".join(f"model.vae.{k}: init_from has {a}, this stage {b}" for k, (a, b) in diff.items())
            raise ValueError(
                f"model.init_from={path}: its VAE does not fit this stage's model ({detail}). "
                "Set these model.vae values to the earlier stage's, or start that stage again "
                "with the values you want."
            )
        self.vae.load_state_dict(src.state_dict())

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        o = self.optim_cfg
        opt_g = build_optimizer(o.optimizer, self.vae.parameters(), o.lr)
        factor = optim_lr_lambda(o, trainer_max_steps(self))
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)  # noqa: E731
        if self.disc is None:
            return [opt_g], [sched(opt_g)]
        disc_lr = o.lr if o.disc_lr is None else o.disc_lr
        opt_d = build_optimizer(o.disc_optimizer or o.optimizer, self.disc.parameters(), disc_lr,
                                "optim.disc_optimizer")
        return [opt_g, opt_d], [sched(opt_g), sched(opt_d)]

    def _step(self, opt, sched, loss: torch.Tensor, module: torch.nn.Module, name: str) -> bool:
        """Backward, then step only if the loss and every gradient are finite on every rank;
        True when stepped. The discriminator's gradients are averaged over ranks here."""
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        average_grads_(self.disc.parameters() if module is self.disc else self.vae.multi_frame_parameters())
        finite = torch.isfinite(loss.detach()) & grads_finite_flag(module)
        stepped = self.guard.check_flag(finite, name, self.global_step)
        self.log(f"train/nonfinite_{name}", float(self.guard.nonfinite.get(name, 0)))
        if not stepped:
            opt.zero_grad(set_to_none=True)
            return False
        clip = self.optim_cfg.grad_clip
        if clip:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        if opt is self._disc_opt():
            # The raw optimizer, so that Lightning's global_step (trainer.max_steps, checkpoint
            # intervals) counts batches in every stage rather than G + D steps.
            opt.optimizer.step()
        else:
            opt.step()
        sched.step()
        return True

    def _disc_opt(self):
        return self.optimizers()[1] if self.disc is not None else None

    def on_fit_start(self) -> None:
        if self.disc is not None and str(self.trainer.precision).startswith("16"):
            raise ValueError(
                f"trainer.precision={self.trainer.precision} is not supported with the GAN "
                "(fp16 loss scaling); use bf16-mixed or 32-true"
            )
        # DDP broadcasts only what it manages (module docstring)
        outside = self.vae.multi_frame_parameters()
        if self.disc is not None:
            outside += [*self.disc.parameters(), *self.disc.buffers()]
        broadcast_(outside)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["video"]
        self.skipped_samples += int(batch.get("num_skipped", 0))
        data_logs = add_data_counts(self.data_counts, batch)
        if self.hparams.audit_data:
            self.seen_keys.extend(batch["key"])
        opts = self.optimizers()
        scheds = self.lr_schedulers()
        opt_g, opt_d = (opts, None) if self.disc is None else opts
        sched_g, sched_d = (scheds, None) if self.disc is None else scheds
        self._count_bucket(batch)
        lp = self.loss_cfg
        step = self.steps_done  # batches trained (global_step skips NaN-skipped steps)
        gan_on = self.disc is not None and step >= self.gan.start_step

        recon, mu, logvar = self.vae(x, sample_posterior=True, generator=self.noise)
        total, logs = vae_loss(
            x, recon, mu, logvar,
            l1_weight=lp.l1_weight, kl_weight=lp.kl_weight,
            lpips_weight=lp.lpips_weight, lpips_fn=self.lpips,
            lpips_frames=lp.lpips_frames, generator=self.noise,
        )
        if gan_on:
            self.toggle_optimizer(opt_g)
            g_adv = hinge_g_loss(self.disc(recon))
            # Our reconstruction terms are the summed ones divided by P (vidgen.losses.recon),
            # so the gradient-norm ratio is P times smaller than taming's; adaptive_max is
            # stated in taming's units, hence the clamp at adaptive_max / P.
            per_clip = x[0].numel()
            w = adaptive_weight(total, g_adv, self.vae.last_layer,
                                max_weight=self.gan.adaptive_max / per_clip)
            total = total + self.gan.weight * w * g_adv
            logs.update({"g_adv": g_adv.detach(), "adaptive_w": w * per_clip})
        stepped = self._step(opt_g, sched_g, total, self.vae, "g")
        if gan_on:
            self.untoggle_optimizer(opt_g)
        if self.ema is not None and stepped:
            self.ema.update(self.vae, step)

        if gan_on:
            self.toggle_optimizer(opt_d)
            reg, reg_weight = self.gan.reg, self.gan.reg_weight
            real = x.detach().requires_grad_(reg == "r1")
            logits_real, logits_fake = self.disc(real), self.disc(recon.detach())
            d_hinge = hinge_d_loss(logits_real, logits_fake)
            d_loss = d_hinge
            if reg == "lecam":
                self.lecam.update(logits_real.detach(), logits_fake.detach())
                d_reg = self.lecam(logits_real, logits_fake)
                d_loss = d_loss + reg_weight * d_reg
            elif reg == "r1":  # reg_weight is gamma (Mescheder et al. 2018: gamma / 2 * R1)
                d_reg = gradient_penalty(logits_real, real)
                d_loss = d_loss + reg_weight / 2 * d_reg
            self._step(opt_d, sched_d, d_loss, self.disc, "d")
            self.untoggle_optimizer(opt_d)
            logs.update({"d_loss": d_loss.detach(), "d_hinge": d_hinge.detach(),
                         "logits_real": logits_real.mean().detach(),
                         "logits_fake": logits_fake.mean().detach()})
            if reg != "none":
                logs["d_reg"] = d_reg.detach()  # unweighted: LeCam's R, or R1's E||grad D||^2

        self.steps_done += 1
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"})
        self.log("train/loss", total.detach(), prog_bar=True)
        self.log("data/skipped", float(self.skipped_samples))
        self.log_dict(data_logs)
        self.log("lr", opt_g.param_groups[0]["lr"])
        seen = sum(self.bucket_counts.values())
        self.log_dict({f"data/bucket_share/{b}": n / seen for b, n in self.bucket_counts.items()})

    def _count_bucket(self, batch: dict[str, Any]) -> None:
        """Clips per (frames x height x width) bucket; their shares are logged each step."""
        x = batch["video"]
        bucket = batch.get("bucket") or "x".join(str(n) for n in x.shape[2:])
        self.bucket_counts[bucket] = self.bucket_counts.get(bucket, 0) + x.shape[0]

    # ---------------------------------------------------------------- validation
    def ema_model(self) -> torch.nn.Module:  # ValidateWithEMA: validation uses EMA weights
        return self.vae

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["video"]
        mu, _ = self.vae.encode(x)
        recon = self.vae.decode(mu).clamp(-1, 1)
        psnr = psnr_per_frame((x + 1) / 2, (recon + 1) / 2).mean(dim=1)  # [B]
        self.log("val/psnr", psnr.mean(), prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        self.log("val/l1", (recon - x).abs().mean(), sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0 and self.trainer.is_global_zero:
            n = self.hparams.val_grid_videos
            log_video_grid(self.trainer, "val/recon", x[:n], recon[:n], self.global_step)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vidgen"] = {
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "guard": self.guard.state_dict(),
            "noise": self.noise.get_state(),
            "skipped_samples": self.skipped_samples,
            "data_counts": dict(self.data_counts),
            "steps_done": self.steps_done,
            "bucket_counts": dict(self.bucket_counts),
        }
        if self.hparams.audit_data:
            checkpoint["vidgen"]["audit"] = self._audit()

    def _audit(self) -> dict[str, list]:
        """Per-rank sample keys and a hash of the weights, gathered from every rank.

        Lets a test (or a suspicious user) check that ranks read disjoint data and that the
        replicas stayed identical.
        """
        import hashlib

        h = hashlib.sha256()
        for name, p in sorted(self.vae.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        mine = {"keys": list(self.seen_keys), "weights_sha256": h.hexdigest()}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        return {k: [r[k] for r in everyone] for k in mine}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("vidgen", {})
        if self.ema is not None and extra.get("ema"):
            self.ema.load_state_dict(extra["ema"])
        if "guard" in extra:
            self.guard.load_state_dict(extra["guard"])
        if "noise" in extra:
            self.noise.set_state(extra["noise"])
        self.skipped_samples = extra.get("skipped_samples", 0)
        self.data_counts = dict(extra.get("data_counts", {}))
        self.steps_done = extra.get("steps_done", 0)
        self.bucket_counts = dict(extra.get("bucket_counts", {}))

    def on_train_end(self) -> None:
        """Export the VAE (EMA weights when kept) as `<run_dir>/vae/` for the next stage."""
        if not self.trainer.is_global_zero:
            return
        out = Path(self.trainer.default_root_dir) / "vae"
        if self.ema is not None:
            with self.ema.swap_into(self.vae):
                self.vae.save_pretrained(out)
        else:
            self.vae.save_pretrained(out)
