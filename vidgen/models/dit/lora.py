"""LoRA for the DiT: peft adapters for training, files that diffusers and ComfyUI load, merging.

    names = add_lora(dit, rank=16, alpha=16)          # peft LoRA layers; all else frozen
    export_lora(lora_tensors(dit), "run/lora", rank=16, alpha=16)
    merge_lora(base, read_lora("run/lora"), scale=1.0)  # W += scale * alpha/r * B @ A

Training uses peft (``inject_adapter_in_model``): each adapted ``nn.Linear`` becomes a peft
``LoraLayer`` whose parameters are named ``<module>.lora_A.default.weight`` /
``lora_B.default.weight`` (and the frozen base ``<module>.base_layer.weight``).

``export_lora`` writes two files of the same adapter, neither with peft's ``.default``:

- ``pytorch_lora_weights.safetensors``: diffusers' keys
  (``transformer.blocks.N.attn1.to_q.lora_A.weight``), with alpha / rank folded into lora_B
  (diffusers then reads rank = alpha), for ``WanPipeline.load_lora_weights(<dir>)``.
- ``wan_lora_comfy.safetensors``: the original Wan2.1 keys as ComfyUI and most Wan LoRA tools
  write them (``diffusion_model.blocks.N.self_attn.q.lora_A.weight``, ``lora_B.weight`` and a
  scalar ``.alpha``), lora_B unscaled.

``read_lora`` takes either file (or a folder holding one; peft's ``.default`` and kohya's
``lora_down`` / ``lora_up`` names too) and returns our module names with the scale folded in.
``merge_lora`` refuses what does not fit: a module the base lacks, or shapes of another base,
named with both shapes; an adapter that matches nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .names import from_diffusers_name, from_wan_name, to_diffusers_name, to_wan_name

# q, k, v, o of self- and cross-attention and both FFN linears (peft suffix matching).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out", "ffn.0", "ffn.2")
ADAPTER = "default"  # peft's adapter name
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
WAN_FILE = "wan_lora_comfy.safetensors"
INFO_FILE = "lora.json"
_PARAM = re.compile(rf"^(.+)\.lora_([AB])\.{ADAPTER}\.weight$")
DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraOptions:
    """``model.lora``: the adapters ``add_lora`` injects (None in a config: no LoRA)."""

    rank: int = 16
    alpha: float = 16.0                 # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # peft suffixes
    base_dtype: str | None = None       # "bfloat16": cast the frozen base (under mixed precision)

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1); got rank={self.rank}, "
                             f"alpha={self.alpha}, dropout={self.dropout}")
        if self.base_dtype not in DTYPES:
            raise ValueError(f"model.lora.base_dtype={self.base_dtype!r}; valid: null, "
                             f"{', '.join(k for k in DTYPES if k)}")


def add_lora(
    dit: nn.Module,
    rank: int = LoraOptions.rank,
    alpha: float = LoraOptions.alpha,
    dropout: float = LoraOptions.dropout,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    base_dtype: str | None = LoraOptions.base_dtype,
) -> list[str]:
    """Inject peft LoRA layers (lora_B zero: the model's output is unchanged) into ``dit`` in
    place and freeze every other parameter; ``base_dtype`` ("bfloat16") casts the frozen ones.
    Returns the adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    LoraOptions(rank, alpha, dropout, list(target_modules), base_dtype)  # checks the values
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        target_modules=list(target_modules))
    inject_adapter_in_model(config, dit, adapter_name=ADAPTER)
    for name, p in dit.named_parameters():
        trainable = _PARAM.match(name) is not None
        p.requires_grad_(trainable)
        if not trainable and DTYPES[base_dtype] is not None:
            p.data = p.data.to(DTYPES[base_dtype])
    return adapted_modules(dit)


def adapted_modules(dit: nn.Module) -> list[str]:
    """Names of the modules holding a LoRA adapter."""
    return sorted({m.group(1) for name, _ in dit.named_parameters() if (m := _PARAM.match(name))})


def lora_tensors(dit: nn.Module) -> dict[str, Tensor]:
    """The adapter parameters by their peft names (what training updates and checkpoints)."""
    return {name: p for name, p in dit.named_parameters() if _PARAM.match(name)}


