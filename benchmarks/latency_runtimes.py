"""Would a compiled runtime make the compact models fast at batch 1? Eager vs TorchScript vs
AOTInductor, on models of the layer widths an inference-latency run measured.

    python benchmarks/latency_runtimes.py --from docs/results/inference_latency_cgap_carry.json \\
        --out docs/results/latency_runtimes [--threads 1] [--batches 1,256]

`benchmarks/inference_latency.py` times eager PyTorch. At batch 1 its "floor" row (every
hidden layer one unit wide) already costs about half the dense model's time: the
per-layer cost of eager dispatch. This benchmark asks how much of that a graph runtime
removes, and what speed-up the compact widths allow once it is gone.

It reads the distinct layer widths of the unmasked rows of an `inference_latency` JSON
(dense, the compact exports, the floor), builds each as gnp would export it (the model from
the registry, unit masks keeping the first units of each layer, `gnp.compact.compact_model`),
with the registry's random initial weights: latency depends on the shapes, not on the
values, so the trained models are not needed (their test errors are in the source JSON and
are copied beside each row). Each model then runs as

- eager: the module itself, under torch.inference_mode (what the daemon serves);
- torchscript: `torch.jit.freeze(torch.jit.trace(...))`;
- aoti: `torch.export` + AOTInductor (`torch._inductor.aoti_compile_and_package`), one
  package per batch size (static shapes), compiled C++ called from Python.

Every compiled model is checked against eager on the timing input. The rounds interleave all
models and runtimes (the `_time` helper of inference_latency.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_latency import _time, machine_line, write_doc  # noqa: E402

from gnp.compact import compact_model, count_macs  # noqa: E402
from gnp.masks import Masks  # noqa: E402
from gnp.models import build_model  # noqa: E402
from gnp.units import UnitMasks  # noqa: E402

RUNTIMES = ("eager", "torchscript", "aoti")


def narrow(name: str, shape: tuple[int, ...], classes: int, widths: list[list[int]]) -> torch.nn.Module:
    """The registry's `name` compacted to `widths` (the weight shapes of a compact export, in
    parameter order): each unit group keeps its first units."""
    model = build_model(name, shape, classes)
    full = [n.removesuffix(".weight") for n, _ in model.named_parameters() if n.endswith("weight")]
    if len(full) != len(widths):
        raise ValueError(f"{name} has {len(full)} weights, the row lists {len(widths)} shapes")
    units = UnitMasks.attach(model)
    for g in units:
        n = widths[full.index(g.name)][0]
        if not 1 <= n <= len(g):
            raise ValueError(f"{g.name}: {n} units of {len(g)}")
        g.mask.zero_()
        g.mask[:n] = True
    units.sync(Masks(model))
    out = compact_model(model)
    got = [list(p.shape) for n, p in out.named_parameters() if n.endswith("weight")]
    if got != [list(w) for w in widths]:
        raise ValueError(f"compacted to {got}, not {widths}")
    return out


def compiled(model: torch.nn.Module, x: torch.Tensor, runtime: str, workdir: Path):
    if runtime == "eager":
        return model
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        if runtime == "torchscript":
            return torch.jit.freeze(torch.jit.trace(model, x))
        ep = torch.export.export(model, (x,))
        pkg = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(workdir / f"m{len(list(workdir.iterdir()))}.pt2"))
        return torch._inductor.aoti_load_package(pkg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", type=Path, required=True,
                   help="an inference_latency JSON: its unmasked rows give the widths")
    p.add_argument("--model", default="lenet-300-100")
    p.add_argument("--input-shape", default="1,28,28")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--threads", default="1")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--budget-s", type=float, default=20.0, help="timed seconds per setting")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    runtimes = args.runtimes.split(",")
    if bad := set(runtimes) - set(RUNTIMES):
        p.error(f"--runtimes: unknown {sorted(bad)}; choose from {', '.join(RUNTIMES)}")
    shape = tuple(int(v) for v in args.input_shape.split(","))
    try:
        source = json.loads(args.source.read_text())
    except (OSError, ValueError) as e:
        p.error(f"--from {args.source}: {e}")
    picked: dict[str, dict] = {}  # one row per distinct width, the first that has it
    for r in source["rows"]:
        key = json.dumps(r["widths"])
        if not r["model"].startswith("masked") and key not in picked:
            picked[key] = r
    if not picked:
        p.error(f"--from {args.source}: no unmasked rows")
    torch.manual_seed(0)
    models = {}
    for r in picked.values():
        try:
            models[r["model"]] = narrow(args.model, shape, args.classes, r["widths"])
        except (KeyError, ValueError) as e:
            p.error(f"--from {args.source}: row {r['model']!r}: {e}")
    rows = [{"model": name, "source_test_error_pct": r["test_error_pct"], "widths": r["widths"],
             "params": sum(q.numel() for q in models[name].parameters()),
             "macs": count_macs(models[name], shape), "latency_us": {}}
            for name, r in zip(models, picked.values())]
    load_before = os.getloadavg()
    compile_s: dict[str, float] = {}
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as d:
        for batch in (int(b) for b in args.batches.split(",")):  # compiled once per batch size
            x = torch.rand(batch, *shape)
            timed = {}
            for name, m in models.items():
                with torch.inference_mode():
                    want = m(x)
                for rt in runtimes:
                    t0 = time.perf_counter()
                    c = compiled(m, x, rt, Path(d))
                    compile_s[f"{name} / {rt} / b{batch}"] = time.perf_counter() - t0
                    with torch.inference_mode():
                        got = c(x)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                    timed[f"{name}|{rt}"] = c
            for t in threads:
                torch.set_num_threads(t)
                print(f"threads {t} batch {batch}: timing {len(timed)} models", file=sys.stderr)
                res = _time(timed, x, args.rounds, args.budget_s)
                for row in rows:
                    for rt in runtimes:
                        row["latency_us"][f"{t}t/b{batch}/{rt}"] = res[f"{row['model']}|{rt}"]
    doc = {"command": "python benchmarks/latency_runtimes.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "platform": platform.platform(), "source": str(args.source), "runtimes": runtimes,
           "compile_seconds": compile_s, "rows": rows}
    write_doc(args.out, doc, _markdown(doc))
    return 0


def _markdown(doc: dict) -> str:
    rows, runtimes = doc["rows"], doc["runtimes"]
    settings = sorted({k.rsplit("/", 1)[0] for k in rows[0]["latency_us"]},
                      key=lambda s: list(rows[0]["latency_us"]).index(f"{s}/{runtimes[0]}"))
    dense = rows[0]
    lines = ["# Inference latency by runtime (CPU)\n", f"Command: `{doc['command']}`  ",
             machine_line(doc),
             f"Models of the widths measured in `{doc['source']}` (random weights: the timing "
             "depends on the shapes only; the test error is that source's, of the trained model "
             f"of these widths). The first row is the baseline. Runtimes: {', '.join(runtimes)}.\n",
             "| model | test err % (source) | params | MACs/sample | layer shapes |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['source_test_error_pct']:.2f} | {r['params']:,} | "
                     f"{r['macs']:,} | {' '.join('x'.join(map(str, w)) for w in r['widths'])} |")
    lines += ["\n## Latency per forward pass (microseconds, wall-clock median over interleaved "
              "rounds)\n",
              "Speed-up: the first row's median in the same runtime / this row's; in brackets, "
              "the first row's eager median / this row's (what serving this model with that "
              "runtime gains over serving the dense model eagerly).\n"]
    for s in settings:
        lines += [f"### {s}\n", "| model | " + " | ".join(runtimes) + " | " +
                  " | ".join(f"speed-up, {rt}" for rt in runtimes) + " |",
                  "|---|" + "---|" * (2 * len(runtimes))]
        for r in rows:
            med = {rt: r["latency_us"][f"{s}/{rt}"]["median"] for rt in runtimes}
            base = {rt: dense["latency_us"][f"{s}/{rt}"]["median"] for rt in runtimes}
            eager0 = dense["latency_us"][f"{s}/{runtimes[0]}"]["median"]
            lines.append(f"| {r['model']} | " + " | ".join(f"{med[rt]:.1f}" for rt in runtimes) + " | " +
                         " | ".join(f"{base[rt] / med[rt]:.2f}x ({eager0 / med[rt]:.2f}x)" for rt in runtimes)
                         + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
