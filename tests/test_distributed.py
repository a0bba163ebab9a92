"""Multi-process training under torchrun (gloo on CPU) matches one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import aecore
from aecore.errors import ConfigError

ARGS = [
    "train",
    "ae",
    "--data",
    "digits",
    "--latent-dim",
    "4",
    "--epochs",
    "3",
    "--batch-size",
    "64",
    "--quiet",
    "--set",
    "hidden=[32]",
]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """Also across a resume: two processes train 2 epochs, then resume to 3."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "aecore", *ARGS, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr

    def torchrun(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "aecore",
                *ARGS,
                "--out",
                str(tmp_path / "two"),
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    first = torchrun("--epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    two = torchrun("--resume")
    assert two.returncode == 0, two.stderr[-3000:]
    # rank 0 alone logs and saves, in the fresh and in the resumed run
    assert first.stdout.count("saved ae to") == two.stdout.count("saved ae to") == 1
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        # the only difference is the order of the gradient all-reduce's float additions
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    one_losses = [line for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_losses = [line for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one_losses) == len(two_losses) == 3


class OwnUpdate(aecore.Autoencoder):
    uses_optimizer = False

    def __init__(self, *, input_shape, latent_dim):
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        self.w = torch.nn.Parameter(torch.zeros(self.input_size, latent_dim))

    def get_config(self):
        return self.base_config()

    def encode(self, x):
        return x.flatten(1) @ self.w

    def decode(self, z):
        return (z @ self.w.T).reshape(-1, *self.input_shape)

    def loss(self, x):
        r = (self(x) - x).pow(2).mean()
        return {"loss": r}

    def train_step(self, x):
        return {"loss": self.loss(x)["loss"].detach()}


def _fake_world(monkeypatch, world):
    from aecore.training import distributed

    monkeypatch.setattr(
        distributed.DistContext, "from_env", classmethod(lambda cls, device: cls(0, world))
    )


def test_models_with_their_own_update_rule_refuse_clearly(monkeypatch):
    _fake_world(monkeypatch, 2)
    model = OwnUpdate(input_shape=(4,), latent_dim=2)
    with pytest.raises(
        ConfigError, match="updates its own parameters .* does not support multi-process"
    ):
        aecore.Trainer(epochs=1, device="cpu").fit(model, np.zeros((8, 4), np.float32))


def test_a_dataloader_is_refused_under_torchrun(monkeypatch):
    from torch.utils.data import DataLoader, TensorDataset

    _fake_world(monkeypatch, 2)
    model = aecore.create("ae", input_shape=(4,), latent_dim=2)
    loader = DataLoader(TensorDataset(torch.zeros(8, 4)), batch_size=4)
    with pytest.raises(
        ConfigError, match="pass an array, tensor or Dataset rather than a DataLoader"
    ):
        aecore.Trainer(epochs=1, device="cpu").fit(model, loader)
    with pytest.raises(
        ConfigError, match=r"batch_size \(1\) must be at least the number of processes \(2\)"
    ):
        aecore.Trainer(epochs=1, batch_size=1, device="cpu").fit(
            model, np.zeros((8, 4), np.float32)
        )


@pytest.mark.parametrize("name", ["sae-topk", "sae-batchtopk"])
def test_sae_training_in_two_processes_matches_one(tmp_path, name):
    """The decoder's renormalisation, AuxK's dead-latent counts and BatchTopK's
    selection and threshold see the global batch, so two processes step as one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", name, "--data", "superposition:4096,d=16,n=32", "--latent-dim", "256",
            "--epochs", "2", "--batch-size", "256", "--lr", "5e-4", "--quiet",
            "--set", "k=1", "--set", "dead_window=300"]  # fmt: skip
    if name == "sae-batchtopk":  # batch selection from the first step
        args += ["--set", "topk_warmup=0"]
    one = subprocess.run([sys.executable, "-m", "aecore", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "aecore", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    assert torch.equal(a["since_fired"], b["since_fired"])
    lines = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["train_auxk"] for line in lines) > 0  # AuxK ran
    for key in a:
        # the gradient all-reduce adds in another order; a top-k choice between two
        # near-equal latents can amplify that a little
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3)


PER_RANK = """
import json, os, sys
import numpy as np, torch
import aecore
from aecore.errors import ConfigError

torch.set_num_threads(1)
# no process group of the script's own: aecore's, made by the first fit (which fails),
# must serve the second
rank = int(os.environ["RANK"])
out = {}
shard = np.random.default_rng(rank).random((96, 8)).astype("float32")  # its own rows
try:
    model = aecore.create("ae", input_shape=(8,), latent_dim=2)
    aecore.Trainer(epochs=1, batch_size=32, progress=False, device="cpu").fit(model, shard)
except ConfigError as exc:
    out["refused"] = str(exc)
data = np.random.default_rng(0).random((96, 8)).astype("float32")
model = aecore.create("deep", input_shape=(8,), latent_dim=2, hidden=[6], pretrain_epochs=2)
history = aecore.Trainer(epochs=2, batch_size=32, progress=False, device="cpu",
                         val_fraction=0.25).fit(model, data)
out["weights"] = [float(t.double().sum()) for t in model.state_dict().values()]
out["run_id"] = history.run_id
out["val"] = [e.get("val_loss") for e in history.epochs]
out["group_kept"] = torch.distributed.is_initialized()
json.dump(out, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
"""


def test_processes_agree_on_their_data_their_pretrained_start_and_their_run(tmp_path):
    # shards passed per process trained each on part of its own, the copies drifting
    # apart; deep's RBMs pretrained from each process's seed, and each drew a run id
    script = tmp_path / "per_rank.py"
    script.write_text(PER_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert "processes were given different training data (process 0: 86 rows" in got["refused"]
        assert "every process passes the whole data set" in got["refused"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["val"] == ranks[1]["val"]
    assert ranks[0]["run_id"] == ranks[1]["run_id"]
    assert ranks[0]["group_kept"] and ranks[1]["group_kept"]


@pytest.mark.parametrize(
    ("backend", "device", "refused"),
    [("nccl", "cpu", True), ("cuda:gloo", "cpu", True), ("gloo", "cpu", False),
     ("cpu:gloo,cuda:nccl", "cpu", False), ("nccl", "cuda", False)],
)  # fmt: skip
def test_a_kept_group_without_a_backend_for_the_device_is_refused_by_name(
    monkeypatch, backend, device, refused
):
    # a CUDA fit's NCCL group, kept for the process's later fits, failed a CPU fit with
    # "No backend type associated with device type cpu" deep inside torch
    import torch.distributed as dist

    from aecore.training.distributed import DistContext

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    if refused:
        with pytest.raises(
            ConfigError, match=rf"process group \({backend}\) has no backend for cpu"
        ):
            DistContext.from_env(torch.device(device))
    else:
        assert DistContext.from_env(torch.device(device)).world == 2
