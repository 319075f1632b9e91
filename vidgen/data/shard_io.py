"""Reading the samples of one shard, local or remote, with retries.

A shard is named by a path, a ``file://`` / ``http(s)://`` URL, or a ``pipe:`` command
whose stdout is the tar (``pipe:aws s3 cp s3://bucket/x.tar -``); other schemes go to
webdataset's ``gopen`` (``gs://`` through gsutil, ``hf://``, ...). HTTP is read with
urllib, so a server error, a timeout and a connection dropped halfway through the tar are
Python exceptions with the URL in them, not a curl exit code.

``read_shard`` yields the raw samples (``{"__key__", "__url__", ext: bytes}``; nothing is
decoded or unpickled here). The tar stream is parsed here too (``iter_tar``: ustar, GNU
long names and base-256 sizes, pax headers), about 5x faster than Python's ``tarfile``
per member, and samples are grouped as webdataset groups them (``group_samples``: the key
is the member's path up to the first dot of its file name, the lower-cased rest is the
extension; consecutive members with one key form a sample). When opening or reading fails, the shard is opened again after
a backoff (``ShardRetry``) and the samples already yielded are read past, not yielded
again, so a retried shard gives exactly the samples of an unbroken read. When the last
attempt fails it raises ``ShardReadError``; the datasets count that shard as
``unreadable_shard`` and go on with the next one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields

from webdataset.gopen import gopen

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRetry:
    """How hard to try a shard before skipping it (``data.shard_retry`` in the configs).

    Args:
        attempts: tries in all (1 = no retry).
        backoff: seconds before the first retry; doubled for each later one.
        max_backoff: cap on one wait, seconds.
        timeout: seconds an HTTP connect or read may wait for data before it fails.
    """

    attempts: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    timeout: float = 60.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"shard_retry.attempts must be >= 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0 or self.timeout <= 0:
            raise ValueError(
                f"shard_retry needs backoff >= 0, max_backoff >= 0 and timeout > 0, got {asdict(self)}"
            )

    @classmethod
    def of(cls, value: ShardRetry | Mapping | None) -> ShardRetry:
        """A ShardRetry from itself, a dict of its fields (an unknown key is an error), or None."""
        if value is None or isinstance(value, ShardRetry):
            return value or cls()
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - valid)
        if unknown:
            raise ValueError(f"shard_retry: unknown key(s) {unknown}; valid keys are {sorted(valid)}")
        return cls(**value)

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt ``failed_attempt`` (1-based) failed."""
        return min(self.backoff * 2 ** (failed_attempt - 1), self.max_backoff)


class ShardReadError(OSError):
    """A shard that could not be read in ``attempts`` tries; ``samples`` were read before."""

    def __init__(self, url: str, attempts: int, samples: int, cause: BaseException):
        self.url, self.attempts, self.samples, self.cause = url, attempts, samples, cause
        where = "opening it" if samples == 0 else f"after {samples} sample(s)"
        super().__init__(
            f"{url}: unreadable in {attempts} attempt(s), failing {where}: {type(cause).__name__}: {cause}"
        )


def open_shard(url: str, timeout: float):
    """A binary stream of the shard's bytes (see the module docstring for the schemes)."""
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - the scheme is checked
    if url.startswith("file://"):
        url = url[len("file://"):]
    if url.startswith("pipe:") or "://" in url:
        return gopen(url, "rb")
    return open(os.path.expanduser(url), "rb")


def _close(stream, *, quietly: bool) -> None:
    """Close ``stream``; a ``pipe:`` command's exit status is checked here, unless the read
    was abandoned or already failed (``quietly``: the command is killed first)."""
    if not quietly:
        stream.close()
        return
    proc = getattr(stream, "proc", None)
    if proc is not None:
        with contextlib.suppress(OSError):
            proc.kill()
    with contextlib.suppress(Exception):
        stream.close()


class TarReadError(OSError):
    """The bytes are not a (complete) tar archive."""


def _read_exact(stream, n: int) -> bytes:
    """``n`` bytes, fewer only at the end of the stream."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _number(field: bytes) -> int:
    """A tar header number: octal text, or GNU base-256 when the first byte's top bit is set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    """Records ``"<len> <key>=<value>\n"`` of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


_FILE_TYPES = (b"0", b"\0", b"7")  # regular (old and new spelling), contiguous


