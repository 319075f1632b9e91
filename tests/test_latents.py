"""Latent statistics, latent precompute (encode_latents) and the packed latent pipeline."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vidgen.data.latents import (
    LatentDataModule,
    decode_sample,
    load_empty_caption,
    parse_schedule,
    read_latents_info,
)
from vidgen.data.pipeline import build_video_dataset
from vidgen.models.dit import PackedBatch
from vidgen.models.vae import WanVAE
from vidgen.run import register_configs
from vidgen.tools import encode_latents, latent_stats

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
CLIP = ["data.num_frames=9", "data.height=32", "data.width=32", "data.num_workers=0"]


# ---------------------------------------------------------------- helpers (other test files import them)
def make_tiny_vae(path, seed=0) -> Path:
    torch.manual_seed(seed)
    WanVAE(**TINY_VAE).save_pretrained(path)
    return Path(path)


def compose_tool(name, overrides):
    register_configs()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=overrides)


def encode(vae, shards, out, *extra):
    """encode_latents through its Hydra config (MiniLM text, 9x32x32 clips unless overridden)."""
    cfg = compose_tool("encode_latents", [f"vae={vae}", f"data.shards={shards}", f"out={out}",
                                          *CLIP, *extra])
    return encode_latents.run(cfg)


def read_tar(path):
    """{key: {ext: bytes}} of a shard."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


# ---------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier stalls on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_text_encoder(monkeypatch):
    """Load MiniLM once per process: every encode_latents run would otherwise reload it."""
    import vidgen.text

    monkeypatch.setattr(vidgen.text, "build_text_encoder", cached_text_encoder)


def cached_text_encoder(name, **kwargs):
    from vidgen.text.encoders import build_text_encoder

    key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key not in _ENCODERS:
        _ENCODERS[key] = build_text_encoder(name, **kwargs)
    return _ENCODERS[key]


_ENCODERS: dict = {}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """12 clips (32px, 9 frames) in 3 shards of 4, plus 4 val clips."""
    from vidgen.data.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth3")
    make_synthetic_dataset(out, num_videos=12, size=32, frames=9, fps=8, val_videos=4, seed=1, shard_size=4)
    return out


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def latents(tmp_path_factory, shards, vae_dir):
    """Latents of every clip at two buckets (5x32x32 and 9x32x32), of a VAE without latent stats."""
    out = tmp_path_factory.mktemp("lat") / "train"
    encode(vae_dir, shards / "train", out, "every_bucket=true", "data.buckets=[5x32x32,9x32x32]",
           "chunked=false", "data.batch_size=8", "allow_identity_latent_stats=true")
    return out


