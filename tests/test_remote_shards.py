"""Shards that fail to open or read are retried, then skipped and counted, never the end of
a run: tested against real HTTP servers on localhost (python's http.server, one that drops
the connection halfway through a shard, one that stalls, one that fails once), `pipe:`
commands and unreadable local files."""

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
from test_data_pipeline import collect
from test_train import _cfg as vae_cfg

from vidgen.data.pipeline import build_video_dataset
from vidgen.data.shard_io import ShardReadError, ShardRetry, read_shard
from vidgen.data.synthetic import make_synthetic_dataset
from vidgen.run import train

FAST = dict(attempts=2, backoff=0.0, timeout=5.0)  # retries on, no waiting


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train/shard-000000.tar and shard-000001.tar, 8 synthetic clips each (32 px, 9 frames)."""
    out = tmp_path_factory.mktemp("remote")
    make_synthetic_dataset(out, num_videos=16, size=32, frames=9, fps=8, val_videos=4, seed=0, shard_size=8)
    return out


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 that records every requested path."""

    def __init__(self, handler_cls, **handler_kwargs):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(handler_cls):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802 - the http.server name
                requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, **handler_kwargs))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _static(directory: Path) -> _Server:
    """python -m http.server, as a user would run it in front of the shards."""
    return _Server(http.server.SimpleHTTPRequestHandler, directory=str(directory))


class _Dropping(http.server.SimpleHTTPRequestHandler):
    """Announces the whole file, sends the first ``fraction`` of it and hangs up; with
    ``failures`` set, only the first that many requests of each path are cut."""

    fraction, failures, seen = 0.5, None, {}

    def do_GET(self):  # noqa: N802
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        n = self.seen[self.path] = self.seen.get(self.path, 0) + 1
        cut = self.failures is None or n <= self.failures
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: int(len(data) * self.fraction)] if cut else data)
        self.wfile.flush()
        self.close_connection = True


class _Stalling(http.server.SimpleHTTPRequestHandler):
    """Accepts the request and never answers within the client's timeout."""

    def do_GET(self):  # noqa: N802
        threading.Event().wait(3.0)


def _read(urls, **retry):
    ds = build_video_dataset(urls, resampled=False, num_frames=5, height=32, width=32, batch_size=1,
                             shard_retry=dict(FAST, **retry))
    return collect(ds)


def _local_keys(shards, names):
    _, keys, skipped = _read([str(shards / "train" / n) for n in names])
    assert not any(skipped.values())
    return keys


def test_http_shards_stream_like_local_ones_and_a_missing_one_is_skipped(shards):
    local = _local_keys(shards, ["shard-000000.tar", "shard-000001.tar"])
    with _static(shards / "train") as server:
        _, keys, skipped = _read(f"{server.url}/shard-{{000000..000002}}.tar")
    assert keys == local and len(local) == 16  # the same samples, in the same order
    assert skipped["unreadable_shard"] == 1
    assert server.requests.count("/shard-000002.tar") == FAST["attempts"]  # retried, then skipped


def test_a_connection_dropped_mid_shard_is_retried_then_skipped(shards):
    class Handler(_Dropping):
        seen = {}

    with _Server(Handler, directory=str(shards / "train")) as server:
        _, keys, skipped = _read([f"{server.url}/shard-000000.tar", f"{server.url}/shard-000001.tar"],
                                 attempts=3)
    full = _local_keys(shards, ["shard-000000.tar", "shard-000001.tar"])
    assert skipped["unreadable_shard"] == 2 and len(server.requests) == 6
    # what came before each drop is kept once, never repeated by the retries
    assert len(keys) == len(set(keys)) and 0 < len(keys) < len(full) and set(keys) <= set(full)


def test_a_retry_after_a_drop_gives_exactly_the_samples_of_an_unbroken_read(shards):
    class Handler(_Dropping):
        seen, failures, fraction = {}, 1, 0.6

    with _Server(Handler, directory=str(shards / "train")) as server:
        _, keys, skipped = _read([f"{server.url}/shard-000000.tar", f"{server.url}/shard-000001.tar"])
    assert keys == _local_keys(shards, ["shard-000000.tar", "shard-000001.tar"])
    assert not any(skipped.values()) and len(server.requests) == 4


