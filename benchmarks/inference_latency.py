"""Inference latency: dense vs masked vs physically compacted models (gnp.compact).

    python benchmarks/inference_latency.py --models docs/results/cgap-lenet300/models \\
        --out docs/results/inference_latency [--threads 2,1] [--batches 1,256] [--device cuda]

Loads the models an experiment saved with --save-models (the last update of each
method) and measures, for each thread count and batch size, the wall time of one
forward pass (torch.inference_mode, eval mode, on the CPU or with --device cuda on the GPU,
synchronised after each round) of:

- dense: TFS's served model as a plain full-width module (masks folded into the
  weights, mask buffers dropped): the cost of any dense LeNet-300-100;
- masked (ours), masked (cgap): the served models as trained, with their masks;
- compact (ours), compact (ours, non-recoverable), compact (cgap), compact (cgap,
  non-recoverable): gnp.compact's plain dense models with the inactive units sliced away;
- floor: the same layers one unit wide, what a forward pass costs besides arithmetic.
The cgap rows need cgap.safetensors (--cgap-models, or --models); without it they are
left out.

Each row gives the test error of that model, its parameters, its file size (a
safetensors file of its state: weights, masks where it has them) and, per setting,
the median latency and half the interquartile range of the timed rounds. The
rounds interleave the models, so load on the shared machine falls on all of them
alike; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import safetensors.torch
import torch

from gnp.compact import compact_model, count_macs, save_dense
from gnp.data import load_dataset, random_subset
from gnp.experiments import TEST_SUBSET_SEED
from gnp.masks import MASK, Masks
from gnp.models import build_model
from gnp.train import evaluate, resolve_device
from gnp.units import UnitMasks


def _load(path: Path, name: str, shape: tuple[int, ...], classes: int) -> torch.nn.Module:
    state = safetensors.torch.load_file(str(path))
    model = build_model(name, shape, classes)
    if any(k.endswith("unit_mask") for k in state):
        UnitMasks.attach(model).complete_unit_masks(state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The same full-width model without mask buffers (masked weights are zeros already)."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for m in plain.modules():
            for buf in (MASK, "unit_mask"):
                if buf in m._buffers:
                    if buf == MASK:
                        m.weight.mul_(m._buffers[buf])
                    del m._buffers[buf]
    return plain.eval()


def _floor(model: torch.nn.Module) -> torch.nn.Module:
    """The same layers one unit wide: what a forward pass costs besides the arithmetic."""
    narrow = copy.deepcopy(model)
    units = UnitMasks.attach(narrow)
    for g in units:
        g.mask.zero_()
        g.mask[0] = True
    units.sync(Masks(narrow))
    return compact_model(narrow)


def _bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        return save_dense(model, Path(d) / "m.safetensors")


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _time(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int,
          budget_s: float) -> dict[str, dict[str, float]]:
    """Per forward pass, in microseconds, over `rounds` interleaved rounds: wall-clock median,
    half the interquartile range and minimum, and the median process CPU time (all threads).

    On a loaded machine the wall median includes time the process waited for a core;
    the minimum (the least-disturbed round) and the CPU time are nearer the work itself.
    """
    calls = {}
    with torch.inference_mode():
        for name, m in models.items():  # warm up; size each round to ~budget_s / rounds
            for _ in range(5):
                m(x)
            _sync(x)
            t0 = time.perf_counter()
            for _ in range(10):
                m(x)
            _sync(x)
            per = (time.perf_counter() - t0) / 10
            calls[name] = max(1, int(budget_s / rounds / len(models) / max(per, 1e-7)))
        wall: dict[str, list[float]] = {name: [] for name in models}
        cpu: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, m in models.items():
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(calls[name]):
                    m(x)
                _sync(x)
                wall[name].append((time.perf_counter() - t0) / calls[name] * 1e6)
                cpu[name].append((time.process_time() - c0) / calls[name] * 1e6)
    out = {}
    for name, w in wall.items():
        q = statistics.quantiles(w, n=4)
        out[name] = {"median": statistics.median(w), "half_iqr": (q[2] - q[0]) / 2,
                     "min": min(w), "cpu_median": statistics.median(cpu[name]),
                     "calls_per_round": calls[name]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--cgap-models", type=Path, default=None,
                   help="read cgap.safetensors (and cgap-nonrecoverable) here (default --models)")
    p.add_argument("--model", default="lenet-300-100")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--test-size", type=int, default=None,
                   help="test error on the fixed subset `gnp.experiments --test-size` uses")
    p.add_argument("--threads", default="2,1")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--budget-s", type=float, default=12.0, help="timed seconds per setting")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    ds = load_dataset(args.dataset)
    if args.test_size is not None:
        try:
            ds = replace(ds, test=random_subset(ds.test, args.test_size, TEST_SUBSET_SEED))
        except ValueError as e:  # larger than the test set
            p.error(f"--test-size {args.test_size}: {e}")
    shape, classes = tuple(ds.input_shape), ds.num_classes
    f = lambda tag, d=args.models: _load(d / f"{tag}.safetensors", args.model, shape, classes)  # noqa: E731
    cgap_dir = args.cgap_models or args.models
    tfs, ours = f("tfs"), f("ours")
    cgap = f("cgap", cgap_dir) if (cgap_dir / "cgap.safetensors").exists() else None
    models = {"dense (tfs weights, no masks)": _plain(tfs), "masked (ours)": ours}
    if cgap is not None:
        models["masked (cgap)"] = cgap
    models["compact (ours)"] = compact_model(ours)
    nonrec = args.models / "ours-nonrecoverable.safetensors"
    if nonrec.exists():
        models["compact (ours, non-recoverable)"] = compact_model(f("ours-nonrecoverable"))
    if cgap is not None:
        models["compact (cgap)"] = compact_model(cgap)
    if (cgap_dir / "cgap-nonrecoverable.safetensors").exists():
        models["compact (cgap, non-recoverable)"] = compact_model(f("cgap-nonrecoverable", cgap_dir))
    models["floor: 1 unit per hidden layer"] = _floor(cgap if cgap is not None else tfs)
    rows = []
    for name, m in models.items():  # error, sizes and file bytes on the CPU, then timed on `device`
        rows.append({"model": name, "test_error_pct": 100.0 * (1.0 - evaluate(m, ds.test)),
                     "params": sum(q.numel() for q in m.parameters()),
                     "active_params": sum(q.numel() for q in m.parameters()) - sum(
                         int((~b).sum()) for n, b in m.named_buffers() if n.endswith(MASK)),
                     "macs": count_macs(m, shape), "file_bytes": _bytes(m),
                     "widths": [tuple(q.shape) for n, q in m.named_parameters() if n.endswith("weight")],
                     "latency_us": {}})
    models = {name: m.to(device) for name, m in models.items()}
    load_before = os.getloadavg()
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in (int(b) for b in args.batches.split(",")):
            x = ds.test.x[:batch].float().to(device)
            res = _time(models, x, args.rounds, args.budget_s)
            for row in rows:
                row["latency_us"][f"{threads}t/b{batch}"] = res[row["model"]]
            print(f"threads {threads} batch {batch}: " + ", ".join(
                f"{k} {v['median']:.1f}us (min {v['min']:.1f})" for k, v in res.items()),
                file=sys.stderr)
    load_after = os.getloadavg()
    doc = {"command": "python benchmarks/inference_latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_average_before": load_before,
           "load_average_after": load_after, "cpus": os.cpu_count(), "torch": torch.__version__,
           "platform": platform.platform(), "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "test_samples": len(ds.test), "rows": rows}
    write_doc(args.out, doc, _markdown(doc))
    return 0


def write_doc(out: Path, doc: dict, markdown: str) -> None:
    """OUT.json (the measurements) and OUT.md (their tables)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown)
    print(f"wrote {out}.json, {out}.md")


