"""Data pipeline throughput: clips/s through build_video_dataset vs raw decord decoding.

    python bench/bench_data.py                       # synthetic 64px shards in a temp dir
    python bench/bench_data.py --size 128 --frames 33 --clip-frames 17 --workers 0 1 2 4

Each setting runs with float32 batches (converted in the worker) and uint8 batches
(pixels; the trainer converts them on its device, see ``VideoDataModule(transfer_dtype=)``).

The baseline decodes the same kind of clips (same frame count, random start) from mp4
bytes already in memory, in a plain loop with one decord thread: the cost the loader
cannot avoid. The pipeline adds tar reading, shuffling, bucketing, float conversion and
collation; with workers > 0 also the transfer of float32 batches to the main process.
Target: per worker, the pipeline keeps >= 0.9x the raw rate, and its total grows with
workers up to the number of free cores.

Images: the same pipeline over image shards (img2dataset layout, ``{key}.jpg``) into a
1-frame bucket, against a plain loop that decodes the same JPEG bytes with PIL (target:
>= 0.9x per CPU-second). Remote: the video shards served by ``python -m http.server`` (a
separate process, its CPU not counted) against the same shards read from disk.

Two measures. Wall clock: clips/s, best of ``--trials`` runs (on a shared machine other
processes only ever make a run slower). CPU: clips per CPU-second, counting the main
process and (after they exit) the loader workers; it is what one worker's core buys, and
it stays meaningful when the machine is busy.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import resource
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings

import numpy as np
from torch.utils.data import DataLoader, Dataset

from vidgen.data.pipeline import build_video_dataset, keep_batch
from vidgen.data.shards import VideoShardWriter
from vidgen.data.synthetic import make_synthetic_dataset
from vidgen.data.video import open_video, resize_frames, sample_frame_indices


def load_mp4s(shard_dir: str) -> list[bytes]:
    videos = []
    for name in sorted(os.listdir(shard_dir)):
        with tarfile.open(os.path.join(shard_dir, name)) as tar:
            videos += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".mp4")]
    return videos


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def raw_decode_rate(videos: list[bytes], clip_frames: int, num_clips: int, seed: int = 0) -> tuple[float, float]:
    """(clips/s, clips per CPU-s) decoding random clips from in-memory bytes, one thread."""
    rng = np.random.default_rng(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(num_clips):
        vr = open_video(videos[i % len(videos)])
        indices = sample_frame_indices(len(vr), clip_frames, rng=rng)
        vr.get_batch(indices).asnumpy()
    return num_clips / (time.perf_counter() - wall), num_clips / (time.process_time() - cpu)


def write_image_shards(videos: list[bytes], out: str, size: int) -> list[bytes]:
    """JPEG images (frame 0 of each video, resized to ``size``) as img2dataset-style shards;
    -> the JPEG bytes, for the raw loop."""
    from PIL import Image

    jpegs = []
    with VideoShardWriter(out, max_samples=100) as writer:
        for i, mp4 in enumerate(videos):
            frame = resize_frames(open_video(mp4)[0].asnumpy()[None], size, size)[0]
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, "JPEG", quality=90)
            jpegs.append(buf.getvalue())
            writer.write(f"{i:06d}", jpegs[-1], f"image {i}", dict(height=size, width=size), ext="jpg")
    return jpegs


def raw_image_rate(jpegs: list[bytes], num_images: int, decoder: str = "pil") -> tuple[float, float]:
    """(images/s, images per CPU-s) decoding in-memory JPEGs to uint8 ``[H, W, 3]`` in a
    plain loop, with PIL or with simplejpeg (libjpeg-turbo, what the pipeline uses)."""
    import simplejpeg
    from PIL import Image

    def pil(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def turbo(data):
        return simplejpeg.decode_jpeg(data, colorspace="RGB")

    decode = {"pil": pil, "simplejpeg": turbo}[decoder]
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(num_images):
        decode(jpegs[i % len(jpegs)])
    return num_images / (time.perf_counter() - wall), num_images / (time.process_time() - cpu)


class StaticServer:
    """``python -m http.server`` in its own process, serving ``directory`` on a free port."""

    def __init__(self, directory: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):  # until it answers
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("http.server did not start")

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def pipeline_rate(shards: str, workers: int, args, dtype: str = "float32", frames: int | None = None,
                  size: int | None = None, count: int | None = None) -> tuple[float, float]:
    """(clips/s after a warm-up batch per worker, clips per CPU-s over the whole run)."""
    num_batches = (count or args.clips) // args.batch_size
    size = size or args.size
    dataset = build_video_dataset(
        shards, num_frames=frames or args.clip_frames, height=size, width=size,
        batch_size=args.batch_size, batches_per_epoch=num_batches + max(1, workers),
        shuffle_buffer=args.shuffle_buffer, seed=0, dtype=dtype,
    )
    loader = DataLoader(dataset, batch_size=None, collate_fn=keep_batch, num_workers=workers)  # as VideoDataModule
    return loader_rate(loader, workers, lambda batch: len(batch["key"]))


def loader_rate(loader: DataLoader, workers: int, count) -> tuple[float, float]:
    """(items/s after a warm-up batch per worker, items per CPU-s over the whole run, the
    workers' CPU included); ``count(batch)`` is the number of items in a batch."""
    cpu_main, cpu_children = time.process_time(), _children_cpu()
    it = iter(loader)
    total = 0
    for _ in range(max(1, workers)):  # one batch per worker: process start + buffer fill
        total += count(next(it))
    wall = time.perf_counter()
    timed = sum(count(batch) for batch in it)  # exhausting it also joins the workers
    wall = time.perf_counter() - wall
    total += timed
    cpu = (time.process_time() - cpu_main) + (_children_cpu() - cpu_children)
    return timed / wall, total / cpu


class PILImages(Dataset):
    """The raw PIL loop as a torch map-style dataset (uint8 ``[H, W, 3]`` per item), for
    torch's stock DataLoader and ``default_collate``: the cost any loader pays to move
    batches out of its workers, with nothing of ours in it."""

    def __init__(self, jpegs: list[bytes], num_images: int):
        self.jpegs, self.num_images = jpegs, num_images

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.jpegs[i % len(self.jpegs)])).convert("RGB"))


