"""The paper's incremental protocol: chunks arrive one by one; each method updates its model.

    python -m gnp.experiments --model lenet-300-100 --dataset fashion-mnist --chunks 10 \\
        --methods ours,tfs,nft,nest --out DIR [--quick] [--seeds 0,1,2] [--compact] \\
        [--augment auto|on|off] [--device auto|cpu|cuda]
    python -m gnp.experiments --model deepspeech2-hlstm --dataset fsdd --data-dir DIR \
        --chunks 10 --methods ours,tfs,nft --out DIR [--quick] [--split speakers]

Speech (fsdd): the paper's speech schedule (gnp.speech_protocol), WER in place of error,
the first model on 40% of the data; `--split speakers` runs the speaker-incremental
scenario instead (one speaker per update, WER on seen and unseen speakers).

Writes DIR/results.json (a row per seed, chunk and method), DIR/results.md (a table
shaped like the paper's Table 4 with mean +- sd over seeds, the claims checked on the
seed means, and the diagnostics) and DIR/results.png (the spread over seeds).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from gnp.compact import compact_model, count_macs, save_dense
from gnp.data import (DATASETS, Data, fashion_mnist_available, idx_files_available,
                      incremental_split, load_dataset, random_subset)
from gnp.export import save_compact
from gnp.models import MODELS, build_model
from gnp.policies import METHODS, Schedule, UpdateResult, update
from gnp.report import schedule_changes
from gnp.speech_protocol import (SPEECH_DATASETS, SPEECH_MODELS, first_chunks, speaker_protocol,
                                 speech_schedule)
from gnp.tasks import CLASSIFICATION, Task
from gnp.train import COMPILE_MODES, evaluate, resolve_device

__all__ = ["Row", "AUGMENT_DEFAULT", "run_protocol", "main"]

# Affine distortions per data set (--augment auto). MNIST: the paper's choice. Fashion-MNIST:
# measured off vs on (docs/results/augmentation-fashion-mnist): off is better for every method.
AUGMENT_DEFAULT = {"mnist": True, "fashion-mnist": False, "digits": False}


@dataclass(frozen=True)
class Row:
    seed: int
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
    prune_stopped_by: str
    pre_prune_val_accuracy: float
    pre_prune_test_error_pct: float
    prune_epochs: float  # the pruning phase's retraining, in all-data epochs
    peak_lr: float
    growth_steps: int
    density_before_growth: float | None  # first growth step of the update
    density_after_growth: float | None  # last growth step of the update
    max_density: float | None  # densest the model got during the update
    compact_params: int | None = None  # non-recoverable export (with --compact)
    compact_test_error_pct: float | None = None
    compact_bytes: int | None = None  # its compact file
    dense_bytes: int | None = None  # the dense checkpoint of the same model
    seen_error_pct: float | None = None  # --split speakers: on the speakers seen so far
    unseen_error_pct: float | None = None  # ... and on the others (None after the last)
    speakers: str | None = None  # ... the speakers seen so far
    macs: int | None = None  # multiply-accumulates per sample, active weights only
    physical_params: int | None = None  # gnp.compact: inactive units sliced away, plain dense
    physical_macs: int | None = None  # its dense multiply-accumulates per sample
    physical_bytes: int | None = None  # its safetensors file
    code: str | None = None  # the commit of gnp that ran the update (code_version())


TEST_SUBSET_SEED = 0  # --test-size draws its subset with this seed, whatever the run's seeds


def default_val_size(dataset: str, n: int) -> int:
    """The protocol's validation hold-out of `n` training samples: 5,000 for (Fashion-)MNIST
    (the paper's), a tenth otherwise."""
    return 5000 if dataset in ("fashion-mnist", "mnist") else n // 10


def _task(ds) -> Task:
    return ds.task if ds.task is not None else CLASSIFICATION


def _row(seed: int, k: int, chunks: int, method: str, r: UpdateResult, test: Data,
         device: torch.device, n_all: int, pre_prune_test: float,
         task: Task = CLASSIFICATION) -> Row:
    g = r.growth
    prune_passes = dict(r.cost.phases).get("prune", 0)
    compact = {}
    if r.compact is not None:
        compact = {"compact_params": r.compact_params.active,
                   "compact_test_error_pct": 100.0 * (1.0 - evaluate(r.compact, test, device, task)),
                   **_file_sizes(r.compact)}
    if task.name == CLASSIFICATION.name:  # a sequence model's cost depends on the length
        compact.update(_physical(r.model))
    return Row(seed, k, k / chunks, method, 100.0 * (1.0 - evaluate(r.model, test, device, task)),
               r.val_accuracy, r.params.active, r.params.dense, r.cost.epochs,
               r.cost.sample_passes, r.cost.wall_seconds, r.cost.device, r.prune.iterations,
               r.prune.stopped_by, r.pre_prune_accuracy, 100.0 * (1.0 - pre_prune_test),
               prune_passes / n_all, r.peak_lr,
               len(g), g[0].density_before if g else None, g[-1].density_after if g else None,
               max(s.density_after for s in g) if g else None, **compact, code=code_version())


@functools.cache
def code_version() -> str | None:
    """The git commit gnp runs from ("+dirty" when files under gnp/ differ from it), so a
    row says which code made it, also when a resumed run spans commits; None outside a
    git checkout (an installed package)."""
    here = Path(__file__).resolve().parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(here), *cmd], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", str(here))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _physical(model: torch.nn.Module) -> dict[str, int]:
    """Size and cost of the served model and of its physical compaction (gnp.compact)."""
    shape = tuple(model.spec.input_shape)
    small = compact_model(model)
    with tempfile.TemporaryDirectory() as d:
        size = save_dense(small, Path(d) / "physical.safetensors")
    return {"macs": count_macs(model, shape),
            "physical_params": sum(p.numel() for p in small.parameters()),
            "physical_macs": count_macs(small, shape), "physical_bytes": size}