def machine_line(doc: dict) -> str:
    return (f"Date: {doc['date']}; {doc['cpus']} CPUs, shared with other work; load average "
            f"(1, 5, 15 min) before {tuple(round(v, 2) for v in doc['load_average_before'])}, "
            f"after {tuple(round(v, 2) for v in doc['load_average_after'])}; torch {doc['torch']}.\n")


def _markdown(doc: dict) -> str:
    rows = doc["rows"]
    settings = list(rows[0]["latency_us"])
    dense = rows[0]["latency_us"]
    where = f"GPU: {doc['gpu']}" if doc.get("gpu") else "CPU"
    lines = [f"# Inference latency ({where})\n", f"Command: `{doc['command']}`  ",
             machine_line(doc),
             "## Models\n",
             (f"Test error on {doc['test_samples']:,} test samples. " if doc.get("test_samples") else "") +
             "`params`: the tensors the module holds (masked models: full width, zeros "
             "included). MACs: multiply-accumulates per sample over active weights. File: a "
             "safetensors file of the module's state (masks included where it has them).\n",
             "| model | test err % | params | MACs/sample | file (bytes) | layer shapes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        shapes = " ".join("x".join(map(str, w)) for w in r["widths"])
        lines.append(f"| {r['model']} | {r['test_error_pct']:.2f} | {r['params']:,} | "
                     f"{r['macs']:,} | {r['file_bytes']:,} | {shapes} |")
    lines += ["\n## Latency per forward pass (microseconds)\n",
              "Per setting (threads t, batch b): wall-clock median +- half the interquartile "
              "range over interleaved rounds, then the minimum round and the median CPU time "
              "(all threads). Speed-up: the dense model's figure / this model's, on medians and "
              "on minima.\n"]
    for s in settings:
        lines += [f"### {s}\n", "| model | median +- IQR/2 | min | CPU time | speed-up (median) "
                  "| speed-up (min) |", "|---|---|---|---|---|---|"]
        for r in rows:
            v = r["latency_us"][s]
            lines.append(f"| {r['model']} | {v['median']:.1f} +- {v['half_iqr']:.1f} | "
                         f"{v['min']:.1f} | {v['cpu_median']:.1f} | "
                         f"{dense[s]['median'] / v['median']:.2f}x | {dense[s]['min'] / v['min']:.2f}x |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
