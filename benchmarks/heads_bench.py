"""Head-training efficiency: achieved matmul FLOP/s of a full head training run divided by the
FLOP/s of the *bare* matmuls of the same shapes, measured side by side in one run.

The training run is the real thing (``HEADS.create("mlp", ...).fit``: AdamW, warmup + cosine, EMA,
clipping, dropout, batch gather, per-step Python); the baseline runs only the GEMMs a training step
needs (forward X@W1, H@W2; backward dW2, dH, dW1) on preallocated tensors. Both count the same
FLOPs (verified against torch's FlopCounterMode), so the ratio is t_matmul / t_train: 1.0 would
mean zero overhead. Target >= 0.5. Repeats alternate train / baseline and report medians, because
the CPU may be shared. Usage: ``python benchmarks/heads_bench.py [--json PATH] [--rows 12000]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def step_flops(batch: int, dim: int, hidden: int) -> int:
    """Matmul FLOPs of one training step of a 1-hidden-layer head with a 2-class output."""
    fwd = 2 * batch * dim * hidden + 2 * batch * hidden * 2
    bwd = 2 * batch * dim * hidden + 2 * (2 * batch * hidden * 2)  # dW1; dW2 and dH (no dX)
    return fwd + bwd


def measured_step_flops(batch: int, dim: int, hidden: int) -> int:
    """The same count taken by torch's FlopCounterMode on one real forward + backward of the head."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stage1.heads import HEADS

    head = HEADS.create("mlp", hidden=hidden, dropout=0.1)
    module = head.make_module(dim)
    head.prepare(np.array([0, 1]))
    x = torch.randn(batch, dim)
    y = torch.randint(0, 2, (batch,))
    with FlopCounterMode(display=False) as counter:
        head.loss(module(x), y).backward()
    return int(counter.get_total_flops())


def bare_matmuls(batch: int, dim: int, hidden: int, steps: int) -> float:
    """Seconds for ``steps`` x the training step's GEMMs on preallocated float32 tensors."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=g)
    w1 = torch.randn(hidden, dim, generator=g)
    w2 = torch.randn(2, hidden, generator=g)
    dz2 = torch.randn(batch, 2, generator=g)
    h = torch.empty(batch, hidden)
    z2 = torch.empty(batch, 2)
    dw2 = torch.empty(2, hidden)
    dh = torch.empty(batch, hidden)
    dw1 = torch.empty(hidden, dim)
    t = time.perf_counter()
    for _ in range(steps):
        torch.mm(x, w1.t(), out=h)  # forward layer 1
        torch.mm(h, w2.t(), out=z2)  # forward layer 2
        torch.mm(dz2.t(), h, out=dw2)  # backward: dW2
        torch.mm(dz2, w2, out=dh)  # backward: dH
        torch.mm(dh.t(), x, out=dw1)  # backward: dW1
    return time.perf_counter() - t


def train_once(x: np.ndarray, y: np.ndarray, hparams: dict[str, Any], name: str = "mlp") -> tuple[float, int]:
    """Seconds of one ``fit`` (no validation: the pure training loop) and the steps it ran."""
    from stage1.heads import HEADS

    head = HEADS.create(name, **hparams)
    t = time.perf_counter()
    head.fit(x, y)
    sec = time.perf_counter() - t
    assert head.history_ is not None
    steps = head.history_.epochs_run * (len(x) // min(int(hparams["batch_size"]), len(x)))
    return sec, steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="Thread counts to measure (training and baseline alike).")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args(argv)

    import torch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    y = (x[:, :8].sum(1) > 0).astype(np.int64)
    flops = step_flops(args.batch_size, args.dim, args.hidden)
    counted = measured_step_flops(args.batch_size, args.dim, args.hidden)
    default_threads = torch.get_num_threads()
    out: dict[str, Any] = {
        "shape": {"rows": args.rows, "dim": args.dim, "hidden": args.hidden, "batch_size": args.batch_size,
                  "epochs": args.epochs},
        "flops_per_step": flops,
        "flops_per_step_flopcounter": counted,
        "target_ratio": 0.5,
        "by_threads": {},
    }
    for threads in [int(t) for t in args.threads.split(",")]:
        hp = dict(hidden=args.hidden, batch_size=args.batch_size, epochs=args.epochs, dropout=0.1, seed=0,
                  threads=threads)
        torch.set_num_threads(threads)  # the baseline's GEMMs run on as many threads as training
        train_once(x[:2048], y[:2048], {**hp, "epochs": 1})  # warm-up (imports, allocator)
        bare_matmuls(args.batch_size, args.dim, args.hidden, 10)
        t_train, t_mm = [], []
        steps = 0
        for _ in range(args.repeats):  # alternate so that background load hits both alike
            sec, steps = train_once(x, y, hp)
            t_train.append(sec)
            t_mm.append(bare_matmuls(args.batch_size, args.dim, args.hidden, steps))
        train_s, mm_s = statistics.median(t_train), statistics.median(t_mm)
        total = flops * steps
        r = {"steps": steps, "train_seconds_median": train_s, "matmul_seconds_median": mm_s,
             "train_gflops": total / train_s / 1e9, "matmul_gflops": total / mm_s / 1e9,
             "ratio_train_vs_matmul": mm_s / train_s, "train_seconds_all": t_train, "matmul_seconds_all": t_mm}
        out["by_threads"][str(threads)] = r
        print(f"threads={threads}: mlp training {r['train_gflops']:.1f} GFLOP/s vs bare matmul "
              f"{r['matmul_gflops']:.1f} GFLOP/s -> ratio {r['ratio_train_vs_matmul']:.2f} (target >= 0.5)")
    torch.set_num_threads(default_threads)
    out["ratio_train_vs_matmul"] = min(r["ratio_train_vs_matmul"] for r in out["by_threads"].values())
    # the default recipe on the size, with early stopping on a validation split
    from stage1.heads import HEADS

    xv = rng.normal(size=(2000, args.dim)).astype(np.float32)
    yv = (xv[:, :8].sum(1) > 0).astype(np.int64)
    per_head = {}
    for name in ("mlp", "crc", "selectivenet", "gate"):
        kw = {"gate_target": "in_sample"} if name == "gate" else {}
        head = HEADS.create(name, **kw)
        t = time.perf_counter()
        head.fit(x, y, X_val=xv, y_val=yv)
        assert head.history_ is not None
        per_head[name] = {"seconds": time.perf_counter() - t, "epochs_run": head.history_.epochs_run,
                          "hparams": {k: head.hparams[k] for k in ("hidden", "batch_size", "epochs")}}
    out["default_fit_with_early_stopping"] = per_head
    print(f"min ratio over thread counts {out['ratio_train_vs_matmul']:.2f}; flops/step {flops} "
          f"(FlopCounterMode {counted}); {args.rows}x{args.dim}, hidden {args.hidden}, batch {args.batch_size}")
    for name, r in per_head.items():
        print(f"default {name}: {r['seconds']:.2f} s for {r['epochs_run']} epochs (early stopping on val)")
    if args.json_path:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json_path, json_safe(out))
    return out


if __name__ == "__main__":
    main()
