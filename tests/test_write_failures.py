"""Write failures (a full disk, an I/O error) name the file and the step, keep the
previous version of the file, and leave no temporary files behind."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import aecore
from aecore.errors import FileWriteError
from aecore.io.atomic import atomic_write_text
from aecore.training import Trainer

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


def _full_disk(monkeypatch, only: str = ""):
    """os.fsync raises ENOSPC (for files whose name holds ``only``)."""
    real = os.fsync

    def fsync(fd):
        if only in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "notes.json"
    atomic_write_text(target, "old")
    _full_disk(monkeypatch)
    with pytest.raises(
        FileWriteError,
        match=r"could not sync to disk .*notes.json: No space left on device \[ENOSPC\] \(the previous version is unchanged\)",
    ) as info:
        atomic_write_text(target, "new")
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json"]  # no temp file


def test_a_full_disk_mid_training_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    x = np.random.default_rng(0).random((64, 8)).astype(np.float32)
    model = aecore.create("ae", input_shape=(8,), latent_dim=2)
    settings = {"batch_size": 16, "progress": False, "val_fraction": 0.0, "seed": 0}
    Trainer(epochs=1, out_dir=tmp_path, **settings).fit(model, x)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    _full_disk(monkeypatch, only="checkpoint.safetensors")
    with pytest.raises(
        FileWriteError, match=r"could not sync to disk .*checkpoint.safetensors: No space"
    ):
        Trainer(epochs=3, out_dir=tmp_path, resume=True, **settings).fit(model, x)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # and the run resumes from it once there is room again
    history = Trainer(epochs=3, out_dir=tmp_path, resume=True, **settings).fit(model, x)
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3]


def test_the_command_line_says_which_file_could_not_be_written(tmp_path, monkeypatch, capsys):
    from aecore.cli import main

    _full_disk(monkeypatch)
    rc = main(["train", "ae", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc != 0 and "could not sync to disk" in err and "No space left on device" in err
    assert str(tmp_path / "r") in err


def test_a_write_keeps_a_live_writers_temp_file_and_drops_a_dead_ones(tmp_path):
    # temp files of a killed writer go; one a running process is still writing stays
    # (two processes saving one file), and names are not glob patterns
    import subprocess
    import sys

    target = tmp_path / "m[1]*.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".{target.name}.{dead}.abc.tmp"
    live = tmp_path / f".{target.name}.{os.getppid()}.xyz.tmp"
    neighbour = tmp_path / f".m[1]x.json.{dead}.abc.tmp"  # another file's
    # a longer sibling's ("m[1]*.json.bak"), its writer alive or not: not this file's
    siblings = [tmp_path / f".{target.name}.bak.{pid}.abc.tmp" for pid in (dead, os.getpid())]
    for p in (stale, live, neighbour, *siblings):
        p.write_text("partial")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert not stale.exists() and live.exists() and neighbour.exists()
    assert all(p.exists() for p in siblings)


def test_names_that_are_not_utf8_and_long_names_can_be_written_and_exported(tmp_path):
    # the file system's names are bytes: an undecodable one (a surrogate escape in
    # Python) must not break the temp or lock names; nor a name near 255 bytes
    model = aecore.create("ae", input_shape=(4,), latent_dim=2, hidden=[4])
    for name in (os.fsdecode(b"\xff\xfe-model.onnx"), "é" * 120 + "x.onnx"):
        atomic_write_text(tmp_path / (name + ".txt"), "x")
        aecore.export_onnx(model, tmp_path / name)
        assert (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_writing_through_a_symlink_replaces_the_file_it_names(tmp_path):
    (tmp_path / "v1.json").write_text("old")
    link = tmp_path / "current.json"
    link.symlink_to("v1.json")
    atomic_write_text(link, "new")
    assert link.is_symlink() and (tmp_path / "v1.json").read_text() == "new"
