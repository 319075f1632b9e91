"""Train a vidgen model. Everything is a Hydra config; any value is overridable.

    python train.py experiment=vae/stage1 trainer.max_steps=10 optim.lr=3e-4
    python train.py experiment=vae/stage2 model.init_from=outputs/vae_stage1/<run>
    python train.py experiment=vae/stage2 trainer=ddp trainer.devices=8 \
        data.train.shards='shards/{00000..00999}.tar'
    python train.py experiment=vae/stage2 ckpt_path=last        # resume
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint $HEAD:29500 train.py trainer=ddp trainer.devices=8 trainer.num_nodes=4 ...
    python train.py -m launcher=slurm trainer=ddp trainer.devices=8 trainer.num_nodes=4 ...

See README.md for the stages and data format; `python train.py --help` lists the groups.
"""

import hydra
from omegaconf import DictConfig

from vidgen.run import register_configs, train

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
