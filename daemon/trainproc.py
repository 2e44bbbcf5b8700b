"""The training child: ``python -m daemon.trainproc JOB.json`` runs one update and exits.

Why a separate interpreter (``subprocess``) rather than ``multiprocessing`` 'spawn': the
child shares nothing with the daemon but two files (the job it reads, the result and
candidate checkpoint it writes) and its log lines on stdout, which the daemon relays;
there is no pickling of the daemon's objects, no re-import of the daemon's ``__main__``
(pytest, ``gnpd``), no resource tracker, and the daemon can SIGTERM/SIGKILL it like any
process. Ingest and serving keep their own GIL, memory and crash domain.

The child reads the store without changing it (the manifest, then each chunk
memory-mapped; it takes no lock: the daemon holds it), verifies every chunk's checksum, trains with
``gnp.update`` on every usable chunk (resident within the replay budget, streamed from
the memory maps beyond it: :mod:`daemon.replay`), evaluates the reference versions
(served, head, recent ones) on the same validation set, writes
``candidate.safetensors`` (temp file + rename) and ``result.json``, and exits with one
of the ``EXIT_*`` codes. For a speech model the task is CTC (the metric 1 - WER) and the
data is MFCCs: the only thing the child writes outside its work folder is the store's
derived MFCC cache (``<store>/mfcc-cache``, one memory-mapped file per chunk, computed
once), and the sets are resident within the same budget or stream from that cache
beyond it (:func:`daemon.speech_store.speech_sets`). It dies with its parent
(``PR_SET_PDEATHSIG``, and gnp's ``should_stop`` checks the parent between epochs), is
the first the kernel's OOM killer picks (``oom_score_adj``), and exits at once on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import signal
import sys
import time
import typing
from pathlib import Path
from typing import Any

__all__ = ["EXIT_ABANDONED", "EXIT_FAILED", "EXIT_INFRA", "EXIT_NO_DATA", "EXIT_OK",
           "OUTCOME_EXIT", "Job", "main", "schedule_to_json"]

log = logging.getLogger("daemon.trainproc")

EXIT_OK, EXIT_FAILED, EXIT_ABANDONED, EXIT_NO_DATA, EXIT_INFRA = 0, 3, 4, 5, 75
OUTCOME_EXIT = {"success": EXIT_OK, "failed": EXIT_FAILED, "abandoned": EXIT_ABANDONED,
                 "no_data": EXIT_NO_DATA, "infra_error": EXIT_INFRA}
_PROGRESS_EVERY_S = 5.0


@dataclasses.dataclass(frozen=True)
class Job:
    """What one update child does; written by the daemon as JSON."""

    store: str
    input_shape: tuple[int, ...]
    pending: tuple[int, ...]  # chunk ids to learn as new data, oldest first
    older: tuple[int, ...]  # other usable chunk ids (replay candidates)
    registry: str
    model_name: str
    num_classes: int
    base_version: int | None  # the version training starts from (None: a fresh model)
    reference_versions: tuple[int, ...]  # evaluated on the validation set for the gate
    out_dir: str
    schedule: Any = "paper"  # "paper", "quick" or a gnp.Schedule as a dict
    method: str = "ours"  # gnp.update's method ("ours" or "cgap")
    device: str = "auto"
    replay_memory_bytes: int = 2 * 2**30
    augment: bool = False  # the task's random distortions on training batches
    compile: str = "off"  # torch.compile mode of the training forward ("off": eager)
    memory_limit_bytes: int = 0  # 0: no limit
    parent_pid: int = 0
    torch_threads: int = 0  # torch intra-op threads; 0: torch's default (every core)
    nice: int = 10  # niceness increment, applied before torch starts any thread
    seed: int = 0  # seeds the update's generators (shuffling, growth, dropout)
    update_fn: str = "gnp:update"
    evaluate_fn: str = "gnp:evaluate"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Job:
        d = json.loads(text)
        for key in ("input_shape", "pending", "older", "reference_versions"):
            d[key] = tuple(d[key])
        return cls(**d)


def schedule_to_json(schedule: Any) -> Any:
    """A schedule name as is, a gnp.Schedule (a dataclass) as a dict."""
    return schedule if isinstance(schedule, str) else dataclasses.asdict(schedule)


def _from_dict(cls: Any, value: Any) -> Any:
    """Rebuild a (nested) dataclass from :func:`dataclasses.asdict` output."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = _convert(hints[f.name], value[f.name])
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    if isinstance(value, dict):
        for arm in typing.get_args(hint) or (hint,):
            if dataclasses.is_dataclass(arm):
                return _from_dict(arm, value)
    if isinstance(value, list) and typing.get_origin(hint) is tuple:
        return tuple(value)
    return value