def _save_models(folder: Path, method: str, r: UpdateResult) -> None:
    """The latest update's served model (and non-recoverable export) as safetensors."""
    import safetensors.torch
    folder.mkdir(parents=True, exist_ok=True)
    for tag, model in ((method, r.model), (method + "-nonrecoverable", r.compact)):
        if model is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            safetensors.torch.save_file(state, str(folder / f"{tag}.safetensors"))


def _file_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the compact file and of a dense safetensors checkpoint of `model`."""
    import safetensors.torch
    with tempfile.TemporaryDirectory() as d:
        compact = save_compact(model, Path(d) / "compact.safetensors")
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    str(Path(d) / "dense.safetensors"))
        return {"compact_bytes": compact, "dense_bytes": (Path(d) / "dense.safetensors").stat().st_size}


def schedule_of(args: argparse.Namespace) -> Schedule:
    if args.dataset in SPEECH_DATASETS:
        s = speech_schedule(args.quick)
    else:
        s = Schedule.quick() if args.quick else Schedule()
    augment = AUGMENT_DEFAULT.get(args.dataset, True) if args.augment == "auto" else args.augment == "on"
    s = replace(s, train=replace(s.train, augment=augment))
    if args.incremental_lr is not None:
        s = replace(s, incremental_lr=args.incremental_lr or None)
    if args.finetune_epochs is not None:
        s = replace(s, finetune_epochs=args.finetune_epochs)
    if args.carry_unpruned:
        s = replace(s, carry_unpruned=True)
    if args.alpha is not None:
        s = replace(s, alpha=args.alpha)
    if args.shrink is not None:
        s = replace(s, shrink=args.shrink)
    if args.prune_beta is not None:
        s = replace(s, prune=replace(s.prune, beta=args.prune_beta))
    if args.prune_steps is not None:
        s = replace(s, prune=replace(s.prune, max_iterations=args.prune_steps))
    if args.unit_seed is not None:
        s = replace(s, unit_seed=args.unit_seed)
    if args.unit_growth is not None:
        s = replace(s, unit_growth=args.unit_growth)
    if args.compile is not None:
        s = replace(s, train=replace(s.train, compile=args.compile))
    return s


def run_protocol(args: argparse.Namespace, out: Path, log=print) -> list[Row]:
    options = {"test_speakers": args.test_speakers} if args.test_speakers else {}
    ds = load_dataset(args.dataset, args.data_dir, **options)
    if args.test_size is not None:  # a reduced run: one fixed test subset for every seed
        ds = replace(ds, test=_subset(ds.test, args.test_size, TEST_SUBSET_SEED, "--test-size"))
    schedule, methods = schedule_of(args), args.methods.split(",")
    device = resolve_device(args.device)
    task = _task(ds)
    rows, done = _resumed(args, out, log) if args.resume else ([], {})
    if args.split == "speakers":
        return speaker_protocol(args, ds, schedule, device,
                                lambda rows: _write_json(out, args, rows), log, rows, done,
                                lambda seed, k, carry: _checkpoint(out, seed, k, carry))
    bar = tqdm(total=len(args.seeds) * min(args.chunks, args.stop_after or args.chunks) * len(methods), unit="update",
               file=sys.stderr, disable=args.no_progress, initial=len(rows))
    for seed in args.seeds:
        train = ds.train
        if args.train_size is not None:  # a reduced run: a fixed random subset of the training set
            train = _subset(train, args.train_size, seed, "--train-size")
        val_size = args.val_size if args.val_size is not None else default_val_size(
            args.dataset, len(train))
        chunks, val = incremental_split(train, args.chunks, val_size, seed=seed)
        carry: dict[str, torch.nn.Module | None] = {m: None for m in methods}
        build = lambda: build_model(args.model, ds.input_shape, ds.num_classes)  # noqa: E731
        first = start = first_chunks(args)  # the first model learns this many chunks at once
        if seed in done:
            start, carry = done[seed]["chunk"] + 1, done[seed]["carry"]
        for k in range(start, min(len(chunks), args.stop_after or len(chunks)) + 1):
            all_data = type(chunks[0]).concat(chunks[:k])
            new = all_data if k == first else chunks[k - 1]
            for method in methods:
                def progress(phase: str, step: int, total: int) -> None:
                    bar.set_description(f"seed {seed} chunk {k}/{len(chunks)} {method} {phase} {step}/{total}")
                sched = schedule.with_nonrecoverable() if (args.compact and method in ("ours", "cgap")) else schedule
                pre = {}
                r = update(method, carry[method], new=new, all=all_data, val=val,
                           schedule=sched, build=build, device=device,
                           seed=seed * 1000 + k, progress=progress, task=task,
                           observe=lambda stage, m: pre.setdefault(
                               stage, evaluate(m, ds.test, task=task)))
                carry[method] = r.carry
                row = _row(seed, k, len(chunks), method, r, ds.test, device, len(all_data),
                           pre["pre-prune"], task)
                rows.append(row)
                bar.update(1)
                log(f"seed {seed} chunk {k} {method}: error {row.test_error_pct:.2f}% "
                    f"params {row.active_params} epochs {row.epochs:.2f} "
                    f"(prune {row.prune_iterations} it, {row.prune_stopped_by}; {row.wall_seconds:.0f}s)")
                if args.save_models:
                    _save_models(out / "models", method, r)
                _write_json(out, args, rows)  # after every update: a crash loses at most one
            _checkpoint(out, seed, k, carry)  # every method has learnt chunk k: --resume here
    bar.close()
    return rows


class RunError(ValueError):
    """The run cannot start with these arguments on this data (before any training)."""


class ResumeError(RunError):
    """--resume cannot go on with the run in --out (other arguments, or already past)."""


def _subset(data, n: int, seed: int, flag: str):
    try:
        return random_subset(data, n, seed)
    except ValueError as e:  # larger than the data set: say which flag, no traceback
        raise RunError(f"{flag} {n}: {e}") from None


# Arguments a resumed run may change: how far it goes, what it shows, where it runs, and
# where its directory is (a run moved, or checked out elsewhere, goes on).
_RESUMABLE_CHANGES = {"stop_after", "no_progress", "resume", "device", "argv", "out"}


def _checkpoint_path(out: Path, seed: int) -> Path:
    return out / "checkpoints" / f"seed{seed}.pt"


def _checkpoint(out: Path, seed: int, chunk: int, carry: dict) -> None:
    """What every method carries into the next chunk, after all of them learnt ``chunk``.

    The whole modules are pickled (masks, unit masks and whatever else a policy keeps on
    them), so a resumed run starts exactly where this one was: each update is seeded by
    (seed, chunk) alone, and its results are those of a run that never stopped.
    """
    path = _checkpoint_path(out, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"chunk": chunk, "carry": carry}, tmp)
    tmp.replace(path)


def _arguments(args: argparse.Namespace) -> dict:
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "argv"},
                                 default=str))


def _resumed(args: argparse.Namespace, out: Path, log) -> tuple[list[Row], dict[int, dict]]:
    """The rows and checkpoints of an earlier run into ``out`` with the same arguments.

    Each seed goes on after the last chunk that every method finished (its checkpoint);
    rows after that are dropped and computed again. Raises ResumeError when the earlier
    run's arguments differ in anything but :data:`_RESUMABLE_CHANGES`.
    """
    path = out / "results.json"
    if not path.exists():
        log(f"--resume: no {path} yet, starting from the first chunk")
        return [], {}
    doc = json.loads(path.read_text())
    before, now = doc.get("args", {}), _arguments(args)
    differ = sorted(k for k in set(before) | set(now)
                    if k not in _RESUMABLE_CHANGES and before.get(k) != now.get(k))
    if differ:
        raise ResumeError(f"--resume: {out} holds a run with other arguments ("
                         + ", ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now"
                                     for k in differ) + "); use another --out")
    changed = schedule_changes(doc.get("schedule", {}), _schedule_doc(schedule_of(args)))
    if changed:
        raise ResumeError(f"--resume: {out} ran another schedule ("
                          + ", ".join(f"{k}: {was!r} there, {now!r} now"
                                      for k, (was, now) in changed.items())
                          + "); a default changed since: pass the old value or use another --out")
    done = {}
    for seed in args.seeds:
        ckpt = _checkpoint_path(out, seed)
        if ckpt.exists():
            done[seed] = torch.load(ckpt, weights_only=False)
            if args.stop_after is not None and done[seed]["chunk"] > args.stop_after:
                raise ResumeError(f"--resume: seed {seed} of {out} already went past chunk "
                                 f"{args.stop_after} (to {done[seed]['chunk']}); give a "
                                 f"larger --stop-after or none")
    _refuse_dropping_finished_chunks(doc["rows"], args, out, done)
    rows = [Row(**r) for r in doc["rows"]
            if r["seed"] in done and r["chunk"] <= done[r["seed"]]["chunk"]]
    for seed in args.seeds:
        log(f"--resume: seed {seed} " + (f"goes on after chunk {done[seed]['chunk']}"
                                         if seed in done else "starts from the first chunk"))
    return rows, done


def _refuse_dropping_finished_chunks(rows: list[dict], args: argparse.Namespace, out: Path,
                                    done: dict[int, dict]) -> None:
    """Raise ResumeError when going on would drop rows of a chunk every method finished.

    A checkpoint is written after each such chunk, so one missing (or older than the rows)
    means it was lost: checkpoints/ is git-ignored, and a fresh checkout has results.json
    without them. Going on would start those seeds over and overwrite hours of rows; rows
    of a chunk some method had not finished are dropped and recomputed as before.
    """
    methods = set(args.methods.split(","))
    made: dict[tuple[int, int], set[str]] = {}
    for r in rows:
        made.setdefault((r["seed"], r["chunk"]), set()).add(r["method"])
    finished: dict[int, int] = {}
    for (seed, chunk), ms in made.items():
        if ms >= methods:
            finished[seed] = max(finished.get(seed, 0), chunk)
    lost = {s: k for s, k in sorted(finished.items())
            if s in args.seeds and k > done.get(s, {}).get("chunk", 0)}
    if lost:
        raise ResumeError(
            f"--resume: {out / 'results.json'} holds finished chunks whose checkpoint is missing ("
            + ", ".join(f"seed {s} through chunk {k}, checkpoint "
                        + (f"at chunk {done[s]['chunk']}" if s in done
                           else f"{_checkpoint_path(out, s)} absent") for s, k in lost.items())
            + "); going on would start over and overwrite those rows. Rerun into another --out "
            "and merge with `python -m gnp.report DIR --rows-from OTHER`, or move results.json "
            "away to start over")


def _write_json(out: Path, args: argparse.Namespace, rows: list[Row]) -> None:
    argv = [a for a in args.argv if a != "--resume"]  # the same rows without stopping
    doc = {
        "command": "python -m gnp.experiments " + " ".join(shlex.quote(a) for a in argv),
        "args": _arguments(args),
        "schedule": _schedule_doc(schedule_of(args)),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "metric": "WER" if args.dataset in SPEECH_DATASETS else "error",
        "rows": [asdict(r) for r in rows],
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(out / "results.json")


def _schedule_doc(s: Schedule) -> dict:
    doc = asdict(s)
    return json.loads(json.dumps(doc, default=str, allow_nan=True))


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes integers like 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gnp.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet-300-100", choices=sorted(MODELS))
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    p.add_argument("--data-dir", default=None,
                   help="directory of the four IDX .gz files (mnist; fashion-mnist elsewhere), "
                        "of the WAV files (fsdd)")
    p.add_argument("--test-speakers", type=lambda t: [s for s in t.split(",") if s], default=None,
                   help="fsdd: hold these speakers out as the test set (default: recordings 0-4 "
                        "of every speaker and digit, FSDD's official test split)")
    p.add_argument("--split", default="random", choices=["random", "speakers"],
                   help="speakers (fsdd): the first model learns one speaker, each update adds one")
    p.add_argument("--first-fraction", type=float, default=None,
                   help="share of the chunks the first model learns (default 0.4 for speech, "
                        "as the paper's speech protocol; one chunk otherwise)")
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--stop-after", type=int, default=None,
                   help="run only the first N chunks of the protocol (ablations)")
    p.add_argument("--val-size", type=int, default=None,
                   help="validation hold-out (default 5000 for (Fashion-)MNIST, 10%% otherwise)")
    p.add_argument("--train-size", type=int, default=None,
                   help="use a random subset of this many training samples (reduced runs)")
    p.add_argument("--test-size", type=int, default=None,
                   help="test on a fixed random subset of this many test samples, the same for "
                        "every seed and method (reduced runs of large models)")
    p.add_argument("--methods", default="ours,tfs,nft")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="reduced schedule (minutes on a CPU)")
    p.add_argument("--compact", action="store_true",
                   help="also export ours' and cgap's non-recoverable compact model: its size, error and bytes")
    p.add_argument("--augment", default="auto", choices=["auto", "on", "off"],
                   help="affine distortions; auto = the per-data-set choice (AUGMENT_DEFAULT)")
    p.add_argument("--incremental-lr", type=float, default=None,
                   help="peak lr when updating a trained model, ours and nft (0: the training lr)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="epochs of an nft update of a trained model (default: the baselines' "
                        "60): fewer runs fine-tuning at ours' cost, a control beside the baseline")
    p.add_argument("--carry-unpruned", action="store_true",
                   help="ours/cgap carry their model before pruning to the next update and serve "
                        "a pruned copy, as nft does (an ablation; the paper carries the pruned model)")
    p.add_argument("--alpha", type=float, default=None,
                   help="growth percentile: dormant connections whose |grad| is at or above "
                        "it grow (default Schedule.alpha, 50; the paper: 30..50); higher "
                        "grows fewer (ablations)")
    p.add_argument("--shrink", type=float, default=None,
                   help="shrink and perturb before each update of a trained model (ours, nft, "
                        "cgap alike): weights x this + N(0, 0.01^2) on active weights; an "
                        "ablation (default off, as the paper)")
    p.add_argument("--prune-beta", type=float, default=None,
                   help="percent of a layer's active weights (cgap: units) each pruning step "
                        "removes, every method alike (default PruneConfig.beta, 5; reduced runs)")
    p.add_argument("--prune-steps", type=int, default=None,
                   help="most pruning steps per update, every method alike (default: the "
                        "schedule's; reduced runs)")
    p.add_argument("--unit-seed", type=float, default=None,
                   help="cgap: share of each layer's units in the seed (default Schedule.unit_seed)")
    p.add_argument("--unit-growth", type=float, default=None,
                   help="cgap: a growth step adds this x a layer's active units")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="torch.compile the training forward in this mode (default, "
                        "reduce-overhead: CUDA graphs, ...); default eager, which is faster "
                        "on CPU (python -m gnp.bench measures both)")
    p.add_argument("--save-models", action="store_true",
                   help="write each method's latest served model to OUT/models/ (safetensors)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds (default 0)")
    p.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="go on with the run already in --out (same arguments; --stop-after and "
                        "--device may change) from the last chunk every method finished")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.argv = argv
    if args.seeds is None:
        args.seeds = [args.seed if args.seed is not None else 0]
    elif args.seed is not None:
        p.error("give --seeds or --seed, not both")
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {sorted(METHODS)}")
    if args.alpha is not None and not 0 <= args.alpha <= 100:
        p.error(f"--alpha is a percentile in [0, 100], got {args.alpha}")
    if args.shrink is not None and not 0 < args.shrink <= 1:
        p.error(f"--shrink must be in (0, 1], got {args.shrink}")
    if args.prune_beta is not None and not 0 < args.prune_beta < 100:
        p.error(f"--prune-beta is a percent in (0, 100), got {args.prune_beta}")
    if args.prune_steps is not None and args.prune_steps < 0:
        p.error(f"--prune-steps must be >= 0, got {args.prune_steps}")
    if args.test_size is not None and args.test_size < 1:
        p.error(f"--test-size must be >= 1, got {args.test_size}")
    if args.chunks < 1:
        p.error(f"--chunks must be >= 1, got {args.chunks}")
    if args.train_size is not None and args.train_size < 2 * args.chunks:
        p.error(f"--train-size must be at least 2 x --chunks, got {args.train_size}")
    if args.dataset == "fashion-mnist" and not fashion_mnist_available(args.data_dir):
        p.error("Fashion-MNIST not found (install dataset-fashion-mnist or pass --data-dir); "
                "--dataset digits runs anywhere")
    if args.dataset in SPEECH_DATASETS and not args.data_dir:
        p.error(f"--dataset {args.dataset} needs --data-dir, the directory of its WAV files")
    if args.split == "speakers" and args.dataset not in SPEECH_DATASETS:
        p.error("--split speakers needs a speech data set (fsdd)")
    if args.first_fraction is not None and not 0 < args.first_fraction <= 1:
        p.error(f"--first-fraction must be in (0, 1], got {args.first_fraction}")
    if args.dataset in SPEECH_DATASETS and args.model not in SPEECH_MODELS:
        p.error(f"--dataset {args.dataset} needs a speech model ({', '.join(SPEECH_MODELS)})")
    if args.dataset == "mnist" and not (args.data_dir and idx_files_available(args.data_dir)):
        p.error("MNIST: --data-dir must name a directory holding the four official IDX .gz "
                "files (nothing is downloaded); --dataset digits runs anywhere")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        rows = run_protocol(args, args.out)
    except RunError as e:
        print(f"gnp.experiments: {e}", file=sys.stderr)
        return 2
    from gnp.report import write_report  # matplotlib only when writing the report
    write_report(args.out, rows)
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
