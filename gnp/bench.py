"""Training throughput: gnp's trainer against a plain DataLoader loop, side by side.

    python -m gnp.bench [--device auto|cpu|cuda] [--epochs N] [--out docs/results]

Both train LeNet-300-100 on Fashion-MNIST (digits where it is missing) with the
same batch size, optimiser and affine augmentation, and report samples/s:
- gnp: data resident on the device, batches by indexing, augmentation on the
  device, masks applied after each step (the cost of sparsity bookkeeping included);
- baseline: torch DataLoader over a TensorDataset (the usual script), batches
  copied to the device each step, augmentation on the device after the copy
  (the same work, so the difference is the input pipeline and the masks).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gnp.cost import CostMeter
from gnp.data import fashion_mnist_available, load_dataset
from gnp.models import build_model
from gnp.train import TrainConfig, Trainer, affine_distort, resolve_device

__all__ = ["bench_gnp", "bench_dataloader", "main"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_gnp(x: torch.Tensor, y: torch.Tensor, device: torch.device, cfg: TrainConfig,
              epochs: int) -> float:
    from gnp.data import Data
    model = build_model("lenet-300-100", tuple(x.shape[1:]), 10)
    t = Trainer(model, device, cfg, CostMeter(str(device)))
    data = Data(x, y).to(device)
    opt = t.optimizer()
    t.train_epoch(data, opt, fraction=0.1)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        t.train_epoch(data, opt)
    _sync(device)
    return epochs * len(y) / (time.perf_counter() - start)


def bench_dataloader(x: torch.Tensor, y: torch.Tensor, device: torch.device, cfg: TrainConfig,
                     epochs: int, workers: int) -> float:
    model = build_model("lenet-300-100", tuple(x.shape[1:]), 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)

    def epoch(limit: int | None = None) -> None:
        for i, (xb, yb) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if cfg.augment:
                xb = affine_distort(xb, cfg)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch(limit=len(loader) // 10)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        epoch()
    _sync(device)
    return epochs * len(y) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gnp.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the baseline")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    name = "fashion-mnist" if fashion_mnist_available() else "digits"
    ds = load_dataset(name)
    x, y = ds.train.x, ds.train.y
    rows = []
    for augment in (True, False):
        cfg = TrainConfig(batch_size=args.batch_size, augment=augment)
        ours = bench_gnp(x, y, device, cfg, args.epochs)
        base = {w: bench_dataloader(x, y, device, cfg, args.epochs, w) for w in (0, args.workers)}
        best = max(base.values())
        rows.append({"augment": augment, "gnp_samples_per_s": ours,
                     "dataloader_samples_per_s": {str(k): v for k, v in base.items()},
                     "ratio_vs_best_dataloader": ours / best})
        print(f"augment={augment}: gnp {ours:,.0f}/s, DataLoader {', '.join(f'{w} workers {v:,.0f}/s' for w, v in base.items())}, "
              f"ratio {ours / best:.2f}x", flush=True)
    _save(args, device, name, len(y), rows)
    return 0


def _save(args: argparse.Namespace, device: torch.device, dataset: str, n: int, rows: list) -> None:
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    tag = "cuda" if device.type == "cuda" else "cpu"
    cmd = "python -m gnp.bench " + " ".join(sys.argv[1:])
    doc = {"command": cmd, "device": str(device), "gpu": gpu, "dataset": dataset, "samples": n,
           "batch_size": args.batch_size, "epochs": args.epochs, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "platform": platform.platform(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"train_throughput_{tag}.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# Training throughput, LeNet-300-100 on {dataset} ({device}{', ' + gpu if gpu else ''})", "",
             f"Command: `{cmd}`; torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"batch {args.batch_size}, {args.epochs} epochs of {n} samples; {doc['date']}.", "",
             "| augmentation | gnp trainer (samples/s) | DataLoader, 0 workers | "
             f"DataLoader, {args.workers} workers | gnp / best DataLoader |", "|---|---|---|---|---|"]
    for r in rows:
        d = r["dataloader_samples_per_s"]
        lines.append(f"| {'on' if r['augment'] else 'off'} | {r['gnp_samples_per_s']:,.0f} | "
                     f"{d['0']:,.0f} | {d[str(args.workers)]:,.0f} | {r['ratio_vs_best_dataloader']:.2f}x |")
    (args.out / f"train_throughput_{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
