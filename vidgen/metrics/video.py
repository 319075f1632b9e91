"""Streaming reconstruction metrics over a dataset of videos: PSNR, SSIM, LPIPS.

Aggregation: each metric is computed per frame, averaged over the frames of a video, then
over videos (so long and short clips weigh the same). Per-timestep curves average frame t
over the videos that have a frame t (later timesteps may count fewer videos when clip
lengths differ; `count_t` says how many).

Reconstructions are clamped to [-1, 1] before scoring, as writing them to a video file would.
"""

from __future__ import annotations

import torch

from vidgen.metrics.distributed import all_reduce_max_int, all_reduce_sum
from vidgen.metrics.frames import lpips_per_frame, psnr_per_frame, ssim_per_frame


class VideoMetrics:
    """Accumulates PSNR / SSIM / LPIPS of (real, recon) video pairs.

    m = VideoMetrics(psnr=True, ssim=True, lpips_model=build_lpips("alex"))
    m.update(real, recon)     # [B, C, T, H, W] in [-1, 1]
    m.compute()  # {"psnr", "ssim", "lpips", "num_videos", "psnr_t", "ssim_t", "lpips_t", "count_t"}

    lpips_model: enables LPIPS (None disables it). Under torch.distributed, compute() sums
    the state over ranks (every rank must call it); the local state is left as is.
    State is kept on the CPU in float64: a few numbers per video and per timestep.
    """

    def __init__(
        self,
        psnr: bool = True,
        ssim: bool = True,
        lpips_model: torch.nn.Module | None = None,
        chunk: int = 16,
    ):
        self.lpips_model = lpips_model
        self.chunk = chunk
        self.names = [
            n
            for n, on in (("psnr", psnr), ("ssim", ssim), ("lpips", lpips_model is not None))
            if on
        ]
        if not self.names:
            raise ValueError(
                "VideoMetrics needs at least one of psnr=True, ssim=True, lpips_model=..."
            )
        self.reset()

    def reset(self) -> None:
        self.num_videos = 0
        self.video_mean_sum = {n: 0.0 for n in self.names}  # sum over videos of per-video means
        self.sum_t = {n: torch.zeros(0, dtype=torch.float64) for n in self.names}  # [T_max]
        self.count_t = torch.zeros(0, dtype=torch.float64)  # videos that reached frame t

    @torch.no_grad()
    def update(self, real: torch.Tensor, recon: torch.Tensor) -> None:
        """real, recon: [B, C, T, H, W] in [-1, 1] (recon is clamped to that range)."""
        if real.shape != recon.shape or real.dim() != 5:
            raise ValueError(
                f"VideoMetrics.update expects real and recon of one shape [B, C, T, H, W], got "
                f"{tuple(real.shape)} and {tuple(recon.shape)}"
            )
        recon = recon.clamp(-1.0, 1.0)
        per_frame = {}  # name -> [B, T]
        if "psnr" in self.names or "ssim" in self.names:
            real01, recon01 = (real + 1) / 2, (recon + 1) / 2
            if "psnr" in self.names:
                per_frame["psnr"] = psnr_per_frame(real01, recon01)
            if "ssim" in self.names:
                per_frame["ssim"] = ssim_per_frame(real01, recon01, chunk=self.chunk)
        if "lpips" in self.names:
            per_frame["lpips"] = lpips_per_frame(real, recon, self.lpips_model, chunk=self.chunk)

        b, t = real.shape[0], real.shape[2]
        self._grow(t)
        for name, values in per_frame.items():
            values = values.detach().double().cpu()
            self.video_mean_sum[name] += values.mean(dim=1).sum().item()
            self.sum_t[name][:t] += values.sum(dim=0)
        self.count_t[:t] += b
        self.num_videos += b

    def _grow(self, t: int) -> None:
        """Extend the per-timestep buffers to length >= t with zeros."""
        extra = t - self.count_t.numel()
        if extra > 0:
            pad = torch.zeros(extra, dtype=torch.float64)
            self.count_t = torch.cat([self.count_t, pad])
            self.sum_t = {n: torch.cat([s, pad]) for n, s in self.sum_t.items()}

    def compute(self) -> dict:
        """Dataset averages and curves, summed over ranks when distributed.

        Returns {name: mean over videos of the per-video frame mean, for each enabled
        metric; "num_videos": int; f"{name}_t": list of per-timestep means; "count_t": list}.
        """
        # Ranks may have seen different clip lengths: agree on one curve length, then pack
        # every number into one tensor for a single all-reduce.
        t_max = all_reduce_max_int(self.count_t.numel())
        self._grow(t_max)
        packed = torch.cat(
            [
                torch.tensor(
                    [float(self.num_videos)] + [self.video_mean_sum[n] for n in self.names],
                    dtype=torch.float64,
                ),
                self.count_t,
                *[self.sum_t[n] for n in self.names],
            ]
        )
        packed = all_reduce_sum(packed)
        num_videos = int(round(packed[0].item()))
        if num_videos == 0:
            raise ValueError(
                "VideoMetrics.compute() called before any update(): no videos to average"
            )
        k = len(self.names)
        means, count_t = packed[1 : 1 + k], packed[1 + k : 1 + k + t_max]
        curves = packed[1 + k + t_max :].view(k, t_max) / count_t.clamp_min(1)

        out: dict = {"num_videos": num_videos}
        for i, name in enumerate(self.names):
            out[name] = means[i].item() / num_videos
            out[f"{name}_t"] = curves[i].tolist()
        out["count_t"] = [int(c) for c in count_t.tolist()]
        return out
