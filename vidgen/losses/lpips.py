"""LPIPS with an offline-safe backbone loader.

The `lpips` package ships its calibrated linear heads (`lpips/weights/v0.1/*.pth`) but asks
torchvision for the ImageNet backbone, which downloads it from the model hub. Our machines
have no hub, so we build the package's network with a random trunk and load the torchvision
backbone ourselves, from a configured file or from the torch hub cache, with strict key
checking. A missing file is an error naming where we looked: never a silent random trunk.
Tests ask for `random_backbone=True` explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# torchvision's file names for the ImageNet weights that LPIPS was calibrated on.
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def default_backbone_path(net: str) -> Path:
    """Where torchvision would have cached the backbone: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def _load_backbone(model, net: str, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    # torchvision keys are `features.<i>.weight`; lpips keeps the same <i> inside slices.
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    target = {}
    for slice_name, module in model.net.named_children():
        for idx, _ in module.named_children():
            for p in ("weight", "bias"):
                key = f"{idx}.{p}"
                if key in feats:
                    target[f"{slice_name}.{key}"] = feats.pop(key)
    missing, unexpected = model.net.load_state_dict(target, strict=False)
    if missing or not target:
        raise ValueError(
            f"LPIPS backbone file {path} does not fit torchvision's {net}: missing {missing[:5]}"
        )


def build_lpips(
    net: str = "alex",
    weights_path: str | os.PathLike | None = None,
    random_backbone: bool = False,
) -> torch.nn.Module:
    """A frozen `lpips.LPIPS` in eval mode. Inputs are images in [-1, 1], [N, 3, H, W].

    net: "alex" (default, the evaluation standard) or "vgg" (the usual training loss).
    weights_path: torchvision backbone file; default the torch hub cache
        ($TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth for alex).
    random_backbone: random trunk, for tests only; the linear heads still load.
    """
    import lpips

    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    path = Path(weights_path) if weights_path else default_backbone_path(net)
    if not random_backbone and not path.is_file():
        raise FileNotFoundError(
            f"LPIPS ({net}) needs torchvision's ImageNet backbone weights at {path}, which is "
            f"missing. Download {BACKBONE_FILES[net]} from download.pytorch.org/models/ on a "
            "machine with internet access and either place it there or set the LPIPS weights "
            "path (e.g. loss.lpips_weights=/path/to/file). For tests only, "
            "random_backbone=True uses a random trunk."
        )
    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if not random_backbone:
        _load_backbone(model, net, path)
    model.eval().requires_grad_(False)
    return model
