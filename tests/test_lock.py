"""aecore.io.lock: one writer per run folder, with real processes: a second writer
fails at once naming the holder, and a SIGKILLed holder leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from aecore.errors import InUseError
from aecore.io.lock import LOCK_FILE, FolderLock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

HOLD = """
import sys, time
from aecore.io.lock import FolderLock
with FolderLock(sys.argv[1], "train into"):
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    folder = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "holding"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_a_second_writer_fails_at_once_naming_the_holder(holder, capsys):
    from aecore.cli import main

    folder, proc = holder
    start = time.monotonic()
    expected = rf"in use by PID {proc.pid} on .*-c.*since "
    with pytest.raises(InUseError, match=expected), FolderLock(folder, "train into"):
        pass
    # aecore train into the same folder stops before training, with the same message
    rc = main(["train", "ae", "--data", "digits", "--epochs", "1", "--out", str(folder)])
    assert rc != 0 and f"in use by PID {proc.pid}" in capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing written


def test_a_killed_holder_leaves_no_stale_lock(holder):
    folder, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with FolderLock(folder, "train into"):  # the OS released the lock with the process
        assert (folder / LOCK_FILE).read_text().startswith('{"pid": ' + str(os.getpid()))


def test_the_lock_is_reentrant_in_a_process_and_a_refused_run_leaves_no_trace(tmp_path):
    folder = tmp_path / "new"
    with FolderLock(folder), FolderLock(folder):  # a pipeline holds it across fit and save
        assert (folder / LOCK_FILE).exists()
    with pytest.raises(RuntimeError, match="refused"), FolderLock(tmp_path / "other"):
        raise RuntimeError("refused")
    assert not (tmp_path / "other").exists()


def test_every_file_of_a_run_carries_its_id_and_a_mixed_folder_is_refused(tmp_path, monkeypatch):
    import json
    import shutil

    import aecore
    from aecore.errors import ModelFileError
    from aecore.io import model_folder

    monkeypatch.setattr(model_folder, "SAVE_WAIT_SECONDS", 0.05)  # no save is coming
    from aecore.io.tensors import check_safetensors_header
    from aecore.pipeline import train

    for name, seed in (("a", 0), ("b", 1)):
        train("ae", "digits", tmp_path / name, epochs=2, seed=seed, progress=False)
    record = json.loads((tmp_path / "a" / "model.json").read_text())
    run = record["run_id"]
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert run and {json.loads(line)["run"] for line in lines} == {run}
    for file, field in (("model.safetensors", "run_id"), ("checkpoint.safetensors", "history")):
        meta = json.loads(check_safetensors_header(tmp_path / "a" / file)["__metadata__"]["aecore"])
        assert (meta[field]["run_id"] if field == "history" else meta[field]) == run
    assert aecore.load(tmp_path / "a").run_id == run
    # another run's metrics in the folder (an overwriting run under way or stopped):
    # the saved model is intact and loads, with a word on the metrics
    shutil.copy(tmp_path / "b" / "metrics.jsonl", tmp_path / "a" / "metrics.jsonl")
    with pytest.warns(UserWarning, match=rf"model is run {run}'s, but metrics.jsonl from run"):
        assert aecore.load(tmp_path / "a").run_id == run
    # another run's weights: the files no longer belong together
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(
        ModelFileError, match=rf"mixes runs: model.json names run {run}, but model.safetensors"
    ):
        aecore.load(tmp_path / "a")


def test_a_reader_of_a_folder_being_rewritten_is_told_so(tmp_path):
    import shutil

    import aecore
    from aecore.errors import ModelFileError
    from aecore.pipeline import train

    for name, seed in (("run", 0), ("other", 1)):
        train("ae", "digits", tmp_path / name, epochs=1, seed=seed, progress=False)
    # a second run is overwriting "run" and has written its weights, not yet model.json
    shutil.copy(tmp_path / "other" / "metrics.jsonl", tmp_path / "run" / "metrics.jsonl")
    shutil.copy(tmp_path / "other" / "model.safetensors", tmp_path / "run" / "model.safetensors")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(ModelFileError, match=rf"is being written by PID {proc.pid}"):
            aecore.load(tmp_path / "run")
    finally:
        proc.kill()
        proc.wait()


def test_an_export_target_has_one_writer(tmp_path):
    import aecore
    from aecore.io.lock import FileLock

    model = aecore.create("ae", input_shape=(4,), latent_dim=2)
    target = tmp_path / "m.onnx"
    hold = HOLD.replace("FolderLock", "FileLock")
    proc = subprocess.Popen(
        [sys.executable, "-c", hold, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(
            InUseError, match=rf"cannot export to .*m.onnx: it is being written by PID {proc.pid}"
        ):
            aecore.export_onnx(model, target)
        assert not target.exists()
    finally:
        proc.kill()
        proc.wait()
    aecore.export_onnx(model, target)  # the killed writer's lock went with it
    assert target.exists() and not (tmp_path / f".m.onnx{LOCK_FILE}").exists()
    with FileLock(target):
        pass


def test_a_name_as_long_as_the_file_system_takes_can_be_exported_to(tmp_path):
    # the lock file's name adds a suffix: cut, with a digest, where it would pass 255 bytes
    import aecore
    from aecore.io.lock import FileLock

    model = aecore.create("ae", input_shape=(4,), latent_dim=2, hidden=[4])
    target = tmp_path / ("é" * 120 + "x.onnx")  # 246 bytes in UTF-8
    aecore.export_onnx(model, target)
    assert target.exists() and [p.name for p in tmp_path.iterdir()] == [target.name]
    other = tmp_path / ("é" * 120 + "y.onnx")
    with FileLock(target), FileLock(other):  # names alike up to the cut: separate locks
        assert len({FileLock(target).lock_path, FileLock(other).lock_path}) == 2


def test_an_import_waits_for_no_run_writing_its_folder(holder, tmp_path, capsys):
    # import once saved into a folder a training run held, and the run's own save then
    # replaced the imported model
    import aecore
    from aecore.cli import main
    from aecore.sae.formats import save_saelens

    folder, proc = holder
    sae = aecore.create("sae-topk", input_shape=(8,), latent_dim=16, k=2)
    save_saelens(sae, tmp_path / "sl")
    assert main(["import", str(tmp_path / "sl"), "--out", str(folder)]) == 1
    assert f"cannot import into {folder}: it is in use by PID {proc.pid}" in capsys.readouterr().err
    assert not (folder / "model.json").exists()
