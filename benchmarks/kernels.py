"""``aecore bench kernels``: the fused kernels against the eager reference, the reference
under torch.compile, a floor (the GEMMs alone, or one pass over memory), for the RBM
scikit-learn's BernoulliRBM, and for the optimizer step torch's fused Adam. Prints a
table of medians and ratios and writes JSON.

The speed targets are checked from the same run (ratios from one run on one machine: a
benchmark, not a timed test). Times are wall-clock medians; on a shared machine they
are noisy, so compare ratios from one run only. Each timed call follows an untimed call
of the same implementation (``lead=1``): in a training step an op reads the tensor the
op before it just wrote, so timing it right after another implementation has swept the
caches would measure the refill (at 256x1024 it doubles the fused penalties' time).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import subprocess
import sys
import time

import torch

from aecore import ops
from aecore.ops import reference
from aecore_benchmarks.args import count, json_file, write_json
from aecore_benchmarks.optimizer_step import AE_DIGITS_SHAPES, SAE_SHAPES, adam_case
from aecore_benchmarks.timing import print_profile, time_in_turns


def _compiled(fn):
    """torch.compile(fn), or None where it cannot run here (e.g. no C++ compiler)."""
    try:
        return torch.compile(fn, fullgraph=True)
    except Exception:  # pragma: no cover - depends on the toolchain
        return None


# --- cases ----------------------------------------------------------------------------


def _case_cd1(device):
    B, V, H = 128, 784, 1000
    g = torch.Generator(device=device).manual_seed(0)
    v = (torch.rand(B, V, generator=g, device=device) < 0.3).float()
    W = torch.randn(V, H, generator=g, device=device) * 0.01
    b_v = torch.zeros(V, device=device)
    b_h = torch.zeros(H, device=device)

    def floor():  # the five GEMMs of a CD-1 step, nothing else
        ph0 = torch.mm(v, W)
        pv = torch.mm(ph0, W.t())
        ph1 = torch.mm(pv, W)
        dW = torch.mm(v.t(), ph0)
        dW.addmm_(pv.t(), ph1, beta=1 / B, alpha=-1 / B)

    def ref_step(v, W, b_v, b_h):
        return reference.cd_step(v, W, b_v, b_h, 1)

    comp = _compiled(ref_step)
    impls = {
        "fused": lambda: ops.cd_step(v, W, b_v, b_h),
        "eager reference": lambda: ref_step(v, W, b_v, b_h),
        "floor (GEMMs only)": floor,
    }
    if comp is not None:
        impls["torch.compile reference"] = lambda: comp(v, W, b_v, b_h)
    return f"cd_step CD-1 {B}x{V}x{H} f32", impls


def _grad_case(name, x, fused, ref, floor):
    """Forward + backward of f at x (a leaf requiring grad): autograd.grad with a fixed
    incoming gradient, so nothing but the op's own forward and backward is timed."""
    grad_out = torch.randn_like(x)

    def run(f):
        def call():
            out = f(x)
            (g,) = torch.autograd.grad(out, x, grad_out if out.dim() else None)
            return g

        return call

    comp = _compiled(ref)
    impls = {"fused": run(fused), "eager reference": run(ref), "floor (one pass)": floor}
    if comp is not None:
        impls["torch.compile reference"] = run(comp)
    return name, impls


def _case_kl(device, B, H):
    h0 = torch.rand(B, H, device=device) * 0.2
    rho, beta = 0.05, 3.0

    def floor():  # read h once (every row's gradient is one broadcast row)
        h0.detach().sum(0)

    return _grad_case(
        f"kl_sparsity fwd+bwd {B}x{H}",
        h0.requires_grad_(True),
        lambda x: ops.kl_sparsity(x, rho, beta),
        lambda x: reference.kl_sparsity(x, rho, beta),
        floor,
    )


def _case_topk(device, B, D, k):
    z0 = torch.randn(B, D, device=device)

    def floor():  # forward: read z, write out; backward: read grad, write grad
        torch.empty_like(z0).copy_(z0)
        torch.empty_like(z0).copy_(z0)

    return _grad_case(
        f"topk_sparsify fwd+bwd {B}x{D} k={k}",
        z0.requires_grad_(True),
        lambda x: ops.topk_sparsify(x, k),
        lambda x: reference.topk_sparsify(x, k),
        floor,
    )


RBM_EPOCHS = 5


