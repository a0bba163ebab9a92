"""``aecore bench sae-step``: one TopK SAE training step (forward, backward, Adam and the
decoder's unit-norm constraint), side by side in one run on the same batch:

* ``aecore fused``: ``sae-topk``'s loss through the sparse kernels (``aecore.ops.topk_encode``
  and ``sparse_decode``), stepped as the trainer steps it
  (``aecore.training.optim.gradient_step``, which checks the loss and the gradient and
  takes Adam's step: on the CPU in one call to ``aecore.ops.adam_step_``, elsewhere
  torch's fused Adam);
* ``aecore dense``: the same model and step through the dense path (every pre-activation
  formed, a dense decoder GEMM);
* ``stock sparse``: the dense encoder and ``torch.topk``, with ``F.embedding_bag`` as a
  sparse decoder: the best one writes from stock ops;
* ``compiled dense``: ``torch.compile`` of the dense loss;
* ``sae-lens``: its ``TopKTrainingSAE`` stepped by its own ``SAETrainer._train_step``.

``--dead-fraction F`` makes that fraction of the latents dead in every model (the same
latents in aecore's and sae-lens's: counted as not having fired for long, and with an
encoder bias far below zero so that they stay dead over the timed steps), so AuxK (on
by default in both) runs in the step: aecore's fused encoder picks its code among them
in the same pass as the main one.

Reported: median ms per step (calls interleaved, see ``timing.py``), and each step's peak
extra resident memory (VmHWM reset before it; glibc's mmap threshold fixed so freed
tensors return to the OS). Ratios are against sae-lens's step.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from aecore.cli.tables import print_table
from aecore_benchmarks.args import count, json_file, write_json

SHAPES = {"small": (512, 16384, 32), "large": (768, 32768, 64)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aecore bench sae-step", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="small,large", help="small (d=512, n=16384, k=32), large "
                   "(d=768, n=32768, k=64), or d:n:k, comma-separated")  # fmt: skip
    p.add_argument("--batch-size", type=count, default=4096)
    p.add_argument("--rounds", type=count, default=3)
    p.add_argument("--threads", type=count, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="parameters and data of every model (half types: CUDA only)")  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--dead-fraction", type=float, default=0.0, metavar="F",
                   help="mark this fraction of latents dead, so AuxK runs (default 0)")  # fmt: skip
    p.add_argument("--profile", action="store_true",
                   help="after timing, print where one fused step spends its time (by op)")  # fmt: skip
    p.add_argument("--json", type=json_file, default=None, metavar="FILE")
    return p


def _fix_malloc() -> None:
    # M_MMAP_THRESHOLD = -3: large blocks always mmapped, so a free returns them
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_extra_mb(step, device: str) -> float | None:
    """Memory a call adds at its peak, in MB: resident memory on the CPU (None where
    Linux cannot say), allocated device memory on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        before = _status_kb("VmRSS")
        step()
        return (_status_kb("VmHWM") - before) / 1024
    except OSError:
        return None


# a count past any dead window, and an encoder bias that keeps a latent out of every
# row's top k (pre-activations here are about N(0, 1)): dead latents as training makes them
LONG_AGO = 2**40
DEAD_BIAS = -50.0


def dead_mask(n: int, fraction: float) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(1)) < fraction


@torch.no_grad()
def kill(b_enc: torch.Tensor, since_fired: torch.Tensor, dead: torch.Tensor) -> None:
    dead = dead.to(b_enc.device)
    b_enc[dead] = DEAD_BIAS
    since_fired[dead] = LONG_AGO


def aecore_steps(
    d: int, n: int, k: int, device: str, dtype: torch.dtype, dead: torch.Tensor
) -> dict:
    import aecore
    from aecore.config import TrainConfig
    from aecore.sae.loss import _dense_loss
    from aecore.training.optim import gradient_step, make_optimizer

    def make(loss_fn_of):
        torch.manual_seed(0)
        model = aecore.create("sae-topk", input_shape=(d,), latent_dim=n, k=k)
        model = model.to(device=device, dtype=dtype)
        model.train()
        kill(model.b_enc, model.since_fired, dead)
        optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
        loss_fn = loss_fn_of(model)

        def step(x):  # the trainer's step in one process (gradient_step checks the loss)
            gradient_step(model, optimizer, loss_fn(x)["loss"], 1.0, None, "bench")

        return step

    def stock_sparse(model):
        def loss(x):
            xs = model._scaled(x)
            values, indices = F.linear(xs - model.b_dec, model.W_enc, model.b_enc).topk(k, dim=1)
            recon = F.embedding_bag(
                indices, model.W_dec, per_sample_weights=values.relu(), mode="sum"
            )
            residual = xs - recon - model.b_dec
            return {"loss": residual.pow(2).sum() / (model.input_variance * len(xs))}

        return loss

    steps = {
        "aecore fused": make(lambda m: m.loss),
        "aecore dense": make(lambda m: lambda x: _dense_loss(m, m._scaled(x), True)),
        "stock sparse": make(stock_sparse),
    }
    return steps