def stock_loader_image_rate(jpegs: list[bytes], workers: int, args) -> tuple[float, float]:
    """(images/s, images per CPU-s) of PILImages through torch's DataLoader, same batch size."""
    count = args.images + max(1, workers) * args.batch_size  # the warm-up batches come on top
    # PIL's arrays are read-only; default_collate only reads them (stacking copies).
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    loader = DataLoader(PILImages(jpegs, count), batch_size=args.batch_size, num_workers=workers)
    return loader_rate(loader, workers, len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=33, help="frames per synthetic video")
    parser.add_argument("--clip-frames", type=int, default=17, help="frames per decoded clip")
    parser.add_argument("--clips", type=int, default=480, help="clips timed per setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shuffle-buffer", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "uint8"], choices=["float32", "uint8"],
                        help="batch dtype out of the pipeline (uint8: converted on the device later)")
    parser.add_argument("--trials", type=int, default=3, help="runs per setting; the best is shown")
    parser.add_argument("--image-size", type=int, default=256, help="side of the JPEG images (image rows)")
    parser.add_argument("--images", type=int, default=2400, help="images timed per setting")
    parser.add_argument("--skip", nargs="*", default=[], choices=["video", "images", "http"],
                        help="row groups to leave out")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_synthetic_dataset(tmp, num_videos=args.videos, size=args.size, frames=args.frames, shard_size=50)
        print(f"wrote {args.videos} synthetic {args.size}px {args.frames}-frame videos in {time.perf_counter() - t0:.1f}s")
        shards = os.path.join(tmp, "train")
        videos = load_mp4s(shards)

        raw_decode_rate(videos, args.clip_frames, 20)  # warm caches
        runs = [raw_decode_rate(videos, args.clip_frames, args.clips, seed=t) for t in range(args.trials)]
        raw_wall, raw_cpu = max(r[0] for r in runs), max(r[1] for r in runs)
        print(f"\n{args.clip_frames}-frame clips, {args.size}x{args.size}, batch {args.batch_size}, "
              f"{os.cpu_count()} CPU(s) visible, load average {os.getloadavg()[0]:.1f}\n")
        header = f"{'setting':<30}{'clips/s':>9}{'per worker':>12}{'vs raw':>8}{'clips/CPU-s':>13}{'vs raw':>8}"
        print(header)
        print("-" * len(header))

        def row(label, runs, base_wall, base_cpu, workers):
            wall, cpu = max(r[0] for r in runs), max(r[1] for r in runs)
            per_worker = wall / max(1, workers)
            print(f"{label:<30}{wall:>9.1f}{per_worker:>12.1f}{per_worker / base_wall:>8.2f}"
                  f"{cpu:>13.1f}{cpu / base_cpu:>8.2f}")

        def trials(*a, **kw):
            return [pipeline_rate(*a, **kw) for _ in range(args.trials)]

        print(f"{'raw decord loop':<30}{raw_wall:>9.1f}{raw_wall:>12.1f}{1.0:>8.2f}{raw_cpu:>13.1f}{1.0:>8.2f}")
        if "video" not in args.skip:
            for dtype, workers in itertools.product(args.dtypes, args.workers):
                row(f"{dtype}, {workers} worker(s)", trials(shards, workers, args, dtype), raw_wall, raw_cpu, workers)

        if "images" not in args.skip:
            jpegs = write_image_shards(videos, os.path.join(tmp, "images"), args.image_size)
            raw_image_rate(jpegs, 20)
            runs = [raw_image_rate(jpegs, args.images) for _ in range(args.trials)]
            img_wall, img_cpu = max(r[0] for r in runs), max(r[1] for r in runs)
            print(f"\n{args.image_size}px JPEG images into a 1x{args.image_size}x{args.image_size} bucket "
                  "(img2dataset layout); rates in images")
            print(f"{'raw PIL decode loop':<30}{img_wall:>9.1f}{img_wall:>12.1f}{1.0:>8.2f}{img_cpu:>13.1f}{1.0:>8.2f}")
            row("raw simplejpeg decode loop", [raw_image_rate(jpegs, args.images, "simplejpeg") for _ in range(args.trials)],
                img_wall, img_cpu, 0)
            ours = {}
            for workers in args.workers:
                ours[workers] = trials(os.path.join(tmp, "images"), workers, args, "uint8", frames=1,
                                       size=args.image_size, count=args.images)
                row(f"uint8 images, {workers} worker(s)", ours[workers], img_wall, img_cpu, workers)
            print("in loader workers, against the raw PIL loop through torch's DataLoader "
                  "(default_collate, same workers and batch size); ratios against that row")
            for workers in (w for w in args.workers if w > 0):
                stock = [stock_loader_image_rate(jpegs, workers, args) for _ in range(args.trials)]
                stock_wall, stock_cpu = max(r[0] for r in stock), max(r[1] for r in stock)
                row(f"PIL, torch DataLoader, {workers} w", stock, stock_wall / max(1, workers), stock_cpu, workers)
                row(f"uint8 images, {workers} worker(s)", ours[workers], stock_wall / max(1, workers), stock_cpu,
                    workers)

        if "http" not in args.skip:
            disk = [pipeline_rate(shards, 0, args, "uint8") for _ in range(args.trials)]
            disk_wall, disk_cpu = max(r[0] for r in disk), max(r[1] for r in disk)
            names = sorted(n for n in os.listdir(shards) if n.endswith(".tar"))
            server = StaticServer(shards)
            try:
                urls = [f"http://127.0.0.1:{server.port}/{n}" for n in names]
                print("\nthe video shards over HTTP (python -m http.server, another process) vs from disk; "
                      "ratios against the disk row")
                print(f"{'uint8, disk, 0 workers':<30}{disk_wall:>9.1f}{disk_wall:>12.1f}{1.0:>8.2f}"
                      f"{disk_cpu:>13.1f}{1.0:>8.2f}")
                for workers in args.workers:
                    row(f"uint8, http, {workers} worker(s)", trials(urls, workers, args, "uint8"),
                        disk_wall, disk_cpu, workers)
            finally:
                server.close()


if __name__ == "__main__":
    main()
