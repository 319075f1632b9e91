"""Inception-v1 I3D (Carreira & Zisserman, 2017), the feature network of FVD.

The module and parameter names follow piergiaj/pytorch-i3d, the layout of the widely used
converted Kinetics-400 state dict `i3d_pretrained_400.pt` (VideoGPT, TATS, MCVD,
common_metrics_on_video_quality), so that file loads strictly:

    Conv3d_1a_7x7.conv3d.weight                     [64, 3, 7, 7, 7]
    Conv3d_1a_7x7.bn.{weight,bias,running_mean,running_var,num_batches_tracked}
    Conv3d_2b_1x1.*, Conv3d_2c_3x3.*
    Mixed_3b.{b0,b1a,b1b,b2a,b2b,b3b}.conv3d.weight / .bn.*   (b3a is the max pool)
    ... Mixed_3c, Mixed_4b-4f, Mixed_5b, Mixed_5c ...
    logits.conv3d.weight [400, 1024, 1, 1, 1], logits.conv3d.bias [400]

Convolutions and max pools use TensorFlow "SAME" padding computed from the input size
(the network was trained in TF); pools pad with zeros, which equals TF's ignore-padding
max pool because every pool input follows a ReLU (>= 0).

BatchNorm eps is 1e-5, as in the code that ships with `i3d_pretrained_400.pt` (VideoGPT's
`pytorch_i3d.py`); published FVD numbers from that file were computed with it.

Output: the 400 Kinetics logits averaged over the remaining time (and space) positions,
`[N, 400]`, the standard FVD feature for this network. At the protocol's 16x224x224 input
the final feature map is 2x7x7 and the final 2x7x7 average pool leaves one position, as in
the reference; smaller inputs (tests) clamp that pool window to the feature map.

Random weights (tests, `metrics.random_backbones=true`): `InceptionI3d(seed=0)` is built
with He-normal convolutions (std sqrt(2 / fan_in) before a ReLU), BatchNorm at identity
statistics (mean 0, var 1, scale 1, shift 0; eval mode) and a logits layer of std
sqrt(1 / fan_in) with zero bias, drawn from a private generator seeded with `seed`. Every
layer then keeps the second moment of its input (~1 at the logits), so the features vary
with the input and FVD grows with the distortion of a set. PyTorch's default conv init
(variance 1 / (3 fan_in)) instead shrinks the second moment ~6x per conv + ReLU: through
I3D's ~20 such layers the logits equal their bias for any input and FVD stays below 1e-9
even between clean and heavily noised clips. The weights are drawn after construction, so
the global RNG does not change them; `load_i3d` replaces them all.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

I3D_NUM_CLASSES = 400
I3D_WEIGHTS_FILE = "i3d_pretrained_400.pt"

# The trunk's layers in forward order (names as in the reference; pools have no weights).
ENDPOINTS = (
    "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
    "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3",
    "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2",
    "Mixed_5b", "Mixed_5c",
)  # fmt: skip

# (in_channels, [b0, b1a, b1b, b2a, b2b, b3b]) for every Inception block, in order.
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def same_pad(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
    """Zero-pad x [N, C, T, H, W] like TF "SAME": output size ceil(in / stride), the odd
    extra pixel at the back."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    (tf, tb), (hf, hb), (wf, wb) = pads
    return F.pad(x, (wf, wb, hf, hb, tf, tb))


class Unit3D(nn.Module):
    """SAME-padded Conv3d, then BatchNorm and ReLU (the logits layer has bias, no BN/ReLU)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        norm_act: bool = True,
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        self.kernel, self.stride, self.norm_act = tuple(kernel), tuple(stride), norm_act
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=not norm_act)
        if norm_act:
            self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(same_pad(x, self.kernel, self.stride))
        return F.relu(self.bn(x)) if self.norm_act else x


class MaxPool3dSame(nn.Module):
    """Max pool with TF "SAME" zero padding (inputs are post-ReLU, so zeros never win)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->3x3 | pool->1x1.

    (I3D's "3x3x3" branches replace Inception-v1's 5x5 with a second 3x3, as in the TF code.)
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], bn_eps: float):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = widths
        self.b0 = Unit3D(in_channels, c0, bn_eps=bn_eps)
        self.b1a = Unit3D(in_channels, c1a, bn_eps=bn_eps)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(in_channels, c2a, bn_eps=bn_eps)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3b, bn_eps=bn_eps)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))],
            dim=1,
        )


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------


