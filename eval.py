"""Evaluate a vidgen model and write a report folder.

    python eval.py task=vae_recon ckpt=outputs/vae_stage2/<run> data.shards='val/{0000..0009}.tar' \
        out=reports/vae_stage2
    python eval.py task=vae_recon ckpt=... metrics.lpips=false metrics.fvd=false   # PSNR/SSIM only
    python eval.py task=dit_gen ckpt=outputs/dit_stage2/<run> data.shards=...     # FVD, captions
    python eval.py task=dit_i2v ckpt=outputs/dit_i2v/<run> data.shards=...        # from first frames

Writes <out>/report.json, report.md, grid PNGs and a per-timestep PSNR/SSIM plot.
Several GPUs: `torchrun --nproc-per-node 8 eval.py ...` (statistics are summed over ranks).
"""

import hydra
from omegaconf import DictConfig

from vidgen.utils.rundir import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from vidgen.evaluate import evaluate

    out = evaluate(cfg)
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
