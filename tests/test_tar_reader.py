"""vidgen's tar reader (`vidgen.data.shard_io.iter_tar` / `group_samples`) gives the samples
webdataset's own reader gives, on tars as other tools write them: webdataset's TarWriter,
GNU tar (long names, base-256 sizes), POSIX ustar (path prefixes) and pax (long and
non-ASCII names), with directories, links, files without an extension and upper-case
extensions; and refuses what is not a tar."""

import io
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from vidgen.data.shard_io import TarReadError, group_samples, iter_tar


def _tar(fmt, members) -> bytes:
    """members: (name, bytes | None for a directory | ("link", target))."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ours(data: bytes) -> list[dict]:
    return list(group_samples(iter_tar(io.BytesIO(data), "u"), "u", lambda exn: True))


def _webdataset(data: bytes) -> list[dict]:
    files = tar_file_expander([dict(url="u", stream=io.BytesIO(data))])
    return [{k: v for k, v in s.items() if k != "__local_path__"} for s in group_by_keys(files)]


LONG = "d" * 60 + "/" + "e" * 70 + "/sample_with_a_rather_long_key_" + "k" * 40  # > 100 chars: no plain header
MEMBERS = [
    ("000001.mp4", b"video one" * 100), ("000001.txt", b"a caption"), ("000001.json", b'{"a": 1}'),
    ("dir", None), ("dir/000002.JPG", b"\xff\xd8jpeg"), ("dir/000002.txt", b"second"),
    ("README", b"no extension: not a sample member"), ("link.mp4", ("link", "000001.mp4")),
    (LONG + ".mp4", b"x" * 513), (LONG + ".seg.json", b"{}"),
    ("ünïcödé/été.txt", b"non-ASCII path"), ("ünïcödé/été.mp4", b"\x00" * 1024),
    ("empty.txt", b""),
]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_same_samples_as_webdataset(fmt):
    data = _tar(fmt, MEMBERS)
    ours = _ours(data)
    assert ours == _webdataset(data)
    assert [s["__key__"] for s in ours] == ["000001", "dir/000002", LONG, "ünïcödé/été", "empty"]
    assert ours[1]["jpg"] == b"\xff\xd8jpeg" and ours[2]["seg.json"] == b"{}" and ours[4]["txt"] == b""


def test_ustar_path_prefix_and_webdataset_tarwriter():
    name = "p" * 90 + "/" + "q" * 90  # fits ustar's prefix + name fields
    data = _tar(tarfile.USTAR_FORMAT, [(name + ".txt", b"via the prefix field")])
    assert _ours(data) == _webdataset(data) and _ours(data)[0]["__key__"] == name
    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "mp4": bytes([i]) * (600 * i + 1), "json": {"i": i}, "txt": f"c{i}"})
    assert _ours(buf.getvalue()) == _webdataset(buf.getvalue())


def test_gnu_base256_size():
    data = bytearray(_tar(tarfile.GNU_FORMAT, [("big.bin", b"z" * 700)]))
    field = bytes([0x80]) + (700).to_bytes(11, "big")  # base-256, as GNU tar writes sizes >= 8 GiB
    data[124:136] = field
    data[148:156] = b" " * 8
    data[148:155] = f"{sum(data[:512]):06o}\0".encode()
    assert [(n, len(b)) for n, b in iter_tar(io.BytesIO(bytes(data)))] == [("big.bin", 700)]


def test_duplicates_are_reported_and_dropped():
    data = _tar(tarfile.GNU_FORMAT, [("a.txt", b"1"), ("a.txt", b"2"), ("a.mp4", b"v")])
    errors = []
    (sample,) = list(group_samples(iter_tar(io.BytesIO(data)), "u", lambda exn: errors.append(exn) or True))
    assert sample == {"__key__": "a", "__url__": "u", "txt": b"1", "mp4": b"v"}
    assert "duplicate file name" in str(errors[0])


def test_not_a_tar_and_truncated_tars_are_errors():
    with pytest.raises(TarReadError, match="not a tar archive"):
        list(iter_tar(io.BytesIO(b"this is not a tar file" * 100), "x.tar"))
    with pytest.raises(TarReadError, match="empty file"):
        list(iter_tar(io.BytesIO(b""), "x.tar"))
    data = _tar(tarfile.GNU_FORMAT, MEMBERS)
    for cut in (300, 512 + 200, len(data) // 2 // 512 * 512 + 100):  # not on a block boundary
        with pytest.raises(TarReadError, match="unexpected end of data|corrupt tar header"):
            list(iter_tar(io.BytesIO(data[:cut]), "x.tar"))