def _by_module(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    pairs: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        m = _PARAM.match(name)
        if m is None:
            raise ValueError(f"{name!r} is not a LoRA parameter (<module>.lora_A/B.{ADAPTER}.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} has lora_{''.join(ab)} only")
    return {module: (ab["A"], ab["B"]) for module, ab in sorted(pairs.items())}


def export_lora(tensors: dict[str, Tensor], out: str | os.PathLike, rank: int, alpha: float,
                info: dict | None = None) -> Path:
    """Write ``DIFFUSERS_FILE``, ``WAN_FILE`` and ``INFO_FILE`` (rank, alpha, modules, ``info``)
    of the adapter ``tensors`` (``lora_tensors``' names) into ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scale = float(alpha) / int(rank)
    diffusers, wan = {}, {}
    for module, (a, b) in _by_module(tensors).items():
        a, b = a.detach().float().cpu().contiguous(), b.detach().float().cpu().contiguous()
        d, w = f"transformer.{to_diffusers_name(module)}", f"diffusion_model.{to_wan_name(module)}"
        diffusers.update({f"{d}.lora_A.weight": a, f"{d}.lora_B.weight": (b * scale).contiguous()})
        wan.update({f"{w}.lora_A.weight": a, f"{w}.lora_B.weight": b,
                    f"{w}.alpha": torch.tensor(float(alpha))})
    save_file(diffusers, out / DIFFUSERS_FILE, metadata={"format": "pt"})
    save_file(wan, out / WAN_FILE, metadata={"format": "pt"})
    meta = dict(rank=int(rank), alpha=float(alpha), modules=len(diffusers) // 2, **(info or {}))
    (out / INFO_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _lora_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in (DIFFUSERS_FILE, WAN_FILE):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"lora={path}: neither a .safetensors file nor a folder holding "
                            f"{DIFFUSERS_FILE} or {WAN_FILE}")


def read_lora(path: str | os.PathLike) -> dict[str, tuple[Tensor, Tensor]]:
    """A LoRA file (or folder) in diffusers', the original Wan / ComfyUI or peft's key format ->
    {our module name: (lora_A [r, in], lora_B [out, r] with alpha / r folded in)}."""
    from safetensors.torch import load_file

    file = _lora_file(Path(path))
    state = load_file(str(file))
    if not state:
        raise ValueError(f"{file} holds no tensors")
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in state.items():
        name = key.replace(f".{ADAPTER}.", ".")
        m = re.match(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$", name)
        if m is None:
            raise ValueError(f"{file}: key {key!r} is not a LoRA tensor (lora_A/B.weight, lora_down/up.weight, alpha)")
        module, kind = m.groups()
        if module.startswith("transformer."):
            module = from_diffusers_name(module[len("transformer."):])
        elif module.startswith("diffusion_model."):
            module = from_wan_name(module[len("diffusion_model."):])
        kind = {"lora_down.weight": "A", "lora_up.weight": "B", "lora_A.weight": "A",
                "lora_B.weight": "B"}.get(kind, kind)
        parts.setdefault(module, {})[kind] = t
    lora = {}
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            raise ValueError(f"{file}: module {module!r} lacks lora_{'B' if 'A' in p else 'A'}")
        a, b = p["A"].float(), p["B"].float()
        if "alpha" in p:
            b = b * (float(p["alpha"]) / a.shape[0])
        lora[module] = (a, b)
    return lora


@torch.no_grad()
def merge_lora(dit: nn.Module, lora: dict[str, tuple[Tensor, Tensor]], scale: float = 1.0) -> int:
    """W += scale * B @ A for each adapted linear of a plain (un-injected) ``dit``. Checks every
    module before changing any; returns how many were merged."""
    if not lora:
        raise ValueError("the LoRA holds no adapter: nothing to merge")
    modules = dict(dit.named_modules())
    for name, (a, b) in lora.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"LoRA module {name!r} is not a linear layer of this base DiT "
                             f"({'missing' if m is None else type(m).__name__}): a LoRA for another model?")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] \
                or (b.shape[0], a.shape[1]) != tuple(m.weight.shape):
            raise ValueError(f"LoRA module {name!r}: lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} "
                             f"does not fit the base weight {tuple(m.weight.shape)} (out, in): a LoRA "
                             "for another base")
    for name, (a, b) in lora.items():
        w = modules[name].weight
        w.add_((float(scale) * (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32))).to(w.dtype))
    return len(lora)
