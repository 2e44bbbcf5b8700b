"""Predict latency under concurrent load while models are hot-swapped.

Serves a LeNet-300-100 (784 inputs) with the daemon's own HTTP stack (FastAPI +
uvicorn in a thread, ``daemon.serving``) on 127.0.0.1. A separate client process
runs N threads for ``--seconds``: half send single-instance requests, half
batch-32 requests, each over its own keep-alive connection. Meanwhile a swapper
thread in the server process publishes a different model version every
``--swap-every`` seconds. Every answer is checked against the predictions of the
version it names (all versions are precomputed), so a request answered partly by
two models, or by the wrong one, counts as a mismatch.

    python benchmarks/predict_latency.py --seconds 20 --threads 4

Writes docs/results/predict_latency.{md,json} (machine info and the command included).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = (1, 28, 28)
BATCH = 32
VERSIONS = 4


def _models(n: int):
    """n LeNet-300-100 models with different weights and ~10% of connections active."""
    import torch

    import gnp

    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = gnp.build_model("lenet-300-100", SHAPE, 10)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if name.endswith("_mask"):
                    t.copy_((torch.rand_like(t.float()) < 0.1).to(t.dtype))
            for module in model.modules():  # keep dormant weights at zero, as gnp does
                for pname, p in list(module.named_parameters(recurse=False)):
                    mask = getattr(module, f"{pname}_mask", None)
                    if mask is not None:
                        p.mul_(mask.to(p.dtype))
        out.append(model.eval())
    return out


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"single": rng.random((1, 784), dtype=np.float32).round(4),
            f"batch{BATCH}": rng.random((BATCH, 784), dtype=np.float32).round(4)}


def _client_thread(url: str, kind: str, body: bytes, seconds: float, out: list) -> None:
    import httpx

    lat, answers, failures = [], [], 0
    with httpx.Client(base_url=url, timeout=30, headers={"content-type": "application/json"}) as c:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                r = c.post("/v1/predict", content=body)
                ok = r.status_code == 200
            except Exception:  # noqa: BLE001 - a transport error is a failure
                ok = False
            lat.append(time.perf_counter() - t0)
            if ok:
                doc = r.json()
                answers.append((doc["model_version"], doc["predictions"]))
            else:
                failures += 1
    out.append((kind, lat, answers, failures))


def _client_process(url: str, threads: int, seconds: float, queue) -> None:
    bodies = {k: json.dumps({"instances": v.tolist()}).encode() for k, v in _inputs().items()}
    kinds = ["single", f"batch{BATCH}"]
    out: list = []
    ts = [threading.Thread(target=_client_thread,
                           args=(url, kinds[i % 2], bodies[kinds[i % 2]], seconds, out))
          for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    queue.put(out)


def _stats(kind: str, results: list, expected: dict, seconds: float) -> dict:
    lat = np.array([x for k, ls, _, _ in results if k == kind for x in ls]) * 1000
    answers = [a for k, _, ans, _ in results if k == kind for a in ans]
    failures = sum(f for k, _, _, f in results if k == kind)
    mismatches = sum(1 for v, preds in answers if preds != expected[(v, kind)])
    n = len(lat)
    per_request = BATCH if kind.startswith("batch") else 1
    return {"kind": kind, "requests": n, "failures": failures, "mismatches": mismatches,
            "versions_seen": len({v for v, _ in answers}),
            "throughput_rps": n / seconds, "instances_per_s": n * per_request / seconds,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())}


def _machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _version(n: int):
    from daemon.registry import ModelVersion

    return ModelVersion(n, n - 1 or None, time.time(), "lenet-300-100", SHAPE, 10)


class _Swapper(threading.Thread):
    """Publishes the next model version every ``every`` seconds until stopped."""

    def __init__(self, served, models: list, every: float) -> None:
        super().__init__(daemon=True)
        self.served, self.models, self.every = served, models, every
        self.swaps, self.halt = 0, threading.Event()

    def run(self) -> None:
        n = 1
        while not self.halt.wait(self.every):
            n = n % len(self.models) + 1
            self.served.publish(self.models[n - 1], _version(n))
            self.swaps += 1


def _drive_clients(url: str, threads: int, seconds: float) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    client = ctx.Process(target=_client_process, args=(url, threads, seconds, queue))
    client.start()
    results = queue.get(timeout=seconds + 120)
    client.join()
    return results


def run(args: argparse.Namespace) -> dict:
    import torch

    from daemon.metrics import Metrics
    from daemon.registry import ServedModel
    from daemon.serving import HttpServer, create_app

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    models = _models(VERSIONS)
    expected = {(v, kind): served_labels(m, x) for v, m in enumerate(models, start=1)
                for kind, x in _inputs().items()}
    served = ServedModel(SHAPE)
    served.publish(models[0], _version(1))
    server = HttpServer(create_app(served, Metrics()), "127.0.0.1", 0)
    server.start()
    swapper = _Swapper(served, models, args.swap_every)
    load_before = os.getloadavg()
    swapper.start()
    try:
        results = _drive_clients(server.url, args.threads, args.seconds)
    finally:
        swapper.halt.set()
        swapper.join()
        server.stop()
    rows = [_stats(k, results, expected, args.seconds) for k in ("single", f"batch{BATCH}")]
    machine = {**_machine(), "loadavg_1m_before": load_before[0],
               "loadavg_1m_after": os.getloadavg()[0]}
    return {"rows": rows, "swaps": swapper.swaps, "seconds": args.seconds,
            "threads": args.threads, "swap_every_s": args.swap_every, "machine": machine,
            "command": " ".join(["python benchmarks/predict_latency.py", *sys.argv[1:]]),
            "model": "lenet-300-100 (1x28x28 -> 10), ~10% of connections active",
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def served_labels(model, x: np.ndarray) -> list[int]:
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(x).reshape(len(x), *SHAPE)).argmax(1).tolist()


def _table(report: dict) -> str:
    head = ("| request | requests | req/s | instances/s | p50 ms | p90 ms | p99 ms | max ms "
            "| failures | wrong-version answers |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head] + [
        f"| {r['kind']} | {r['requests']} | {r['throughput_rps']:.0f} | "
        f"{r['instances_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
        f"{r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['failures']} | {r['mismatches']} |"
        for r in report["rows"]]
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    m = report["machine"]
    return f"""# Predict latency under concurrent load with hot swaps

