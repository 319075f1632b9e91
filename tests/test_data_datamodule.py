"""vidgen.data.datamodule: loaders, epochs (with and without a Trainer), Hydra-style input."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from vidgen.data.datamodule import VideoDataModule
from vidgen.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm")
    make_synthetic_dataset(out, num_videos=16, size=32, frames=9, val_videos=3, seed=0, shard_size=8)
    return out


def make_dm(data, **kwargs):
    clip = dict(num_frames=5, height=32, width=32)
    return VideoDataModule(
        train=dict(shards=str(data / "train"), batches_per_epoch=3, shuffle_buffer=8, **clip),
        val=dict(shards=str(data / "val"), **clip),
        batch_size=2, **kwargs,
    )


def keys_of(loader):
    return [tuple(b["key"]) for b in loader]


def test_epochs_differ_and_reproduce_without_trainer(data):
    loader = make_dm(data).train_dataloader()
    epoch0, epoch1 = keys_of(loader), keys_of(loader)
    assert len(epoch0) == len(epoch1) == 3 and epoch0 != epoch1
    fresh = make_dm(data).train_dataloader()
    assert keys_of(fresh) == epoch0 and keys_of(fresh) == epoch1
    assert keys_of(make_dm(data, seed=1).train_dataloader()) != epoch0


def test_val_loader_reads_everything_once(data):
    dm = make_dm(data, num_workers=2)
    batches = list(dm.val_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == [f"00000000{i}_val" for i in range(3)]
    assert all(b["video"].shape[1:] == (3, 5, 32, 32) for b in batches)
    no_val = VideoDataModule(train=dict(shards=str(data / "train")))
    assert no_val.val_dataloader() == []


def test_accepts_omegaconf_and_rejects_conflicts(data):
    cfg = OmegaConf.create({"shards": [str(data / "train" / "shard-000000.tar")],
                            "buckets": ["5x32x32"], "batches_per_epoch": 1})
    dm = VideoDataModule(train=cfg, batch_size=2)
    assert isinstance(dm.train_kwargs["buckets"], list)
    (batch,) = list(dm.train_dataloader())
    assert batch["video"].shape == (2, 3, 5, 32, 32)
    with pytest.raises(ValueError, match="train.batch_size=4 conflicts with VideoDataModule\\(batch_size=2\\)"):
        VideoDataModule(train=dict(shards="x", batch_size=4), batch_size=2)
    with pytest.raises(ValueError, match="needs a dict with 'shards'"):
        VideoDataModule(train=dict(num_frames=5))
    # bucket specs and weights fail when the module is built, not when training starts
    with pytest.raises(ValueError, match=r"VideoDataModule\(train=...\): bucket_weights has 1 entries \[1\] for the 2"):
        VideoDataModule(train=dict(shards="x", buckets=["5x32x32", "1x32x32"], bucket_weights=[1]))
    with pytest.raises(ValueError, match=r"VideoDataModule\(val=...\): bucket_weights.* only apply to resampled"):
        VideoDataModule(train=dict(shards="x"), val=dict(shards="x", bucket_weights=[1]))
    with pytest.raises(ValueError, match="bucket '5x32' is not of the form FRAMESxHEIGHTxWIDTH"):
        VideoDataModule(train=dict(shards="x", buckets=["5x32"]))


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch_idx, tuple(batch["key"])))
        return self.w * batch["video"].mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(data, root, ckpt_path=None, callbacks=()):
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
    )
    trainer.fit(model, datamodule=make_dm(data), ckpt_path=ckpt_path)
    return model.seen, trainer.global_step


def test_uint8_transfer_is_converted_after_the_batch_transfer(data):
    as_uint8, as_float = make_dm(data, transfer_dtype="uint8"), make_dm(data, transfer_dtype="float32")
    raw = next(iter(as_uint8.train_dataloader()))
    assert raw["video"].dtype == torch.uint8
    converted = as_uint8.on_after_batch_transfer(raw, 0)
    expected = next(iter(as_float.train_dataloader()))
    assert converted["key"] == expected["key"] and torch.equal(converted["video"], expected["video"])
    with pytest.raises(ValueError, match="transfer_dtype"):
        make_dm(data, transfer_dtype="float16")
    with pytest.raises(ValueError, match="transfer_dtype"):
        VideoDataModule(train=dict(shards=str(data / "train"), dtype="uint8"))


def test_trainer_epochs_and_mid_epoch_resume(data, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full, steps = fit(data, tmp_path / "a", callbacks=[checkpoint])
    assert steps == 6 and [(e, i) for e, i, _ in full] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    # The Trainer's epochs are the same streams as plain passes over the loader.
    plain = make_dm(data).train_dataloader()
    assert [k for _, _, k in full[:3]] == keys_of(plain)
    assert [k for _, _, k in full[3:]] == keys_of(plain)

    # Resume after step 4 (epoch 1, batch 0 done): exactly the 2 remaining batches run, and
    # they are the batches of the uninterrupted run.
    resumed, steps = fit(data, tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert steps == 6 and [(e, i) for e, i, _ in resumed] == [(1, 1), (1, 2)]
    assert [k for _, _, k in resumed] == [k for _, _, k in full[4:]]
