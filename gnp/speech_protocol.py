"""The speech protocols (part of the experiment harness, not of the library).

Random split (the paper's Table 7 protocol): the first model learns 40% of the
training data, then one chunk arrives per update; ours grows 20 epochs on the new
chunk and 30 on all data, the baselines train 120 epochs; the same recoverable
pruning; WER in place of error.

Speaker-incremental split (`--split speakers`): the first model learns one speaker,
each update adds the next speaker's recordings (and their validation share); the
served model is tested on the official test recordings of the speakers seen so far
and of the speakers not yet seen.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Callable

import torch
from tqdm import tqdm

from gnp.fsdd import speaker_split
from gnp.models import SPEECH_MODELS
from gnp.policies import Schedule, update
from gnp.prune import PruneConfig
from gnp.sequences import SequenceData
from gnp.train import TrainConfig, evaluate

__all__ = ["SPEECH_DATASETS", "SPEECH_MODELS", "SPEECH_TRAIN", "speech_schedule", "first_chunks",
           "speaker_protocol", "speaker_table", "plot_speakers"]

SPEECH_DATASETS = ("fsdd",)
VAL_SHARE = 0.1  # validation hold-out of the training recordings (per speaker with --split speakers)

# AdamW: with SGD the CTC loss sat on its blank plateau for ~10 epochs of FSDD (measured, lr
# 0.05 and 0.1), which a reduced CPU schedule cannot afford; batch 16 for more steps an epoch.
SPEECH_TRAIN = TrainConfig(lr=0.01, final_lr=0.01, momentum=0.9, weight_decay=0.01,
                           batch_size=16, optimizer="adam", grad_clip=5.0)


def speech_schedule(quick: bool = False) -> Schedule:
    """The paper's speech schedule (20 + 30 growth epochs, baselines 120), or a reduced one."""
    prune = PruneConfig(beta=5.0, retrain_lr_factor=0.1)
    if quick:
        return Schedule(new_epochs=4, all_epochs=6, baseline_epochs=16, grow_every=3,
                        incremental_lr=0.003, train=SPEECH_TRAIN,
                        prune=replace(prune, beta=15.0, retrain_epochs=0.5, max_iterations=6,
                                      max_halvings=0))
    return Schedule(new_epochs=20, all_epochs=30, baseline_epochs=120, grow_every=5,
                    incremental_lr=0.003, train=SPEECH_TRAIN, prune=prune)


def first_chunks(args: argparse.Namespace) -> int:
    """How many chunks the first model learns (the paper's speech protocol: 40%)."""
    share = args.first_fraction
    if share is None:
        share = 0.4 if args.dataset in SPEECH_DATASETS else 1.0 / args.chunks
    return min(args.chunks, max(1, round(share * args.chunks)))


def _by_group(data: SequenceData, groups: set[str]) -> SequenceData | None:
    idx = [i for i, g in enumerate(data.groups) if g in groups]
    return data.subset(idx) if idx else None


def speaker_protocol(args: argparse.Namespace, ds, schedule: Schedule, device: torch.device,
                     save: Callable[[list], None], log=print, rows: list | None = None,
                     done: dict[int, dict] | None = None,
                     checkpoint: Callable[[int, int, dict], None] | None = None) -> list:
    """Run the speaker-incremental scenario; returns experiments.Row objects.

    `rows` and `done` are a resumed run's (experiments._resumed): a seed in `done` goes on
    after its checkpointed update with the carried models; `checkpoint(seed, k, carry)`
    is called once every method has learnt update k."""
    from gnp.experiments import _row  # the harness's row (import here: no cycle at load)
    from gnp.models import build_model

    methods = args.methods.split(",")
    task = ds.task
    speakers = sorted(set(ds.train.groups))
    n_updates = min(len(speakers), args.stop_after or len(speakers))
    rows, done = list(rows or []), done or {}
    bar = tqdm(total=len(args.seeds) * n_updates * len(methods), unit="update",
               file=sys.stderr, disable=args.no_progress, initial=len(rows))
    for seed in args.seeds:
        order = speakers[seed % len(speakers):] + speakers[: seed % len(speakers)]
        order, chunks, vals = speaker_split(ds.train, VAL_SHARE, seed, order)
        carry = {m: None for m in methods}
        build = lambda: build_model(args.model, ds.input_shape, ds.num_classes)  # noqa: E731
        start = 1
        if seed in done:
            start, carry = done[seed]["chunk"] + 1, done[seed]["carry"]
        for k in range(start, n_updates + 1):
            seen = set(order[:k])
            all_data, val = SequenceData.concat(chunks[:k]), SequenceData.concat(vals[:k])
            test_seen = _by_group(ds.test, seen)
            test_unseen = _by_group(ds.test, set(order) - seen)
            for method in methods:
                pre = {}
                r = update(method, carry[method], new=chunks[k - 1], all=all_data, val=val,
                           schedule=schedule, build=build, device=device, seed=seed * 1000 + k,
                           task=task, observe=lambda stage, m: pre.setdefault(
                               stage, evaluate(m, test_seen, task=task)))
                carry[method] = r.carry
                row = _row(seed, k, len(order), method, r, test_seen, device, len(all_data),
                           pre["pre-prune"], task)
                unseen = (100.0 * (1.0 - evaluate(r.model, test_unseen, device, task))
                          if test_unseen is not None else None)
                row = replace(row, seen_error_pct=row.test_error_pct, unseen_error_pct=unseen,
                              speakers="+".join(order[:k]))
                rows.append(row)
                bar.update(1)
                log(f"seed {seed} speakers {row.speakers} {method}: WER seen "
                    f"{row.seen_error_pct:.2f}% unseen "
                    f"{'-' if unseen is None else f'{unseen:.2f}%'} params {row.active_params} "
                    f"epochs {row.epochs:.2f} ({row.wall_seconds:.0f}s)")
                save(rows)
            if checkpoint is not None:
                checkpoint(seed, k, carry)
    bar.close()
    return rows


def speaker_table(rows: list[dict]) -> str:
    """WER on seen and unseen speakers after each update, per method (seed means)."""
    from gnp.report import aggregate, _fmt, _order

    chunks, methods = _order(rows)
    agg = aggregate(rows)
    head = ["update", "speakers seen"] + [f"{m} {c}" for m in methods
                                          for c in ("WER seen %", "WER unseen %")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in chunks:
        names = next(r["speakers"] for r in rows if r["chunk"] == k)
        cells = [str(k), names]
        for m in methods:
            c = agg.get((k, m), {})
            cells += [_fmt(c, "seen_error_pct", ".2f"), _fmt(c, "unseen_error_pct", ".2f") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_speakers(rows: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gnp.report import aggregate, _order

    chunks, methods = _order(rows)
    agg = aggregate(rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in methods:
        for key, style in (("seen_error_pct", "-"), ("unseen_error_pct", "--")):
            pts = [(k, agg[(k, m)][key][0]) for k in chunks if key in agg.get((k, m), {})]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{m} {key.split('_')[0]}")
    ax.set_xticks(chunks)
    ax.set_xlabel("speakers learnt")
    ax.set_ylabel("test WER (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
