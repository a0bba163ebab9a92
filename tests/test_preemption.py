"""SIGTERM/SIGINT checkpoint at the next step; --resume ends where an uninterrupted run
ends; a kill during a checkpoint write leaves the previous checkpoint intact."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.torch import load_file

from aecore.io.tensors import load_tensors, save_tensors

ARGS = [
    "train",
    "ae",
    "--data",
    "digits",
    "--latent-dim",
    "4",
    "--epochs",
    "6",
    "--batch-size",
    "8",
    "--patience",
    "100",
    "--quiet",
    "--set",
    "hidden=[32]",
    "--set",
    "dropout=0.1",
]


def aecore_cmd(*args):
    return [sys.executable, "-m", "aecore", *args]


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, sig):
    ref = subprocess.run(
        aecore_cmd(*ARGS, "--out", str(tmp_path / "ref")), capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "run"
    proc = subprocess.Popen(
        aecore_cmd(*ARGS, "--out", str(out)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert f"training interrupted by {sig.name} at step" in err
    assert "Resume with --resume" in err
    step = int(err.split(" at step ")[1].split(";")[0])
    _, meta = load_tensors(out / "checkpoint.safetensors")
    assert meta["step"] == step and meta["epoch"] < 6
    assert not (out / "model.json").exists()

    resumed = subprocess.run(
        aecore_cmd(*ARGS, "--out", str(out), "--resume"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "ref" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert metrics.read_text().count("\n") == 6


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    import torch

    path = tmp_path / "checkpoint.safetensors"
    save_tensors(path, {"w": torch.arange(4.0)}, {"epoch": 1})
    before = path.read_bytes()
    writer = textwrap.dedent(f"""
        import time
        from aecore.io import atomic
        def slow(f):
            f.write(b"half a checkpoint")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic.atomic_write({str(path)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait(timeout=30)
    assert path.read_bytes() == before
    tensors, meta = load_tensors(path)
    assert meta == {"epoch": 1} and tensors["w"].tolist() == [0, 1, 2, 3]
    # the next write cleans up what the killed writer left behind
    save_tensors(path, {"w": torch.zeros(1)}, {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]


def test_a_signal_with_nothing_to_checkpoint_exits_with_its_own_code(monkeypatch, capsys):
    # SIGTERM before training began exited 130 (SIGINT's code) saying only "interrupted":
    # a scheduler read it as a user's Ctrl-C
    from aecore.cli import train as train_command
    from aecore.cli.main import main
    from aecore.cli.train import GracefulStop, SignalStop

    with pytest.raises(SignalStop, match="SIGTERM before training began") as info:
        GracefulStop()._handle(signal.SIGTERM, None)

    def interrupted(args):
        raise info.value

    monkeypatch.setattr(train_command, "cmd_train", interrupted)
    assert main(["train", "ae", "--data", "digits", "--out", "unused"]) == 143
    said = capsys.readouterr().err
    assert "aecore: interrupted: SIGTERM before training began: nothing to resume" in said


def test_a_signal_during_pretraining_says_nothing_is_saved_and_exits_with_its_code(
    monkeypatch, capsys
):
    # a deep model's pretraining keeps no checkpoint: the handler promised one, and the
    # run exited 75, which tells a scheduler to resume what was never saved
    import torch

    import aecore
    from aecore.cli import train as train_command
    from aecore.cli.main import main
    from aecore.errors import TrainingInterrupted

    model = aecore.create("deep", input_shape=(8,), latent_dim=2, hidden=[6], pretrain_epochs=2)
    trainer = aecore.Trainer(epochs=1, progress=False)
    trainer.request_stop("SIGTERM")
    with pytest.raises(TrainingInterrupted, match="during pretraining, which is not") as info:
        trainer.fit(model, torch.rand(40, 8))
    assert not info.value.saved
    for raised, code in [(info.value, 128 + signal.SIGTERM),
                         (TrainingInterrupted("checkpoint saved"), 75)]:  # fmt: skip

        def stopped(args, raised=raised):
            raise raised

        monkeypatch.setattr(train_command, "cmd_train", stopped)
        assert main(["train", "ae", "--data", "digits", "--out", "unused"]) == code
    assert "during pretraining, which is not checkpointed" in capsys.readouterr().err