def _job_schedule(job: Job, speech: bool = False) -> Any:
    """The job's schedule with the daemon's training settings (memory, augmentation,
    compilation) applied."""
    schedule = _schedule(job.schedule, speech)
    return dataclasses.replace(schedule, train=dataclasses.replace(
        schedule.train, resident_bytes=job.replay_memory_bytes, augment=job.augment,
        compile=None if job.compile == "off" else job.compile))


def _schedule(spec: Any, speech: bool = False) -> Any:
    import gnp

    if speech and spec in ("paper", "quick"):  # speech trains with AdamW, its own epochs
        from gnp.speech_protocol import speech_schedule

        return speech_schedule(quick=spec == "quick")
    if spec == "paper":
        return gnp.Schedule()
    if spec == "quick":
        return gnp.Schedule.quick()
    if isinstance(spec, dict):
        return _from_dict(gnp.Schedule, spec)
    raise ValueError(f"schedule must be 'paper', 'quick' or a gnp.Schedule, got {spec!r}")


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---- process set-up -------------------------------------------------------------------------

class _Stop:
    """``should_stop`` for gnp: the daemon is gone. SIGTERM from the daemon exits at once.

    Exiting on SIGTERM at any point is safe: the child writes only into its own work
    folder and the store's MFCC cache (temp file + rename, both), and the daemon discards
    the work folder after a stop.
    """

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop

    @staticmethod
    def _handle(signum: int, frame: Any) -> None:
        os._exit(EXIT_ABANDONED)

    def __call__(self) -> bool:
        return self.parent_pid > 0 and os.getppid() != self.parent_pid


def _bind_to_parent(parent_pid: int) -> None:
    """Die with the daemon (Linux), and be the OOM killer's first choice."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent_pid and os.getppid() != parent_pid:
        sys.exit(EXIT_INFRA)  # the daemon died before we could bind to it
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def _limit_memory(extra_bytes: int) -> None:
    """Cap private memory (RLIMIT_DATA) at what start-up took plus ``extra_bytes``.

    RLIMIT_DATA counts heap and anonymous mappings, not the read-only memory-mapped
    chunk files, so only what the update allocates counts against the limit.
    """
    if extra_bytes <= 0:
        return
    import resource

    status = Path("/proc/self/status").read_text()
    vm_data = int(status.split("VmData:")[1].split()[0]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = vm_data + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    log.info("private memory limited to %.0f MiB above start-up", extra_bytes / 2**20)


def _is_infra(e: BaseException) -> bool:
    """Out of memory (host or device), storage and OS errors, a checkpoint that does not
    load: not the data's fault."""
    if isinstance(e, (MemoryError, OSError)):
        return True
    from daemon.registry import CheckpointError

    if isinstance(e, CheckpointError):  # a damaged checkpoint on disk, not the new chunks
        return True
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text
                                            or "can't allocate memory" in text)


# ---- the update -----------------------------------------------------------------------------

def _progress_logger() -> Any:
    last = [0.0, ""]

    def progress(phase: str, step: int, total: int) -> None:
        now = time.monotonic()
        if phase != last[1] or now - last[0] >= _PROGRESS_EVERY_S:
            last[:] = [now, phase]
            log.info("update progress: %s %d/%d", phase, step, total)

    return progress


