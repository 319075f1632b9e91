"""Precompute DiT training data: video shards -> latent shards (VAE latents + text embeddings).

    python -m vidgen.tools.encode_latents vae=outputs/vae_stage3/<run> \
        "data.shards='shards/{00000..00999}.tar'" out=latents/256px \
        data.buckets='[17x256x256,17x256x448]' [text_encoder=minilm | /models/umt5-xxl]
    # several processes, each taking its own shards (or torchrun: RANK / WORLD_SIZE are read):
    python -m vidgen.tools.encode_latents ... rank=0 world=4 &  ...  rank=3 world=4
    # image-to-video: also the first-frame condition (and CLIP tokens with an image encoder)
    python -m vidgen.tools.encode_latents ... i2v=true [image_encoder=/models/clip-vit-h-14]

Every input shard ``<name>.tar`` becomes ``<out>/<name>.tar`` holding, per sample, the same
key (a ``_<bucket>`` suffix is added with ``every_bucket=true``) and:

    {key}.safetensors   "latent": [C, t, h, w] = vae.normalize(mu), the normalised posterior
                        mean (``latent_dtype``, float32 by default);
                        "text": [L, D] the caption's token embeddings trimmed to its real
                        length L (``text_dtype``, float16 by default: halves the largest part
                        of a T5 latent shard; the loader casts both back to float32)
                        with ``i2v=true`` (image-to-video) also "cond": [C, t, h, w] the
                        normalised latent of the clip's first frame followed by zero frames
                        (``latent_dtype``), and with ``image_encoder=<CLIP dir>`` "image":
                        [Li, Di] that frame's image-encoder tokens (``text_dtype``)
    {key}.txt           the caption
    {key}.json          the source JSON + latent_shape, bucket, frame_indices, text_len, vae

Dataset-level files in ``<out>``: ``latents_info.json`` (VAE path and config, whose
``latents_mean`` / ``latents_std`` are the statistics the latents were normalised with:
training and sampling compare them with the VAE that decodes; text encoder, dtypes, buckets)
and ``empty_caption.safetensors`` (the embedding of "" that caption dropout and
classifier-free guidance use). Re-running into the same folder with another VAE or text
encoder is an error, not a silent mix. So is a VAE without latent statistics (mean 0 / std 1:
run ``vidgen.tools.latent_stats`` on it first), unless ``allow_identity_latent_stats=true``.

Resumable: a shard is written as ``<name>.tar.tmp`` and renamed when complete, and shards
that already exist in ``<out>`` are skipped. Process ``rank`` of ``world`` takes input shards
``rank, rank + world, ...``. Clips are taken centred (deterministic), as in validation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from tqdm import tqdm

from vidgen import text as text_encoders  # module attribute: tests swap build_text_encoder
from vidgen.data.buckets import parse_buckets
from vidgen.data.latents import EMPTY_NAME, FORMAT, INFO_NAME, encode_sample
from vidgen.data.pipeline import build_video_dataset
from vidgen.data.shards import expand_shards
from vidgen.i2v import encode_condition_latent
from vidgen.image_encoder import build_image_encoder
from vidgen.models.vae import load_vae
from vidgen.models.vae.stats import check_not_identity, stats_of
from vidgen.text import trim_padding
from vidgen.utils.rundir import register_resolvers

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rank_and_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """Explicit values first, then torchrun (RANK / WORLD_SIZE) or SLURM, else (0, 1)."""
    env_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    env_world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    rank = int(env_rank) if rank is None else int(rank)
    world = int(env_world) if world is None else int(world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return rank, world


def _dtype(name: str, what: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{what}={name!r} is not a storage dtype; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_dataset_files(out: Path, info: dict, empty_text: torch.Tensor, text_dtype) -> None:
    """Write (or check against) ``latents_info.json`` and the empty-caption embedding."""
    path = out / INFO_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        keys = ("format", "vae_config", "text_encoder", "text_dim", "latent_dtype", "text_dtype", "i2v")
        diff = [k for k in keys if old.get(k) != info.get(k)]
        if diff:
            raise ValueError(
                f"{out} already holds latents made with different settings ({', '.join(diff)}: "
                f"{[old.get(k) for k in diff]} there vs {[info.get(k) for k in diff]} now); "
                "write to a new out= folder"
            )
        return
    # Every process may get here at once; each writes the same content atomically.
    _write_atomic(out / EMPTY_NAME, st_save({"text": empty_text.to(text_dtype).contiguous().cpu()}))
    _write_atomic(path, (json.dumps(info, indent=2) + "\n").encode())


def output_names(shards: list[str]) -> list[str]:
    """Output file name per input shard (its basename); two inputs with one name is an error."""
    names = [os.path.basename(s.rstrip("/")) for s in shards]
    names = [n if n.endswith(".tar") else n + ".tar" for n in names]
    seen: dict[str, str] = {}
    for shard, name in zip(shards, names):
        if name in seen:
            raise ValueError(
                f"input shards {seen[name]} and {shard} would both be written as {name}; "
                "encode them into different out= folders"
            )
        seen[name] = shard
    return names


@torch.no_grad()
def encode_shard(
    shard: str, dst: Path, vae, text_encoder, *, data, every_bucket: bool, latent_dtype,
    text_dtype, vae_ref: str, chunked: bool, device: torch.device, i2v: bool = False,
    image_encoder=None,
) -> dict:
    """Encode one video shard into the latent shard ``dst`` (atomically); returns counts."""
    import webdataset as wds

    if data.buckets is None:
        bucket_sets = [None]
    else:
        buckets = [str(b) for b in parse_buckets(list(data.buckets))]
        bucket_sets = [[b] for b in buckets] if every_bucket else [buckets]
    counts = {"samples": 0, "skipped": 0}
    tmp = dst.with_name(dst.name + ".tmp")
    with wds.TarWriter(str(tmp), encoder=False) as sink:
        for bucket_set in bucket_sets:
            dataset = build_video_dataset(
                [shard], mode="video", num_frames=data.num_frames, height=data.height,
                width=data.width, buckets=bucket_set, frame_stride=data.frame_stride,
                target_fps=data.target_fps, batch_size=data.batch_size, resampled=False,
                deterministic=True, seed=0, rank=0, world_size=1, shard_retry=data.shard_retry,
            )
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=data.num_workers
            )
            for batch in loader:
                counts["skipped"] += int(batch["num_skipped"])
                video = batch["video"].to(device)
                mu, _ = vae.encode(video, chunked=chunked)
                z = vae.normalize(mu).to(latent_dtype).cpu()
                cond = image = None
                if i2v:
                    cond = encode_condition_latent(vae, video, chunked).to(latent_dtype).cpu()
                if image_encoder is not None:
                    image = image_encoder.encode(video[:, :, 0]).to(text_dtype).cpu()
                emb, mask = text_encoder.encode(batch["caption"])
                texts = trim_padding(emb.float(), mask)
                for i, key in enumerate(batch["key"]):
                    meta = dict(batch["meta"][i])
                    meta["source_shard"] = meta.pop("shard", shard)
                    out_key = f"{key}_{meta['bucket']}" if every_bucket else key
                    meta.update(
                        latent_shape=list(z[i].shape), text_len=int(texts[i].shape[0]),
                        vae=vae_ref, source_key=key,
                    )
                    sink.write({
                        "__key__": out_key,
                        "safetensors": encode_sample(
                            z[i], texts[i].to(text_dtype), None if cond is None else cond[i],
                            None if image is None else image[i],
                        ),
                        "txt": batch["caption"][i].encode("utf-8"),
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                    })
                    counts["samples"] += 1
    os.replace(tmp, dst)
    return counts


def run(cfg) -> list[str]:
    """The CLI body (cfg: the composed ``configs/encode_latents.yaml``); returns shards written."""
    rank, world = rank_and_world(cfg.rank, cfg.world)
    latent_dtype = _dtype(cfg.latent_dtype, "latent_dtype")
    text_dtype = _dtype(cfg.text_dtype, "text_dtype")
    if cfg.device == "auto":
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    shards = expand_shards(cfg.data.shards)
    names = output_names(shards)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    vae = load_vae(cfg.vae, trust=cfg.trust_checkpoint).to(device).eval()
    check_not_identity(stats_of(vae), cfg.vae, allow=cfg.allow_identity_latent_stats)
    if cfg.data.buckets is None:
        vae.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)  # validates
    else:
        for b in parse_buckets(list(cfg.data.buckets)):
            vae.latent_shape(b.frames, b.height, b.width)
    kwargs = {} if cfg.text_max_length is None else {"max_length": cfg.text_max_length}
    text_encoder = text_encoders.build_text_encoder(cfg.text_encoder, device=device, **kwargs)
    empty_emb, empty_mask = text_encoder.encode([""])
    vae_ref = os.path.abspath(cfg.vae)
    image_encoder, i2v_info = None, None
    if cfg.i2v:
        image_encoder = build_image_encoder(cfg.image_encoder, device=device)
        i2v_info = dict(
            temporal=int(vae.temporal_compression),
            image_encoder=None if image_encoder is None else os.path.abspath(cfg.image_encoder),
            image_dim=None if image_encoder is None else int(image_encoder.dim),
        )
    elif cfg.image_encoder not in (None, "none"):
        raise ValueError(f"image_encoder={cfg.image_encoder!r} needs i2v=true (image tokens are "
                         "part of the image-to-video condition)")
    info = dict(
        format=FORMAT, vae=vae_ref, vae_config=vae.config, normalized=True,
        text_encoder=str(cfg.text_encoder), text_dim=int(text_encoder.dim),
        text_max_length=int(text_encoder.max_length), latent_dtype=cfg.latent_dtype,
        text_dtype=cfg.text_dtype, empty_caption=EMPTY_NAME, every_bucket=bool(cfg.every_bucket),
        buckets=None if cfg.data.buckets is None else [str(b) for b in cfg.data.buckets],
        clip=None if cfg.data.buckets is not None
        else f"{cfg.data.num_frames}x{cfg.data.height}x{cfg.data.width}",
    )
    if i2v_info is not None:  # absent for text-to-video, so T2V folders stay as they were
        info["i2v"] = i2v_info
    write_dataset_files(out, info, trim_padding(empty_emb, empty_mask)[0], text_dtype)

    mine = [(s, n) for i, (s, n) in enumerate(zip(shards, names)) if i % world == rank]
    todo = [(s, n) for s, n in mine if not (out / n).is_file()]
    print(f"rank {rank}/{world}: {len(mine)} shard(s), {len(mine) - len(todo)} already done, "
          f"{len(todo)} to encode into {out}")
    written, totals = [], {"samples": 0, "skipped": 0}
    bar = tqdm(todo, desc=f"encode_latents[{rank}]", unit="shard")
    for shard, name in bar:
        counts = encode_shard(
            shard, out / name, vae, text_encoder, data=cfg.data, every_bucket=cfg.every_bucket,
            latent_dtype=latent_dtype, text_dtype=text_dtype, vae_ref=vae_ref,
            chunked=cfg.chunked, device=device, i2v=bool(cfg.i2v), image_encoder=image_encoder,
        )
        totals = {k: totals[k] + counts[k] for k in totals}
        written.append(str(out / name))
        bar.set_postfix(samples=totals["samples"], skipped=totals["skipped"])
    print(f"rank {rank}: wrote {len(written)} shard(s), {totals['samples']} samples, "
          f"{totals['skipped']} skipped (see warnings above for reasons)")
    return written


def main() -> None:
    import hydra

    register_resolvers()
    config_dir = str(Path(__file__).resolve().parents[2] / "configs")
    hydra.main(version_base="1.3", config_path=config_dir, config_name="encode_latents")(run)()


if __name__ == "__main__":
    main()
