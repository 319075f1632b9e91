"""Run folders, atomic checkpoint writes and `ckpt_path` resolution."""

import os

import pytest
import torch

from vidgen.utils import checkpoint as ck
from vidgen.utils.rundir import RUN_ID_ENV, run_id


def test_atomic_save_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    ck.atomic_torch_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"], "no temp file is left behind"


def test_atomic_checkpoint_io_round_trip(tmp_path):
    io = ck.AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "a" / "x.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "a" / "x.ckpt")["w"], torch.ones(3))


def test_resolve_ckpt_path(tmp_path):
    assert ck.resolve_ckpt_path(None, str(tmp_path), str(tmp_path)) is None
    task = tmp_path / "task"
    old, new = task / "r1" / "checkpoints", task / "r2" / "checkpoints"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "last.ckpt").write_bytes(b"x")
    os.utime(old / "last.ckpt", (1, 1))
    assert ck.resolve_ckpt_path("last", str(task / "r3"), str(task)) == str(new / "last.ckpt")
    assert ck.resolve_ckpt_path("last", str(task / "r1"), str(task)) == str(old / "last.ckpt")
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        ck.resolve_ckpt_path("last", str(tmp_path / "x"), str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        ck.resolve_ckpt_path(str(tmp_path / "nope.ckpt"), str(tmp_path), str(tmp_path))


def test_run_id_prefers_what_all_ranks_share(monkeypatch):
    for var in (RUN_ID_ENV, "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert run_id() == "slurm-777"
    assert os.environ[RUN_ID_ENV] == "slurm-777", "exported for processes spawned later"
    monkeypatch.setenv(RUN_ID_ENV, "mine")
    assert run_id() == "mine"