def _case_rbm_epoch(device):
    """RBM_EPOCHS epochs of PCD-1 on digits, 256 hidden, batch 64, as sklearn's
    BernoulliRBM: the op in a bare loop, the ``rbm`` plugin through ``Trainer.fit`` (the
    user's path: batching, checks, the update, the monitor) and scikit-learn."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.neural_network import BernoulliRBM
    except ImportError:
        return None
    X = load_digits().data.astype("float32") / 16.0
    batch, hidden, lr = 64, 256, 0.1
    data = torch.from_numpy(X).to(device)
    n_batches = -(-len(X) // batch)

    def epoch(step):
        g = torch.Generator(device=device).manual_seed(0)
        W = torch.randn(X.shape[1], hidden, generator=g, device=device) * 0.01
        b_v = torch.zeros(X.shape[1], device=device)
        b_h = torch.zeros(hidden, device=device)
        chain = torch.zeros(batch, hidden, device=device)
        for _ in range(RBM_EPOCHS):
            for i in range(n_batches):
                s = step(data[i * batch : (i + 1) * batch], W, b_v, b_h, chain=chain, generator=g)
                W.add_(s.dW, alpha=lr)
                b_v.add_(s.db_v, alpha=lr)
                b_h.add_(s.db_h, alpha=lr)
                chain = s.chain

    def trainer_fit():
        import aecore

        # sklearn's algorithm: PCD-1 with one chain per batch row, sampled visible
        # states, no momentum or weight decay; grey pixels as probabilities
        model = aecore.create(
            "rbm", input_shape=(X.shape[1],), latent_dim=hidden, persistent=True,
            chains=batch, lr=lr, momentum=0.0, initial_momentum=0.0, weight_decay=0.0,
            sample_visible=True, probabilities=True,
        ).to(device)  # fmt: skip
        trainer = aecore.Trainer(
            epochs=RBM_EPOCHS, batch_size=batch, val_fraction=0.0, progress=False, seed=0,
            device=device,
        )  # fmt: skip
        trainer.fit(model, data)

    def floor():  # the five GEMMs of each PCD-1 step, nothing else: the ceiling on speed
        W = torch.randn(X.shape[1], hidden, device=device) * 0.01
        chain = torch.zeros(batch, hidden, device=device)
        for _ in range(RBM_EPOCHS):
            for i in range(n_batches):
                v = data[i * batch : (i + 1) * batch]
                ph0, pv = torch.mm(v, W), torch.mm(chain, W.t())
                ph1 = torch.mm(pv, W)
                torch.mm(v.t(), ph0).addmm_(pv.t(), ph1, beta=1 / batch, alpha=-1 / batch)

    def sklearn_epoch():
        rbm = BernoulliRBM(
            n_components=hidden,
            learning_rate=lr,
            batch_size=batch,
            n_iter=RBM_EPOCHS,
            random_state=0,
        )
        # torch's thread count for numpy's BLAS too (with --clock cpu: 1, so the thread
        # CPU time counts all of sklearn's work)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            rbm.fit(X)
            return
        with threadpool_limits(torch.get_num_threads()):
            rbm.fit(X)

    impls = {
        "fused": lambda: epoch(ops.cd_step),
        "Trainer.fit (rbm plugin)": trainer_fit,
        "eager reference": lambda: epoch(reference.cd_step),
        "floor (GEMMs only)": floor,
    }
    if device == "cpu":
        impls["scikit-learn BernoulliRBM"] = sklearn_epoch
    name = f"RBM {RBM_EPOCHS} epochs digits {len(X)}x64, 256 hidden, batch 64"
    return name, impls


# --- targets ----------------------------------------------------------

TARGETS = {
    "cpu": [
        ("cd_step CD-1", "fused", "floor (GEMMs only)", "<=", 1.25),
        ("kl_sparsity fwd+bwd 256x1024", "eager reference", "fused", ">=", 4.0),
        ("kl_sparsity fwd+bwd 4096x4096", "eager reference", "fused", ">=", 2.0),
        ("topk_sparsify fwd+bwd 256x1024", "eager reference", "fused", ">=", 3.0),
        ("adam_step_ ae", "torch.optim.Adam (fused=True)", "fused", ">=", 1.5),
        ("adam_step_ SAE", "torch.optim.Adam (fused=True)", "fused", ">=", 1.0),
        ("RBM", "scikit-learn BernoulliRBM", "fused", ">=", 4.0),
        ("RBM", "scikit-learn BernoulliRBM", "Trainer.fit (rbm plugin)", ">=", 4.0),
    ],
    "cuda": [
        ("cd_step CD-1", "fused", "floor (GEMMs only)", "<=", 1.5),
        ("kl_sparsity fwd+bwd 4096x16384", "fused", "floor (one pass)", "<=", 1.5),
        ("topk_sparsify fwd+bwd 4096x16384", "fused", "floor (one pass)", "<=", 2.5),
    ],
}


def _cases(device):
    out = [_case_cd1(device)]
    if device == "cpu":
        out += [
            _case_kl(device, 256, 1024),
            _case_kl(device, 4096, 4096),
            _case_topk(device, 256, 1024, 16),
            adam_case(device, AE_DIGITS_SHAPES, "ae on digits"),
            adam_case(device, SAE_SHAPES, "SAE 512x16384"),
        ]
    else:
        out += [_case_kl(device, 4096, 16384), _case_topk(device, 4096, 16384, 32)]
    rbm = _case_rbm_epoch(device)
    if rbm is not None:
        out.append(rbm)
    return out


def run(device: str = "cpu", quick: bool = False, clock: str = "wall", profile=False) -> dict:
    """Runs every case; returns the JSON-ready result. ``profile``: after each case's
    timing, the fused call's ops by self time (device time on CUDA).

    clock="cpu" (CPU only) runs single-threaded and times the thread's CPU time: on a
    shared, oversubscribed machine wall times mostly measure the scheduler, CPU time does
    not (but it hides multi-threading, so it compares single-core work).
    """
    repeats = 5 if quick else 21
    timer_clock = time.perf_counter
    if clock == "cpu":
        if device != "cpu":
            raise ValueError("clock='cpu' is for --device cpu")
        torch.set_num_threads(1)
        timer_clock = time.thread_time
    results = []
    for name, impls in _cases(device):
        n = max(3, repeats // 3) if "RBM" in name else repeats
        sync = torch.cuda.synchronize if device == "cuda" else None
        # the RBM case runs scikit-learn, whose BLAS threads spin after each call
        settle = 0.3 if "RBM" in name and device == "cpu" else 0.0
        seconds, errors = time_in_turns(
            impls, rounds=n, clock=timer_clock, sync=sync, budget_s=1.0, settle_s=settle, lead=1
        )
        times = {impl: s * 1e3 for impl, s in seconds.items()}
        for impl, err in errors.items():
            print(f"  {name} / {impl}: failed: {err}", file=sys.stderr)
        if profile and "fused" in times:
            print_profile(impls["fused"], device, f"{name}, fused")
        fused = times.get("fused")
        for impl, ms in times.items():
            results.append(
                {
                    "case": name,
                    "impl": impl,
                    "median_ms": ms,
                    "x_fused": ms / fused if fused else None,
                }
            )
    checks = []
    for case, num, den, op, bound in TARGETS.get(device, []):
        t = {r["impl"]: r["median_ms"] for r in results if r["case"].startswith(case)}
        if num in t and den in t:
            ratio = t[num] / t[den]
            met = ratio <= bound if op == "<=" else ratio >= bound
            checks.append(
                {
                    "target": f"{case}: {num} / {den} {op} {bound}",
                    "ratio": ratio,
                    "met": met,
                }
            )
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backends": {op: ops.backend(op, device) for op in ops.OPS},
        "quick": quick,
        "clock": "thread CPU time, 1 thread" if clock == "cpu" else "wall",
        "results": results,
        "targets": checks,
    }


def format_report(res: dict) -> str:
    lines = [
        f"aecore kernels on {res['device']} ({res['device_name']}, torch {res['torch']}, "
        f"{res['threads']} threads); medians of {res['clock']} time",
    ]
    case = None
    for r in res["results"]:
        if r["case"] != case:
            case = r["case"]
            lines.append(f"\n{case}")
        x = f"{r['x_fused']:6.2f}x fused" if r["x_fused"] is not None else ""
        lines.append(f"  {r['impl']:<28} {r['median_ms']:10.3f} ms  {x}")
    if res["targets"]:
        lines.append("\ntargets")
        for t in res["targets"]:
            mark = "met" if t["met"] else "MISSED"
            lines.append(f"  {t['target']:<72} {t['ratio']:6.2f}  {mark}")
    return "\n".join(lines)


@contextlib.contextmanager
def busy_neighbour(on: bool):
    """A second process looping over 2-thread torch GEMMs while the block runs."""
    if not on:
        yield
        return
    code = (
        "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\n"
        "print('ready', flush=True)\nwhile True:\n    a @ a\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # its torch is loaded and the loop starts
        yield
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aecore bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", type=json_file, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time (default), or single-threaded CPU time for a shared machine",
    )
    p.add_argument("--threads", type=count, help="torch.set_num_threads(N) first (CPU)")
    p.add_argument(
        "--profile", action="store_true", help="also print each fused call's ops by self time"
    )
    p.add_argument(
        "--busy",
        action="store_true",
        help="beside a second process running 2-thread torch GEMMs (a shared machine)",
    )
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print("aecore bench kernels: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("aecore bench kernels: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.clock == "cpu" and args.device != "cpu":
        print("aecore bench kernels: --clock cpu needs --device cpu", file=sys.stderr)
        return 2
    with busy_neighbour(args.busy):
        res = run(args.device, args.quick, args.clock, args.profile)
    res["busy"] = args.busy
    print(("beside a 2-thread torch GEMM loop in another process\n" if args.busy else "")
          + format_report(res))  # fmt: skip
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