def _load_data(job: Job) -> tuple[dict[str, Any], Any]:
    """Verify and memory-map the chunks; returns (report, (new, replay, val)) with each data
    set resident on the device within the replay budget, else streamed from the maps."""
    from gnp.data import place_all
    from gnp.train import resolve_device
    from daemon.manifest import read_manifest, verify_chunk
    from daemon.replay import ChunkView, chunked

    manifest = read_manifest(Path(job.store))
    if manifest is None:
        raise OSError(f"store {job.store} has no manifest")
    by_id = {c.id: c for c in manifest.chunks}
    speech = _is_speech(job.model_name)
    size = None if speech else math.prod(job.input_shape)
    corrupt = {}
    for i in job.pending + job.older:
        reason = verify_chunk(by_id[i], size, "speech" if speech else "image") \
            if i in by_id else "not in the manifest"
        if reason:
            corrupt[str(i)] = reason
            log.error("chunk %d (%s) is corrupt and left out: %s", i,
                      by_id[i].path if i in by_id else "?", reason)
    ok = lambda ids: [by_id[i] for i in ids if str(i) not in corrupt]  # noqa: E731
    new_chunks, old_chunks = ok(job.pending), ok(job.older)
    report: dict[str, Any] = {
        "corrupt": corrupt, "new_chunk_ids": [str(c.id) for c in new_chunks],
        "replay_chunk_ids": [str(c.id) for c in sorted(new_chunks + old_chunks, key=lambda c: c.id)]}
    if not new_chunks:
        return report, None
    if speech:
        from daemon.speech_store import MFCC_CACHE, speech_sets

        sets = speech_sets(new_chunks, old_chunks, job.replay_memory_bytes,
                           Path(job.store) / MFCC_CACHE)
        if sets is None:
            return report, None
    else:
        views = [ChunkView(c.path, job.input_shape) for c in new_chunks + old_chunks]
        sets = {"val": chunked(views, "val"), "all": chunked(views, "train"),
                "new": chunked(views[:len(new_chunks)], "train")}
    if sets["val"] is None:
        report["why"] = ("no validation rows in the stored chunks yet (a chunk holds out "
                         "round(chunk_size x val_fraction) of them): waiting for more data")
    if sets["new"] is None or sets["val"] is None:
        return report, None
    placed = place_all(sets, resolve_device(job.device), job.replay_memory_bytes)
    resident = {k: placed[k] is not sets[k] for k in sets}
    report["resident"] = resident
    report["resident_bytes"] = sum(sets[k].nbytes for k in sets if resident[k])
    report["samples"] = {"new": len(sets["new"]), "replay": len(sets["all"]), "val": len(sets["val"])}
    streamed = [k for k, r in resident.items() if not r]
    if streamed:
        log.info("replay memory budget %d bytes: %s streamed from the memory-mapped %s",
                 job.replay_memory_bytes, ", ".join(streamed),
                 "MFCC cache" if speech else "chunks")
    return report, (placed["new"], placed["all"], placed["val"])


def _train(job: Job, data: Any, stop: _Stop) -> tuple[dict[str, Any], Any]:
    """Run the update and evaluate the references; returns (result fields, model)."""
    from daemon.registry import CheckpointError

    new, replay, val = data
    registry = _registry(job)
    base = registry.load(job.base_version)[0] if job.base_version is not None else None
    update = _resolve(job.update_fn)
    log.info("training on %d new, %d replay, %d validation samples", len(new), len(replay),
             len(val))
    speech = _is_speech(job.model_name)
    task = {"task": _speech_task()} if speech else {}  # CTC: the metric is 1 - WER
    schedule = _job_schedule(job, speech)
    res = update(job.method, base, new=new, all=replay, val=val, schedule=schedule,
                 build=registry.build, device=job.device, progress=_progress_logger(),
                 should_stop=stop, seed=job.seed, **task)
    evaluate = _resolve(job.evaluate_fn)
    refs = {}
    for number in job.reference_versions:
        try:
            model = base if number == job.base_version and base is not None else \
                registry.load(number)[0]
        except CheckpointError as e:  # a damaged old version: gate against the others
            log.warning("reference version %d left out of the gate: %s", number, e)
            continue
        refs[str(number)] = float(evaluate(model, val, **task))
    del base
    cost = res.cost
    fields = {"val_accuracy": float(res.val_accuracy),
              "params": {"active": int(res.params.active), "dense": int(res.params.dense)},
              "cost": {"sample_passes": int(cost.sample_passes), "epochs": float(cost.epochs),
                       "wall_seconds": float(cost.wall_seconds), "device": str(cost.device)},
              "reference_accuracies": refs}
    return fields, res.model