def test_a_stalled_server_times_out_and_is_skipped(shards):
    with _Server(_Stalling, directory=str(shards / "train")) as server:
        _, keys, skipped = _read([f"{server.url}/shard-000000.tar", str(shards / "train" / "shard-000001.tar")],
                                 attempts=1, timeout=0.5)
    assert skipped["unreadable_shard"] == 1 and keys == _local_keys(shards, ["shard-000001.tar"])


def test_pipe_commands_follow_the_same_rule(shards, tmp_path):
    good = shards / "train" / "shard-000000.tar"
    _, keys, skipped = _read([f"pipe:cat {good}", f"pipe:cat {tmp_path / 'missing.tar'}"])
    assert keys == _local_keys(shards, ["shard-000000.tar"]) and skipped["unreadable_shard"] == 1
    with pytest.raises(ShardReadError, match=r"exit 1"):
        list(read_shard(f"pipe:cat {tmp_path / 'missing.tar'}", ShardRetry(**FAST)))


class _Forbidding(http.server.SimpleHTTPRequestHandler):
    """An object store's answer to a key the credentials may not read."""

    def do_GET(self):  # noqa: N802
        self.send_error(403, "Access Denied")


def test_a_forbidden_remote_shard_is_skipped(shards):
    with _Server(_Forbidding, directory=str(shards / "train")) as server:
        _, keys, skipped = _read([f"{server.url}/shard-000000.tar", str(shards / "train" / "shard-000001.tar")])
    assert skipped["unreadable_shard"] == 1 and keys == _local_keys(shards, ["shard-000001.tar"])
    assert len(server.requests) == FAST["attempts"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_permission_denied_local_shard_is_skipped(shards, tmp_path):
    locked = tmp_path / "locked.tar"
    locked.write_bytes((shards / "train" / "shard-000000.tar").read_bytes())
    locked.chmod(0)
    try:
        _, keys, skipped = _read([str(locked), str(shards / "train" / "shard-000001.tar")])
    finally:
        locked.chmod(0o644)
    assert skipped["unreadable_shard"] == 1 and keys == _local_keys(shards, ["shard-000001.tar"])


def test_backoff_doubles_up_to_its_cap_and_the_error_names_the_url(tmp_path):
    waits = []
    url = str(tmp_path / "absent.tar")
    with pytest.raises(ShardReadError) as err:
        list(read_shard(url, ShardRetry(attempts=5, backoff=0.5, max_backoff=1.5), sleep=waits.append))
    assert waits == [0.5, 1.0, 1.5, 1.5]
    assert err.value.url == url and err.value.attempts == 5 and url in str(err.value)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['retries'\]; valid keys are"):
        ShardRetry.of({"retries": 3})
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        ShardRetry.of({"attempts": 0})


def test_a_resampled_stream_of_unreachable_shards_stops_naming_them(shards):
    with _static(shards / "train") as server:
        urls = [f"{server.url}/gone-{i}.tar" for i in range(2)]
        ds = build_video_dataset(urls, num_frames=5, height=32, width=32, batch_size=1,
                                 shard_retry=dict(FAST, attempts=1))
        with pytest.raises(RuntimeError, match=r"no usable sample.*2 shard\(s\) could not be read: .*gone-.*404"):
            next(iter(ds))


def test_vae_stage1_trains_from_http_with_a_missing_shard(tmp_path, shards):
    """The issue's reproduction: demo VAE stage 1 over http.server with shard 2 missing."""
    with _static(shards) as server:
        cfg = vae_cfg(tmp_path / "run", shards, "demo/vae_stage1",
                      f"data.train.shards='{server.url}/train/shard-{{000000..000002}}.tar'",
                      f"data.val.shards={server.url}/val/shard-000000.tar", "data.shard_retry.backoff=0",
                      "trainer.max_steps=4", "data.train.batches_per_epoch=4")
        metrics = train(cfg)
    missing = server.requests.count("/train/shard-000002.tar")
    assert missing >= 1 and missing % cfg.data.shard_retry.attempts == 0
    assert metrics["data/skipped"] == missing // cfg.data.shard_retry.attempts
