"""``aecore bench sae``: aecore's sparse autoencoders against sae-lens on a synthetic
source with known features, from one run on the same data tensors.

The data: ``Superposition(d, n_features, p, magnitude_std)`` (``aecore.data.superposition``),
``--rows`` training rows and ``--test-rows`` further rows of the same stream for the
metrics. Each SAE has ``--latents`` latents and sees every training row once, in the same
order, at batch ``--batch-size``:

* aecore: ``aecore.Trainer(epochs=1, batch_size=..., val_fraction=0)``, every other
  setting and the model's hyperparameters at their defaults but ``k``;
* sae-lens: its ``SAETrainer`` (constant learning rate, Adam, its defaults) at its default
  learning rate and at ``--saelens-lr``, fed the same batches.

Metrics on the test rows (``aecore.sae.metrics.sae_metrics``): explained variance, MMCS
(the true features against the learned dictionary), MCC (codes against the true
activations), L0 and dead latents (no firing on the test rows), plus training seconds.
Torch runs one thread per process unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from aecore.cli.tables import print_table
from aecore_benchmarks.args import count, json_file, names, natural, write_json

ARCHITECTURES = ("topk", "batchtopk")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aecore bench sae", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=count, default=2_000_000, help="training rows (each seen once)")
    p.add_argument("--test-rows", type=count, default=50_000)
    p.add_argument("--d", type=count, default=128)
    p.add_argument("--features", type=count, default=1024, help="true features")
    p.add_argument("--p", type=float, default=0.01, help="each feature's firing probability")
    p.add_argument("--std", type=float, default=0.5, help="std of the firing magnitudes")
    p.add_argument("--latents", type=count, default=1024)
    p.add_argument("--k", type=count, default=10)
    p.add_argument("--batch-size", type=count, default=1024)
    p.add_argument("--architectures", type=names(ARCHITECTURES), default=list(ARCHITECTURES))
    p.add_argument("--saelens-lr", type=float, default=3e-3, help="besides its default 3e-4")
    p.add_argument("--no-saelens", action="store_true", help="aecore's rows only")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--threads", type=count, default=1)
    p.add_argument("--json", type=json_file, default=None, metavar="FILE")
    return p


def make_data(args) -> tuple[Any, torch.Tensor, torch.Tensor]:
    from aecore.data.superposition import Superposition

    truth = Superposition(
        d=args.d, n_features=args.features, p=args.p, magnitude_std=args.std, seed=args.seed
    )
    train = torch.from_numpy(truth.inputs(args.rows))
    test = torch.from_numpy(truth.inputs(args.test_rows, start=args.rows))
    return truth, train, test


def run_aecore(arch: str, train: torch.Tensor, args) -> tuple[Any, float]:
    import aecore

    torch.manual_seed(args.seed)
    model = aecore.create(f"sae-{arch}", input_shape=(args.d,), latent_dim=args.latents, k=args.k)
    trainer = aecore.Trainer(
        epochs=1, batch_size=args.batch_size, val_fraction=0.0, seed=args.seed, progress=False
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    return model, time.perf_counter() - start


def run_saelens(arch: str, train: torch.Tensor, lr: float, args) -> tuple[Any, float]:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from aecore.training.batches import Batches

    torch.manual_seed(args.seed)
    kinds = {
        "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
    }
    cls, cfg_cls = kinds[arch]
    sae = cls(cfg_cls(d_in=args.d, d_sae=args.latents, k=args.k))
    # the same rows in the same order as aecore's first epoch
    order = Batches(train, args.batch_size, True, args.seed, "train").order(1)

    def batches():
        while True:
            for i in range(0, len(train) - args.batch_size + 1, args.batch_size):
                yield train[order[i : i + args.batch_size]]

    config = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        total_training_samples=len(train), device="cpu", autocast=False, lr=lr, lr_end=lr,
        lr_scheduler_name="constant", lr_warm_up_steps=0, adam_beta1=0.9, adam_beta2=0.999,
        lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=args.batch_size,
        dead_feature_window=1000, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=100,
    )  # fmt: skip
    start = time.perf_counter()
    SAETrainer(
        cfg=config, sae=sae, data_provider=batches(), save_checkpoint_fn=lambda path: None
    ).fit()
    return sae, time.perf_counter() - start


def evaluate(model, test: torch.Tensor, truth, args) -> dict[str, float]:
    from aecore.sae.metrics import sae_metrics

    rows = np.arange(args.rows, args.rows + len(test))
    return sae_metrics(model, test, truth=truth, rows=rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    truth, train, test = make_data(args)
    log(f"data: {len(train)} + {len(test)} rows in {time.perf_counter() - start:.0f} s")
    saelens = not args.no_saelens
    if saelens:
        try:
            import sae_lens  # noqa: F401
        except ImportError:
            log("sae-lens is not installed: aecore's rows only")
            saelens = False
    runs = []
    for arch in args.architectures:
        candidates = [("aecore", "defaults", lambda a=arch: run_aecore(a, train, args))]
        if saelens:
            for lr in (3e-4, args.saelens_lr):
                candidates.append(
                    (
                        "sae-lens",
                        f"lr {lr:g}",
                        lambda a=arch, lr=lr: run_saelens(a, train, lr, args),
                    )
                )
        for library, setting, run in candidates:
            model, seconds = run()
            row = {"library": library, "architecture": arch, "setting": setting,
                   "train_seconds": seconds, "rows_per_second": len(train) / seconds,
                   **evaluate(model, test, truth, args)}  # fmt: skip
            log(f"{library} {arch} {setting}: ev {row['explained_variance']:.3f} "
                f"mmcs {row['mmcs']:.3f} dead {row['dead']} in {seconds:.0f} s")  # fmt: skip
            runs.append(row)
    print(
        f"SAEs on a superposition of {args.features} features in {args.d} dimensions "
        f"(p={args.p}, magnitude std {args.std}): {args.latents} latents, k={args.k}, "
        f"{len(train)} training rows once at batch {args.batch_size}; "
        f"metrics on {len(test)} further rows"
    )
    print_table(
        ["library", "architecture", "setting", "expl. var.", "MMCS", "MCC", "L0", "dead",
         "train s", "rows/s"],
        [(r["library"], r["architecture"], r["setting"], f"{r['explained_variance']:.3f}",
          f"{r['mmcs']:.3f}", f"{r['mcc']:.3f}", f"{r['l0']:.2f}", r["dead"],
          f"{r['train_seconds']:.0f}", f"{r['rows_per_second']:,.0f}") for r in runs],
    )  # fmt: skip
    if args.json:
        write_json(args.json, {"args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