# ---------------------------------------------------------------- latent stats
def _direct_mu(vae, shards, n):
    ds = build_video_dataset(shards, num_frames=9, height=32, width=32, batch_size=4,
                             resampled=False, deterministic=True, rank=0, world_size=1)
    with torch.no_grad():
        mu = torch.cat([vae.encode(b["video"])[0] for b, _ in zip(ds, range(n // 4))])
    return mu[:n]  # [n, C, t, h, w]: the first n clips, in the order the tool reads them


def test_latent_stats_match_a_direct_computation(tmp_path, shards, vae_dir):
    out = tmp_path / "with_stats"
    cfg = compose_tool("latent_stats", [f"ckpt={vae_dir}", f"data.shards={shards}/train",
                                        f"out={out}", "data.max_videos=8", *CLIP])
    latent_stats.run(cfg)
    vae = WanVAE.from_pretrained(out)
    mu = _direct_mu(WanVAE.from_pretrained(vae_dir), shards / "train", 8).double()
    per_channel = mu.transpose(0, 1).flatten(1)
    torch.testing.assert_close(vae.latents_mean.double(), per_channel.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vae.latents_std.double(), per_channel.std(1, correction=0), atol=1e-5, rtol=1e-5)
    z = vae.normalize(mu.float())
    assert z.transpose(0, 1).flatten(1).mean(1).abs().max() < 1e-4
    assert (z.transpose(0, 1).flatten(1).std(1, correction=0) - 1).abs().max() < 1e-4
    torch.testing.assert_close(vae.denormalize(z), mu.float(), atol=1e-5, rtol=1e-5)
    record = json.loads((out / "latent_stats.json").read_text())
    assert record["num_videos"] == 8 and len(record["mean"]) == TINY_VAE["z_dim"]


def test_latent_stats_cli_writes_in_place_atomically(tmp_path, shards, vae_dir):
    vae = make_tiny_vae(tmp_path / "vae")
    before = WanVAE.from_pretrained(vae).state_dict()
    cmd = [sys.executable, "-m", "vidgen.tools.latent_stats", f"ckpt={vae}",
           f"data.shards={shards}/train", "data.max_videos=4", *CLIP]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latent stats over 4 clips" in proc.stdout
    after = WanVAE.from_pretrained(vae)
    assert not torch.equal(after.latents_std, torch.ones(TINY_VAE["z_dim"]))
    for k, v in before.items():  # only the statistics changed
        if not k.startswith("latents_"):
            assert torch.equal(v, after.state_dict()[k]), k
    assert sorted(p.name for p in vae.iterdir()) == ["config.json", "latent_stats.json", "model.safetensors"]
    config = json.loads((vae / "config.json").read_text())
    assert config["latents_std"] == pytest.approx(after.latents_std.tolist())


def test_latent_stats_of_a_ckpt_file_needs_out(tmp_path, shards):
    cfg = compose_tool("latent_stats", [f"ckpt={tmp_path}/x.ckpt", f"data.shards={shards}/train", *CLIP])
    with pytest.raises(ValueError, match="pass out="):
        latent_stats.run(cfg)


# ---------------------------------------------------------------- encode_latents
def test_encoded_latent_equals_normalized_posterior_mean(tmp_path, shards, vae_dir):
    vae = make_tiny_vae(tmp_path / "vae", seed=3)
    WanVAE.from_pretrained(vae)
    v = WanVAE.from_pretrained(vae)
    v.set_latent_stats(torch.linspace(-0.5, 0.5, 4), torch.linspace(0.5, 2.0, 4))
    v.save_pretrained(vae)
    out = tmp_path / "lat"
    written = encode(vae, shards / "val", out)
    assert [Path(p).name for p in written] == ["shard-000000.tar"]
    stored = read_tar(out / "shard-000000.tar")
    ds = build_video_dataset(shards / "val", num_frames=9, height=32, width=32, batch_size=4,
                             resampled=False, deterministic=True, rank=0, world_size=1)
    from vidgen.text import build_text_encoder, trim_padding

    text_encoder = build_text_encoder("minilm")
    n = 0
    for batch in ds:
        with torch.no_grad():
            expected = v.normalize(v.encode(batch["video"])[0])
        emb = trim_padding(*text_encoder.encode(batch["caption"]))
        for i, key in enumerate(batch["key"]):
            tensors = decode_sample(stored[key]["safetensors"])
            latent, text = tensors["latent"], tensors["text"]
            assert sorted(tensors) == ["latent", "text"]  # text-to-video: no I2V condition
            torch.testing.assert_close(latent, expected[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(text, emb[i], atol=2e-3, rtol=2e-3)  # stored float16
            meta = json.loads(stored[key]["json"])
            assert meta["latent_shape"] == [4, 3, 4, 4] and meta["bucket"] == "9x32x32"
            assert meta["vae"] == os.path.abspath(vae) and meta["text_len"] == text.shape[0]
            assert stored[key]["txt"].decode() == batch["caption"][i]
            n += 1
    assert n == 4
    info = json.loads((out / "latents_info.json").read_text())
    assert info["text_encoder"] == "minilm" and info["text_dim"] == 384
    assert info["vae_config"]["latents_std"] == pytest.approx(torch.linspace(0.5, 2.0, 4).tolist())
    empty = load_empty_caption(out)
    torch.testing.assert_close(empty, trim_padding(*text_encoder.encode([""]))[0], atol=2e-3, rtol=2e-3)


def test_encode_latents_resumes_and_splits_by_rank(tmp_path, shards, vae_dir, latents, monkeypatch):
    names = sorted(p.name for p in latents.glob("*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert len(read_tar(latents / names[0])) == 8  # 4 clips x 2 buckets, keys <key>_<bucket>
    out = tmp_path / "resume"
    out.mkdir()
    for name in names[:2]:  # two shards "already done", one half-written
        (out / name).write_bytes((latents / name).read_bytes())
        os.utime(out / name, (1, 1))
    (out / (names[2] + ".tmp")).write_bytes(b"partial")
    (out / "latents_info.json").write_text((latents / "latents_info.json").read_text())
    written = encode(vae_dir, shards / "train", out, "every_bucket=true", "data.buckets=[5x32x32,9x32x32]",
                     "chunked=false", "data.batch_size=8", "allow_identity_latent_stats=true")
    assert [Path(p).name for p in written] == [names[2]]
    assert all(os.stat(out / n).st_mtime == 1 for n in names[:2]), "done shards are not rewritten"
    assert read_tar(out / names[2]).keys() == read_tar(latents / names[2]).keys()
    assert not list(out.glob("*.tmp"))

    # process 1 of 2 takes shards 1, 3, 5, ... (process 0 would take 0, 2, ...)
    split = tmp_path / "split"
    got = encode(vae_dir, shards / "train", split, "rank=1", "world=2", "allow_identity_latent_stats=true")
    assert [Path(p).name for p in got] == [names[1]]
    assert sorted(p.name for p in split.glob("*.tar")) == [names[1]]
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert encode_latents.rank_and_world(None, None) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun
    assert encode_latents.rank_and_world(None, None) == (3, 4)
    with pytest.raises(ValueError, match="need 0 <= rank < world, got rank=4, world=4"):
        encode_latents.rank_and_world(4, None)


def test_encode_into_a_folder_of_another_vae_is_an_error(tmp_path, shards, latents):
    other = make_tiny_vae(tmp_path / "other", seed=5)
    o = WanVAE.from_pretrained(other)
    o.set_latent_stats(torch.zeros(4), torch.full((4,), 2.0))
    o.save_pretrained(other)
    with pytest.raises(ValueError, match="different settings .*vae_config"):
        encode(other, shards / "train", latents, "every_bucket=true", "data.buckets=[5x32x32,9x32x32]")


# ---------------------------------------------------------------- the packed pipeline
def test_pipeline_yields_packed_batches_within_budget(latents):
    dm = LatentDataModule(
        train=dict(shards=str(latents), max_tokens=40, batches_per_epoch=6, cfg_dropout=0.5,
                   shuffle_buffer=16, pack_buffer=16),
        val=dict(shards=str(latents), max_tokens=40), patch_size=(1, 2, 2), seed=0,
    )
    assert dm.info["text_encoder"] == "minilm" and dm.empty_text.shape[1] == 384
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    dropped = kept = 0
    for b in batches:
        p = b["packed"]
        assert isinstance(p, PackedBatch) and p.t is None and p.budget == 40
        assert 0 < p.num_tokens <= 40 and p.efficiency == p.num_tokens / 40
        bounds = p.cu_seqlens_ctx.tolist()
        for i, m in enumerate(p.meta):
            text = p.context[bounds[i]: bounds[i + 1]]
            if m.get("dropped"):
                dropped += 1
                assert torch.equal(text, dm.empty_text)
            else:
                kept += 1
                assert m["caption"] and m["bucket"] in ("5x32x32", "9x32x32")
    assert dropped > 0 and kept > 0
    # the first-fit-decreasing buffer packs these small samples tightly
    assert sum(b["packed"].num_tokens for b in batches) / (40 * 6) > 0.8
    # a pass of the validation set sees every sample exactly once
    val = [m["key"] for b in dm.val_dataloader() for m in b["packed"].meta]
    assert len(val) == len(set(val)) == 24


def test_streams_are_reproducible_per_seed_rank_and_epoch(latents):
    dm = LatentDataModule(train=dict(shards=str(latents), max_tokens=24, batches_per_epoch=4),
                          patch_size=(1, 2, 2), seed=3)

    def keys(rank, epoch):
        ds = dm.train_dataset(rank=rank, world_size=2)
        return [[m["key"] for m in b["packed"].meta] for b in ds.iterate(epoch=epoch)]

    assert keys(0, 0) == keys(0, 0)
    assert keys(0, 0) != keys(1, 0) and keys(0, 0) != keys(0, 1)


def test_schedule_switches_buckets_and_budget_at_a_batch(latents):
    dm = LatentDataModule(
        train=dict(shards=str(latents), max_tokens=16, buckets=["5x32x32"], batches_per_epoch=5,
                   schedule=[{"step": 7, "buckets": ["9x32x32"], "max_tokens": 36}]),
        patch_size=(1, 2, 2), seed=0,
    )
    ds = dm.train_dataset(rank=0, world_size=1)
    for epoch in (0, 1):
        # two workers, merged round-robin as the DataLoader does
        streams = [list(ds.iterate(worker=w, num_workers=2, epoch=epoch)) for w in (0, 1)]
        merged = [s[i] for i in range(3) for s in streams if i < len(s)]
        assert len(merged) == 5
        for i, b in enumerate(merged):
            step = epoch * 5 + i
            p = b["packed"]
            want = ("9x32x32", 36, 1) if step >= 7 else ("5x32x32", 16, 0)
            assert (b["stage"], p.budget) == (want[2], want[1]), step
            assert {m["bucket"] for m in p.meta} == {want[0]} and p.num_tokens <= want[1]
    # resuming mid-epoch keeps the batch -> stage mapping
    resumed = list(ds.iterate(epoch=1, start_batch=2))
    assert [b["stage"] for b in resumed] == [1, 1, 1]


def test_schedule_and_config_errors(latents, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="schedule steps must increase"):
        parse_schedule(8, None, [{"step": 5}, {"step": 5}])
    with pytest.raises(ValueError, match=r"only keys \['buckets', 'max_tokens', 'step'\]"):
        parse_schedule(8, None, [{"step": 5, "tokens": 3}])
    with pytest.raises(ValueError, match="FRAMESxHEIGHTxWIDTH"):
        parse_schedule(8, ["17-64-64"], None)
    with pytest.raises(ValueError, match=r"unknown keys \['batch_size'\]"):
        LatentDataModule(train=dict(shards=str(latents), max_tokens=8, batch_size=4))
    with pytest.raises(FileNotFoundError, match="latents_info.json not found"):
        (tmp_path / "x.tar").write_bytes(b"")
        read_latents_info([str(tmp_path / "x.tar")])
    dm = LatentDataModule(train=dict(shards=str(latents), max_tokens=24, buckets=["17x32x32"],
                                     batches_per_epoch=2), patch_size=(1, 2, 2))
    with pytest.raises(ValueError, match="more than max_tokens=8"):
        small = LatentDataModule(train=dict(shards=str(latents), max_tokens=8, batches_per_epoch=2),
                                 patch_size=(1, 2, 2))
        next(iter(small.train_dataset(rank=0, world_size=1).iterate()))
    monkeypatch.setattr("vidgen.data.latents._MAX_REJECTED", 100)  # the stream is endless otherwise
    with pytest.raises(RuntimeError, match=r"no latent sample of buckets \['17x32x32'\]"):
        next(iter(dm.train_dataset(rank=0, world_size=1).iterate()))