def iter_tar(stream, url: str = "") -> Iterator[tuple[str, bytes]]:
    """``(member path, bytes)`` of the regular files of a tar stream, in order; raises
    TarReadError for a bad header (not a tar) or data cut short (a truncated archive)."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    first = True
    while True:
        header = _read_exact(stream, 512)
        if not header:
            if first:
                raise TarReadError(f"{url}: empty file, not a tar archive")
            return  # no end-of-archive blocks: tolerated, as tarfile does
        if len(header) < 512:
            raise TarReadError(f"{url}: unexpected end of data in a tar header")
        if header == bytes(512):
            return  # end of archive
        try:
            stored = _number(header[148:156])
        except ValueError:  # not octal digits
            stored = -1
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            what = "not a tar archive" if first else "corrupt tar header"
            raise TarReadError(f"{url}: {what} (header checksum mismatch)")
        first = False
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        data = _read_exact(stream, size)
        if len(data) < size:
            raise TarReadError(f"{url}: unexpected end of data ({len(data)} of {size} bytes of a member)")
        pad = -size % 512
        if pad and len(_read_exact(stream, pad)) < pad:
            raise TarReadError(f"{url}: unexpected end of data (member padding)")
        if kind == b"x":
            pax = _pax(data)
            continue
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind in (b"g", b"K"):
            continue  # global pax header, GNU long link name
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0":  # POSIX ustar: a path prefix may precede the name
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        if kind in _FILE_TYPES:
            yield name, data


def split_key(path: str) -> tuple[str | None, str | None]:
    """webdataset's (key, extension) of a member path: ``dir/abc.seg.JSON`` -> ``("dir/abc",
    "seg.json")``; (None, None) when the file name has no dot."""
    slash = path.rfind("/") + 1
    dot = path.find(".", slash)
    if dot <= slash:
        return None, None
    return path[:dot], path[dot + 1 :].lower()


def group_samples(members: Iterator[tuple[str, bytes]], url: str,
                  on_sample_error: Callable[[Exception], bool]) -> Iterator[dict]:
    """Consecutive members with one key as ``{"__key__", "__url__", ext: bytes}``; a member
    whose extension the sample already has goes to ``on_sample_error`` and is dropped."""
    current: dict | None = None
    for path, data in members:
        key, ext = split_key(path)
        if key is None:
            continue
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if ext in current:
            if not on_sample_error(ValueError(f"{path}: duplicate file name in the tar ({ext!r} of {key!r})")):
                return
            continue
        current[ext] = data
    if current is not None:
        yield current


def _one_attempt(url: str, timeout: float, skip: int, on_sample_error: Callable) -> Iterator[dict]:
    """One read of the shard from its start, yielding samples ``skip, skip + 1, ...``."""
    stream = open_shard(url, timeout)
    finished = False
    grouped = 0  # samples grouped so far in this read; errors before ``skip`` were seen already

    def sample_error(exn: Exception) -> bool:
        return True if grouped < skip else on_sample_error(exn)

    try:
        for raw in group_samples(iter_tar(stream, url), url, sample_error):  # a broken stream raises
            grouped += 1
            if grouped > skip:
                yield raw
        finished = True
    except TarReadError as exn:
        # A pipe: command that failed gives an empty or cut-short stream: its exit status is
        # the cause to report (the tar error alone would hide it, depending on timing).
        proc = getattr(stream, "proc", None)
        status = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = proc.wait(timeout=5)
        if status:
            raise OSError(f"{url}: the command failed with exit {status} ({exn})") from exn
        raise
    finally:
        _close(stream, quietly=not finished)


def read_shard(
    url: str,
    retry: ShardRetry | None = None,
    *,
    on_sample_error: Callable[[Exception], bool] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict]:
    """The raw samples of one shard, retried as ``retry`` says; raises ShardReadError.

    ``on_sample_error(exn)`` sees malformed samples (e.g. duplicate member names) and
    returns True to go on with the shard (the default); a retry does not report the
    samples it reads past again.
    """
    retry = retry or ShardRetry()
    on_sample_error = on_sample_error or (lambda exn: True)
    done = 0
    for attempt in range(1, retry.attempts + 1):
        try:
            for raw in _one_attempt(url, retry.timeout, done, on_sample_error):
                yield raw
                done += 1
            return
        except Exception as exn:  # noqa: BLE001 - any failure of the transfer or the tar
            if attempt == retry.attempts:
                raise ShardReadError(url, attempt, done, exn) from exn
            wait = retry.delay(attempt)
            log.warning("vidgen.data: %s failed after %d sample(s) (%s: %s); attempt %d of %d in %.1f s",
                        url, done, type(exn).__name__, exn, attempt + 1, retry.attempts, wait)
            sleep(wait)


def unreadable_summary(errors: dict[str, Exception], shown: int = 5) -> str:
    """'N shard(s) could not be read: url (error); ...' for an error message, or ''."""
    if not errors:
        return ""
    items = [f"{url} ({err.cause if isinstance(err, ShardReadError) else err})"
             for url, err in list(errors.items())[:shown]]
    more = f" (+{len(errors) - shown} more)" if len(errors) > shown else ""
    return f"{len(errors)} shard(s) could not be read: {'; '.join(items)}{more}. "
