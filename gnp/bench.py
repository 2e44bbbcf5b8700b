"""Training throughput: gnp's trainer against a plain DataLoader loop, side by side.

    python -m gnp.bench [--device auto|cpu|cuda] [--model lenet-300-100] [--rounds 3]
                        [--compile auto|none|MODE,...] [--out docs/results]

Both train the same model on Fashion-MNIST (digits where it is missing) with the same
batch size, optimiser settings and (when on) the same affine augmentation on the
device, and report samples/s:
- gnp: data resident on the device, batches by indexing, augmentation on the device,
  masks applied after each step (the cost of sparsity bookkeeping included), no host
  sync per step, fused SGD;
- baseline: the usual script: torch DataLoader over a TensorDataset (0 and 2 workers),
  batches copied to the device each step, plain SGD, `loss.item()` logged per step;
- compute floor (not a contender): forward, backward and a fused SGD step on one fixed
  batch, as many steps as an epoch has, with no data handling at all: no loop can beat
  it, so "floor / best DataLoader" is the most any data pipeline could gain over the
  usual script on this device and model;
- gnp in the other memory layout (models with 2-D convolutions): the trainer lays
  convolutions out as `TrainConfig.memory_format` "auto" picks (channels-last on the CPU),
  and the bench times the other layout beside it, so the table says whether the choice pays;
- gnp with its training forward compiled (`TrainConfig.compile`, torch.compile modes:
  `default`, and on CUDA `reduce-overhead`, which captures CUDA graphs), beside the
  eager trainer, so the table says whether compiling pays on this device. Compilation
  happens in the warm-up epoch and is not timed.
Each round times one epoch of every contender in turn, so machine noise hits them
alike; the table gives the median round and the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gnp.augment import affine_distort
from gnp.cost import CostMeter
from gnp.data import Data, fashion_mnist_available, load_dataset
from gnp.models import build_model
from gnp.tasks import Classification
from gnp.train import COMPILE_MODES, TrainConfig, Trainer, resolve_device, uses_channels_last

__all__ = ["gnp_epoch", "dataloader_epoch", "main"]

Epoch = Callable[[], int]
DEFAULT_MODEL = "lenet-300-100"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gnp_epoch(model_name: str, data: Data, device: torch.device, cfg: TrainConfig) -> Epoch:
    """One epoch of gnp's trainer per call; returns the samples it trained on."""
    model = build_model(model_name, tuple(data.x.shape[1:]), 10)
    t = Trainer(model, device, cfg, CostMeter(str(device)), Classification())
    resident = data.to(device)
    t.plan(10**9)

    def epoch() -> int:
        t.train_epoch(resident)
        return len(resident)
    return epoch


