"""The paper's incremental protocol: chunks arrive one by one; each method updates its model.

    python -m gnp.experiments --model lenet-300-100 --dataset fashion-mnist --chunks 10 \\
        --methods ours,tfs,nft,nest --out DIR [--quick] [--device auto|cpu|cuda] [--seed N]

Writes DIR/results.json (a row per chunk and method), DIR/results.md (a table
shaped like the paper's Table 4, plus the claims checked against it) and
DIR/results.png (error, parameters and epochs against data fraction).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from gnp.data import Data, fashion_mnist_available, incremental_split, load_dataset
from gnp.models import MODELS, build_model
from gnp.policies import METHODS, Schedule, update
from gnp.train import evaluate, resolve_device

__all__ = ["Row", "run_protocol", "main"]


@dataclass(frozen=True)
class Row:
    chunk: int
    data_fraction: float
    method: str
    test_error_pct: float
    val_accuracy: float
    active_params: int
    dense_params: int
    epochs: float  # all-data-epoch equivalents of this update
    sample_passes: int
    wall_seconds: float
    device: str
    prune_iterations: int
    compact_params: int | None = None  # non-recoverable export (ours only, with --compact)


def run_protocol(args: argparse.Namespace, out: Path, log=print) -> list[Row]:
    ds = load_dataset(args.dataset, args.data_dir)
    if args.train_size is not None:  # a reduced run: a fixed random subset of the training set
        keep = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(args.seed))
        ds = replace(ds, train=ds.train.subset(keep[: args.train_size]))
    val_size = args.val_size if args.val_size is not None else (
        5000 if args.dataset == "fashion-mnist" else len(ds.train) // 10)
    chunks, val = incremental_split(ds.train, args.chunks, val_size, seed=args.seed)
    schedule = Schedule.quick() if args.quick else Schedule()
    if args.incremental_lr is not None:
        schedule = replace(schedule, incremental_lr=args.incremental_lr)
    methods = args.methods.split(",")
    build = lambda: build_model(args.model, ds.input_shape, ds.num_classes)  # noqa: E731
    device = resolve_device(args.device)
    carry: dict[str, torch.nn.Module | None] = {m: None for m in methods}
    rows: list[Row] = []
    bar = tqdm(total=len(chunks) * len(methods), unit="update", file=sys.stderr,
               disable=args.no_progress)
    for k in range(1, len(chunks) + 1):
        all_data = Data.concat(chunks[:k])
        for method in methods:
            def progress(phase: str, step: int, total: int) -> None:
                bar.set_description(f"chunk {k}/{len(chunks)} {method} {phase} {step}/{total}")
            sched = schedule.with_nonrecoverable() if (args.compact and method == "ours") else schedule
            r = update(method, carry[method], new=chunks[k - 1], all=all_data, val=val,
                       schedule=sched, build=build, device=device, seed=args.seed + k,
                       progress=progress)
            carry[method] = r.carry
            row = Row(k, k / len(chunks), method,
                      100.0 * (1.0 - evaluate(r.model, ds.test, device)), r.val_accuracy,
                      r.params.active, r.params.dense, r.cost.epochs, r.cost.sample_passes,
                      r.cost.wall_seconds, r.cost.device, r.prune.iterations,
                      r.compact_params.active if r.compact_params else None)
            rows.append(row)
            bar.update(1)
            log(f"chunk {k} {method}: error {row.test_error_pct:.2f}% params {row.active_params} "
                f"epochs {row.epochs:.2f} ({row.wall_seconds:.0f}s)")
            _write_json(out, args, rows)  # after every update: a crash loses at most one
    bar.close()
    return rows


def _write_json(out: Path, args: argparse.Namespace, rows: list[Row]) -> None:
    doc = {
        "command": "python -m gnp.experiments " + " ".join(shlex.quote(a) for a in args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [asdict(r) for r in rows],
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(out / "results.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gnp.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet-300-100", choices=sorted(MODELS))
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX .gz files")
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--val-size", type=int, default=None,
                   help="validation hold-out (default 5000 for Fashion-MNIST, 10%% otherwise)")
    p.add_argument("--train-size", type=int, default=None,
                   help="use a random subset of this many training samples (reduced runs)")
    p.add_argument("--methods", default="ours,tfs,nft,nest")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="reduced schedule (minutes on a CPU)")
    p.add_argument("--compact", action="store_true",
                   help="also export ours' non-recoverable compact model and report its size")
    p.add_argument("--incremental-lr", type=float, default=None,
                   help="learning rate of ours' updates after the first chunk (default: the training lr)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.argv = argv
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {sorted(METHODS)}")
    if args.chunks < 1:
        p.error(f"--chunks must be >= 1, got {args.chunks}")
    if args.train_size is not None and args.train_size < 2 * args.chunks:
        p.error(f"--train-size must be at least 2 x --chunks, got {args.train_size}")
    if args.dataset == "fashion-mnist" and not fashion_mnist_available(args.data_dir):
        p.error("Fashion-MNIST not found (install dataset-fashion-mnist or pass --data-dir); "
                "--dataset digits runs anywhere")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_protocol(args, args.out)
    from gnp.report import write_report  # matplotlib only when writing the report
    write_report(args.out, rows)
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