{report['threads']} client threads (half single-instance, half batch-{BATCH}) in a separate
process, for {report['seconds']:.0f} s, against the daemon's HTTP server
(`daemon.serving`: FastAPI + uvicorn, one worker) on 127.0.0.1, while the served model
(LeNet-300-100, 784 inputs) was swapped every {report['swap_every_s']} s:
**{report['swaps']} swaps** during the run. Latency is measured in the client, request
sent to response parsed, over keep-alive connections.

{_table(report)}

"wrong-version answers" counts responses whose predictions differ from those of the
model version named in the response (precomputed for every version): a request
answered partly by two models, or by another model than it names, would show here.

Machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}, Python {m['python']},
torch {m['torch']} ({m['torch_threads']} intra-op threads in the server). Client and
server share the machine's cores, so on 2 cores the figures include contention with the
client's own JSON and HTTP work. 1-minute load average {m['loadavg_1m_before']:.1f} before
and {m['loadavg_1m_after']:.1f} after the run (other work on the machine inflates the tail).

Command (from the repository root), run {report['when']}:

    {report['command']}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=4, help="client threads (half batch)")
    p.add_argument("--swap-every", type=float, default=0.5, help="seconds between swaps")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads in the server (0 = torch's default)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = p.parse_args(argv)
    report = run(args)
    print(_table(report))
    print(f"swaps: {report['swaps']} in {report['seconds']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predict_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "predict_latency.md").write_text(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