def dataloader_epoch(model_name: str, data: Data, device: torch.device, cfg: TrainConfig,
                     workers: int) -> Epoch:
    """One epoch of the usual DataLoader training loop per call."""
    model = build_model(model_name, tuple(data.x.shape[1:]), 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=cfg.batch_size, shuffle=True,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)

    def epoch() -> int:
        model.train()
        seen = 0
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if cfg.augment:
                xb = affine_distort(xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _ = loss.item()  # the usual per-step logging
            seen += len(yb)
        return seen
    return epoch


def floor_epoch(model_name: str, data: Data, device: torch.device, cfg: TrainConfig) -> Epoch:
    """An epoch's worth of model steps on one fixed batch: the model's cost alone."""
    model = build_model(model_name, tuple(data.x.shape[1:]), 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay,
                          **({"fused": True} if device.type == "cuda" else {}))
    if uses_channels_last(cfg, model, device):
        model.to(memory_format=torch.channels_last)
    xb = data.x[:cfg.batch_size].to(device)
    yb = data.y[:cfg.batch_size].to(device)
    steps = len(data) // cfg.batch_size

    def epoch() -> int:
        model.train()
        for _ in range(steps):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps * cfg.batch_size
    return epoch


def _timed(epoch: Epoch, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    n = epoch()
    _sync(device)
    return n / (time.perf_counter() - start)


def compare(contenders: dict[str, Epoch], device: torch.device, rounds: int) -> dict[str, list[float]]:
    """samples/s of every contender, one epoch each per round, interleaved (after a warm-up)."""
    for epoch in contenders.values():
        epoch()  # warm-up: allocator, workers, kernels
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, epoch in contenders.items():
            rates[name].append(_timed(epoch, device))
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gnp.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a gnp.models name (results of another model than the default go to "
                        "train_throughput_MODEL_DEVICE.*)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the baseline")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=None, help="train on the first N samples")
    p.add_argument("--compile", default="auto",
                   help="torch.compile modes to time beside the eager trainer, comma-separated "
                        "(auto: default, plus reduce-overhead on CUDA; none: skip)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    try:
        modes = compile_modes(args.compile, device)
    except ValueError as e:
        p.error(str(e))
    name = "fashion-mnist" if fashion_mnist_available() else "digits"
    data = load_dataset(name).train
    data = data.subset(slice(0, args.samples)) if args.samples else data
    other = other_layout(args.model, tuple(data.x.shape[1:]), device)
    rows = []
    load_before = _load()
    for augment in (False, True):
        cfg = TrainConfig(batch_size=args.batch_size, augment=augment)
        contenders = {"gnp": gnp_epoch(args.model, data, device, cfg),
                      "dataloader-0": dataloader_epoch(args.model, data, device, cfg, 0),
                      f"dataloader-{args.workers}": dataloader_epoch(args.model, data, device, cfg,
                                                                     args.workers)}
        if not augment:  # the floor has no data handling, augmentation included
            contenders["floor"] = floor_epoch(args.model, data, device, cfg)
        if other is not None:
            contenders[f"layout-{other}"] = gnp_epoch(args.model, data, device,
                                                      replace(cfg, memory_format=other))
        for mode in modes:
            contenders[f"compile-{mode}"] = gnp_epoch(args.model, data, device,
                                                      replace(cfg, compile=mode))
        rates = compare(contenders, device, args.rounds)
        med = {k: statistics.median(v) for k, v in rates.items()}
        best = max(v for k, v in med.items() if k.startswith("dataloader"))
        row = {"augment": augment, "samples_per_s": rates, "median": med,
               "ratio_vs_best_dataloader": med["gnp"] / best}
        if "floor" in med:
            row["floor_vs_best_dataloader"] = med["floor"] / best
        row["compiled_vs_eager"] = {m: med[f"compile-{m}"] / med["gnp"] for m in modes}
        if other is not None:
            row["other_layout"] = {"layout": other, "vs_auto": med[f"layout-{other}"] / med["gnp"]}
        rows.append(row)
        print(f"augment={augment}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in med.items())
              + f"; gnp / best DataLoader {med['gnp'] / best:.2f}x", flush=True)
    _save(args, device, name, len(data), rows, (load_before, _load()))
    return 0


def other_layout(model_name: str, shape: tuple[int, ...], device: torch.device) -> str | None:
    """The memory layout the trainer's "auto" does not pick for this model on this device
    (None for a model without 2-D convolutions, where the two are the same)."""
    model = build_model(model_name, shape, 10)
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return None
    return "contiguous" if uses_channels_last(TrainConfig(), model, device) else "channels_last"


def compile_modes(spec: str, device: torch.device) -> list[str]:
    """The torch.compile modes that `--compile` names; ValueError for one torch lacks."""
    if spec == "none":
        return []
    if spec == "auto":
        return ["default"] + (["reduce-overhead"] if device.type == "cuda" else [])
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown or not modes:
        raise ValueError(f"--compile takes auto, none or modes among {', '.join(COMPILE_MODES)}; "
                         f"got {spec!r}")
    return modes


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _save(args: argparse.Namespace, device: torch.device, dataset: str, n: int, rows: list,
          load: tuple[str, str]) -> None:
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    tag = "cuda" if device.type == "cuda" else "cpu"
    if args.model != DEFAULT_MODEL:
        tag = f"{args.model}_{tag}"
    cmd = "python -m gnp.bench " + " ".join(sys.argv[1:])
    doc = {"command": cmd, "device": str(device), "gpu": gpu, "dataset": dataset, "samples": n,
           "model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load_average_1min": {"before": load[0], "after": load[1]}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"train_throughput_{tag}.json").write_text(json.dumps(doc, indent=1))
    w = f"dataloader-{args.workers}"
    lines = [f"# Training throughput, {args.model} on {dataset} ({device}{', ' + gpu if gpu else ''})", "",
             f"Command: `{cmd}`; torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"batch {args.batch_size}, {n} samples per epoch, median of {args.rounds} interleaved "
             f"rounds; {doc['date']}; load average (1 min) {load[0]} before, {load[1]} after.", "",
             "| augmentation | gnp trainer (samples/s) | DataLoader, 0 workers | "
             f"DataLoader, {args.workers} workers | gnp / best DataLoader | compute floor (samples/s) "
             "| floor / best DataLoader |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["median"]
        floor = (f"{m['floor']:,.0f} | {r['floor_vs_best_dataloader']:.2f}x" if "floor" in m
                 else "- | -")
        lines.append(f"| {'on' if r['augment'] else 'off'} | {m['gnp']:,.0f} | "
                     f"{m['dataloader-0']:,.0f} | {m[w]:,.0f} | {r['ratio_vs_best_dataloader']:.2f}x "
                     f"| {floor} |")
    modes = [m for m in rows[0]["compiled_vs_eager"]] if rows else []
    if modes:
        lines += ["", "torch.compile of the training forward (`TrainConfig.compile`), timed beside "
                  "the eager trainer in the same rounds (compilation in the warm-up, not timed):", "",
                  "| augmentation | mode | samples/s | compiled / eager |", "|---|---|---|---|"]
        for r in rows:
            for m in modes:
                lines.append(f"| {'on' if r['augment'] else 'off'} | {m} | "
                             f"{r['median'][f'compile-{m}']:,.0f} | {r['compiled_vs_eager'][m]:.2f}x |")
    layouts = [r for r in rows if "other_layout" in r]
    if layouts:
        other = layouts[0]["other_layout"]["layout"]
        auto = "contiguous" if other == "channels_last" else "channels_last"
        lines += ["", f"Memory layout: `TrainConfig.memory_format` \"auto\" trains this model "
                  f"{auto} here (the gnp column); the other layout, timed in the same rounds:", "",
                  "| augmentation | layout | samples/s | this / auto |", "|---|---|---|---|"]
        for r in layouts:
            lines.append(f"| {'on' if r['augment'] else 'off'} | {other} | "
                         f"{r['median']['layout-' + other]:,.0f} | "
                         f"{r['other_layout']['vs_auto']:.2f}x |")
    lines += ["", "The compute floor is the model's forward, backward and SGD step on one fixed "
              "batch, as many steps as an epoch, with no data handling: no training loop can "
              "beat it, so its ratio to the best DataLoader loop is the most a data pipeline "
              "can gain here."]
    (args.out / f"train_throughput_{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