def compiled_dense_step(
    d: int, n: int, k: int, device: str, dtype: torch.dtype, dead: torch.Tensor
):
    import aecore
    from aecore.config import TrainConfig
    from aecore.sae.loss import _dense_loss
    from aecore.training.optim import make_optimizer

    torch.manual_seed(0)
    model = aecore.create("sae-topk", input_shape=(d,), latent_dim=n, k=k)
    model = model.to(device=device, dtype=dtype)
    model.train()
    kill(model.b_enc, model.since_fired, dead)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))

    @torch.compile
    def loss_fn(x):
        return _dense_loss(model, model._scaled(x), True)["loss"]

    def step(x):
        loss = loss_fn(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.before_optimizer_step()
        optimizer.step()
        model.after_optimizer_step()

    return step


def saelens_step(
    d: int, n: int, k: int, batch: int, device: str, dtype: torch.dtype, dead: torch.Tensor
):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d, d_sae=n, k=k, device=device, dtype=str(dtype).removeprefix("torch.")
        )
    )
    config = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        total_training_samples=batch * 1000, device=device, autocast=False, lr=1e-4,
        lr_end=1e-4, lr_scheduler_name="constant", lr_warm_up_steps=0, adam_beta1=0.9,
        adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1,
        train_batch_size_samples=batch, dead_feature_window=1000,
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1,
    )  # fmt: skip
    trainer = SAETrainer(
        cfg=config, sae=sae, data_provider=iter(()), save_checkpoint_fn=lambda path: None
    )
    kill(sae.b_enc, trainer.n_forward_passes_since_fired, dead)
    return lambda x: trainer._train_step(sae, x)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        if item in SHAPES:
            shapes.append(SHAPES[item])
            continue
        try:
            d, n, k = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--shapes: expected small, large or d:n:k, got {item!r}") from None
        shapes.append((d, n, k))
    return shapes


def main(argv: list[str] | None = None) -> int:
    from aecore import ops
    from aecore_benchmarks.timing import print_profile, time_in_turns

    args = build_parser().parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = DTYPES[args.dtype]
    if device == "cpu" and dtype != torch.float32:
        raise SystemExit(f"--dtype {args.dtype}: the CPU kernels take float32 (half types: CUDA)")
    if not 0.0 <= args.dead_fraction <= 1.0:
        raise SystemExit(f"--dead-fraction: expected a number in [0, 1], got {args.dead_fraction}")
    sync = torch.cuda.synchronize if device == "cuda" else None
    torch.set_num_threads(args.threads)
    _fix_malloc()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for d, n, k in parse_shapes(args.shapes):
        x = torch.randn(args.batch_size, d, generator=torch.Generator().manual_seed(0))
        x = x.to(device, dtype)
        dead = dead_mask(n, args.dead_fraction)
        steps = aecore_steps(d, n, k, device, dtype, dead)
        errors = {}
        if not args.no_compile:
            steps["compiled dense"] = compiled_dense_step(d, n, k, device, dtype, dead)
        try:
            steps["sae-lens"] = saelens_step(d, n, k, args.batch_size, device, dtype, dead)
        except ImportError as error:
            errors["sae-lens"] = f"not installed ({error})"
        except Exception as error:  # a version that takes other settings: still time aecore
            errors["sae-lens"] = f"{type(error).__name__}: {error}"
        calls = {name: (lambda s=s, x=x: s(x)) for name, s in steps.items()}
        memory = {}
        for name, call in list(calls.items()):
            try:
                memory[name] = peak_extra_mb(call, device)
            except Exception as error:  # say so, time the rest (and free its memory)
                errors[name] = f"{type(error).__name__}: {error}".splitlines()[0]
                del calls[name], steps[name]
        log(f"d={d} n={n} k={k}: timing {', '.join(calls)}")
        seconds, failed = time_in_turns(calls, rounds=args.rounds, warmup=1, sync=sync)
        errors.update(failed)
        if args.profile and "aecore fused" in seconds:
            print_profile(calls["aecore fused"], device, f"aecore fused, d={d} n={n} k={k}")
        base = seconds.get("sae-lens")
        for name in calls:
            if name not in seconds:
                continue
            results.append({"d": d, "n": n, "k": k, "batch": args.batch_size, "impl": name,
                            "ms": seconds[name] * 1e3, "peak_mb": memory[name],
                            "speedup_vs_saelens": base / seconds[name] if base else None})  # fmt: skip
        for name, error in errors.items():
            log(f"  {name}: {error}")
            results.append({"d": d, "n": n, "k": k, "impl": name, "error": error})
    where = f"{args.threads} threads" if device == "cpu" else torch.cuda.get_device_name()
    where += f", {args.dtype}"
    dead_note = (
        f", {args.dead_fraction:.0%} of latents dead (AuxK on)" if args.dead_fraction else ""
    )
    print(
        f"TopK SAE training step, batch {args.batch_size}, {where}{dead_note}; topk_encode: "
        f"{ops.backend('topk_encode', device)}"
    )
    print_table(
        ["d", "n", "k", "implementation", "ms/step", "× sae-lens", "peak MB"],
        [(r["d"], r["n"], r["k"], r["impl"], f"{r['ms']:.0f}",
          f"{r['speedup_vs_saelens']:.2f}" if r.get("speedup_vs_saelens") else "-",
          f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-")
         for r in results if "ms" in r],
    )  # fmt: skip
    if args.json:
        write_json(args.json, {"args": vars(args), "runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