class InceptionI3d(nn.Module):
    """I3D RGB network returning time-averaged Kinetics logits.

    forward(x): x [N, 3, T, H, W] in [-1, 1] (FVD protocol: T=16, H=W=224)
        -> [N, num_classes] logits averaged over the final time (and space) positions.

    Built in eval mode: it is a fixed feature extractor (no dropout; BatchNorm uses the
    loaded running statistics). Until weights are loaded it holds the seeded, informative
    random weights of `init_random_` (tests); real use goes through `load_i3d`.
    `weights` says which: "random:..." or the path of the loaded file.
    """

    def __init__(
        self,
        num_classes: int = I3D_NUM_CLASSES,
        in_channels: int = 3,
        bn_eps: float = 1e-5,
        seed: int = 0,
    ):
        super().__init__()
        self.in_channels = in_channels
        # Attribute names are the state-dict prefixes of the reference checkpoint.
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2), bn_eps=bn_eps)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, bn_eps=bn_eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(*_MIXED["Mixed_3b"], bn_eps)
        self.Mixed_3c = InceptionModule(*_MIXED["Mixed_3c"], bn_eps)
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(*_MIXED["Mixed_4b"], bn_eps)
        self.Mixed_4c = InceptionModule(*_MIXED["Mixed_4c"], bn_eps)
        self.Mixed_4d = InceptionModule(*_MIXED["Mixed_4d"], bn_eps)
        self.Mixed_4e = InceptionModule(*_MIXED["Mixed_4e"], bn_eps)
        self.Mixed_4f = InceptionModule(*_MIXED["Mixed_4f"], bn_eps)
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(*_MIXED["Mixed_5b"], bn_eps)
        self.Mixed_5c = InceptionModule(*_MIXED["Mixed_5c"], bn_eps)
        self.logits = Unit3D(self.Mixed_5c.out_channels, num_classes, norm_act=False)
        self.init_random_(seed)
        self.eval()

    @torch.no_grad()
    def init_random_(self, seed: int = 0) -> InceptionI3d:
        """Seeded random weights whose features depend on the input (see module docstring).

        Convs before a ReLU: N(0, 2 / fan_in) (He); BatchNorm: identity statistics;
        logits: N(0, 1 / fan_in), bias 0. Same seed, same weights, on any machine.
        """
        g = torch.Generator().manual_seed(seed)
        for unit in self.modules():
            if not isinstance(unit, Unit3D):
                continue
            w = unit.conv3d.weight
            gain = 2.0 if unit.norm_act else 1.0
            w.copy_(torch.randn(w.shape, generator=g) * math.sqrt(gain / w[0].numel()))
            if unit.norm_act:
                unit.bn.reset_parameters()  # running mean 0 / var 1, weight 1, bias 0
            else:
                unit.conv3d.bias.zero_()
        self.weights = (
            f"random:seed={seed} (He-normal convs, identity BatchNorm; test backbone, "
            "figures meaningless)"
        )
        return self

    def train(self, mode: bool = True) -> InceptionI3d:
        # Always eval: a parent's .train() (e.g. Lightning entering a training epoch with the
        # metric attached) must not switch BatchNorm to batch statistics, which would change
        # FVD features. torchmetrics' frozen Inception does the same.
        return super().train(False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, T, H, W] -> Mixed_5c features [N, 1024, ~T/8, ~H/32, ~W/32]."""
        for name in ENDPOINTS:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"InceptionI3d expects [N, {self.in_channels}, T, H, W] in [-1, 1], got {tuple(x.shape)}"
            )
        x = self.trunk(x)
        # Reference: AvgPool3d((2, 7, 7), stride 1). The window is clamped to the feature map
        # so inputs smaller than 16x224x224 still run; at the protocol size it is unchanged.
        t, h, w = x.shape[2:]
        x = F.avg_pool3d(x, (min(2, t), min(7, h), min(7, w)), stride=1)
        x = self.logits(x)  # [N, classes, T', H', W']; T'=H'=W'=1 at 16x224x224
        return x.mean(dim=(2, 3, 4))


# --------------------------------------------------------------------------------------
# Loading the converted Kinetics-400 weights
# --------------------------------------------------------------------------------------


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> InceptionI3d:
    """The Kinetics-400 I3D from a local `i3d_pretrained_400.pt` state dict, frozen, eval.

    Strict: every key and shape must match. The one tolerance: BatchNorm's
    `num_batches_tracked` counters may be absent (files saved by older torch versions
    lack them; they play no part in eval) and are then set to 0.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FVD needs the I3D Kinetics-400 weights at {path}, which is missing. Get the "
            f"converted state dict '{I3D_WEIGHTS_FILE}' (the file VideoGPT / TATS / "
            "common_metrics_on_video_quality download; see their READMEs for the link) on a "
            "machine with internet access, copy it here, and point the FVD weights path of "
            "the eval config at it. There is no fallback: random I3D weights give meaningless FVD."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a TorchScript archive or pickled module is not a state dict
        raise ValueError(
            f"Could not read {path} as a plain state dict ({type(e).__name__}: {e}). Expected "
            f"the converted '{I3D_WEIGHTS_FILE}' state dict; the TorchScript 'i3d_torchscript.pt' "
            "used by StyleGAN-V is a different file and is not supported."
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors")

    model = InceptionI3d()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match InceptionI3d (piergiaj/pytorch-i3d naming, 400 classes): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}"
        )
    model.weights = str(path)  # recorded in the FVD protocol
    return model.to(device).requires_grad_(False)