def _registry(job: Job) -> Any:
    from daemon.registry import ModelRegistry

    return ModelRegistry(job.registry, job.model_name, job.input_shape, job.num_classes)


def _is_speech(model_name: str) -> bool:
    from gnp.models import SPEECH_MODELS

    return model_name in SPEECH_MODELS


def _speech_task() -> Any:
    from gnp.tasks import CTC_TASK

    return CTC_TASK


def _save_candidate(model: Any, out: Path) -> str:
    """Write the candidate (temp file + rename); any failure here is a storage error."""
    import safetensors.torch

    from daemon.manifest import write_atomic

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    final = out / "candidate.safetensors"
    try:
        blob = safetensors.torch.save(tensors)
        write_atomic(final, lambda f: f.write(blob))
    except OSError:
        raise
    except Exception as e:  # safetensors' own error types: still not the data's fault
        raise OSError(f"candidate not saved: {type(e).__name__}: {e}") from e
    return final.name


def _device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used here (a configuration problem, not the data's)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"device {device!r} was asked for but CUDA is not available"
    return None


def _verdict(e: BaseException, during: str) -> dict[str, Any]:
    """A failure as a result: blamed on the data only when training itself failed."""
    infra = _is_infra(e) or during != "training"
    log.exception("update failed while %s%s", during, " (infrastructure)" if infra else "")
    return {"outcome": "infra_error" if infra else "failed",
            "reason": f"{type(e).__name__} while {during}: {e}"}


def _run(job: Job, stop: _Stop) -> dict[str, Any]:
    import gnp

    problem = _device_problem(job.device)
    if problem:
        return {"outcome": "infra_error", "reason": problem}
    _limit_memory(job.memory_limit_bytes)
    if job.torch_threads:
        import torch

        torch.set_num_threads(job.torch_threads)
    result: dict[str, Any] = {"outcome": "infra_error", "reason": "", "pid": os.getpid()}
    during = "reading the store"
    try:
        report, data = _load_data(job)
        result.update(report)
        if data is None:
            why = result.pop("why", "no usable new chunk")
            return {**result, "outcome": "no_data", "reason": why}
        during = "building the model"  # a name or shape the registry refuses: not the data's
        _registry(job).build()
        during = "training"
        fields, model = _train(job, data, stop)
        result.update(fields)
        during = "saving the candidate"
        result["candidate"] = _save_candidate(model, Path(job.out_dir))
        return {**result, "outcome": "success"}
    except gnp.Abandoned:
        return {**result, "outcome": "abandoned", "reason": "stop requested"}
    except Exception as e:  # noqa: BLE001 - every failure becomes a verdict for the daemon
        return {**result, **_verdict(e, during)}


def main(argv: list[str] | None = None) -> int:
    """Run the job named on the command line; the exit code says the outcome."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(levelname)s %(name)s: %(message)s")
    job = Job.from_json(Path(args[0]).read_text())
    _bind_to_parent(job.parent_pid)
    os.nice(job.nice)  # per thread on Linux: torch's threads, started later, inherit it
    stop = _Stop(job.parent_pid)
    try:
        result = _run(job, stop)
    except MemoryError:
        result = {"outcome": "infra_error", "reason": "MemoryError"}
    try:
        out = Path(job.out_dir) / "result.json"
        out.with_suffix(".tmp").write_text(json.dumps(result))
        os.replace(out.with_suffix(".tmp"), out)
    except OSError as e:
        log.error("cannot write the result: %s", e)
        return EXIT_INFRA
    log.info("update child done: %s %s", result["outcome"], result.get("reason", ""))
    return OUTCOME_EXIT[result["outcome"]]


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)  # skip torch's slow interpreter teardown: the result is already on disk
