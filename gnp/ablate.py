"""Ablations of the pruning rule on fixed pre-pruning models (the harness, not the library).

    python -m gnp.ablate prune-rule --out DIR [--dataset fashion-mnist] [--chunk 1] [--seeds 3,4]
    python -m gnp.ablate selection-bias --out DIR [--dataset fashion-mnist]
    python -m gnp.ablate compression --out DIR [--seeds 0,1,2] [--targets 2,4,...]

Both first train the two kinds of model the protocol prunes on the first chunk of the
incremental split (seed 0): a dense model (TFS: 60 epochs) and a grown sparse one (NeST,
ours' first chunk: 60 epochs of growth and training from a 10% seed).

- prune-rule: recoverable pruning of each model under rules that differ in the noise
  allowance z of the paired check and the continuity correction, with two retraining
  streams each; reports kept iterations, active weights, the validation drop, the TEST
  error change (the set pruning never sees) and the retraining cost.
- selection-bias: pruning decides on half A of the validation set only; half B and the
  test set, which it never sees, are measured along the way. A rule that passes A while
  B and test fall is overfitting its decisions to the validation samples.

compression does not use those models: per seed it runs the protocol's TFS update on all
10 chunks (the dense model of the last chunk, trained as the protocol trains it), keeps the
model before pruning, and measures how far it compresses at no accuracy loss:
- rule: what the protocol serves, the recoverable pruning rule (its paired check, held-out
  verdict), and its non-recoverable export;
- curve: the same dense model pruned gradually with no accuracy check (the rule's 5% steps,
  each followed by half an epoch of retraining at the rule's rate), and at each target
  compression retrained 2 more epochs and measured: the error a given compression costs
  with this much retraining, whatever a rule would decide.
Every row gives the test error, its change from the dense model's and the paired z of
that change on the test samples (McNemar's: below 2 is within noise), and whether the
rule's own paired check on the whole validation set calls it "no loss" (val_check).
Writes DIR/<name>.json and DIR/<name>.md (and selection-bias.png, compression.png).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gnp.cost import CostMeter
from gnp.data import Data, incremental_split, load_dataset
from gnp.models import build_model
from gnp.masks import count_parameters
from gnp.policies import METHODS, Schedule, _run_phases, derive_seed, sparse_seed, update
from gnp.prune import PruneConfig, iterative_prune, prune_step, recovered
from gnp.train import TrainConfig, Trainer, evaluate, sample_scores

__all__ = ["main"]

RULES = {
    "z=0 (no allowance)": dict(noise_z=0.0, correction=0.0, holdout=0.0),
    "z=0.5": dict(noise_z=0.5, correction=0.0, holdout=0.0),
    "z=1": dict(noise_z=1.0, correction=0.0, holdout=0.0),
    "z=0.5 + continuity": dict(noise_z=0.5, correction=1.0, holdout=0.0),
    "z=1 + continuity": dict(noise_z=1.0, correction=1.0, holdout=0.0),
    "z=0.5 + continuity + held-out verdict (default)": dict(noise_z=0.5, correction=1.0, holdout=0.5),
}


def _pretrained(args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module], Data, Data, Data]:
    ds = load_dataset(args.dataset, args.data_dir)
    chunks, val = incremental_split(ds.train, 10, 5000, seed=0)
    train = Data.concat(chunks[:args.chunk])
    s = Schedule(train=TrainConfig(augment=False))
    models = {}
    for method in ("tfs", "nest"):
        model = build_model("lenet-300-100", ds.input_shape, ds.num_classes, seed=derive_seed(0, "init"))
        t = Trainer(model, torch.device("cpu"), s.train, CostMeter("cpu"), seed=derive_seed(0, "shuffle"))
        if method == "nest":
            sparse_seed(t.masks, s.seed_density, torch.Generator().manual_seed(derive_seed(0, "sparse")))
        _run_phases(t, METHODS[method].first(s), {"all": train, "new": train}, s, s.train.lr, None)
        models[method] = t.model
        print(f"{method}: trained, density {t.masks.density():.3f}", flush=True)
    return models, train, val, ds.test


def prune_rule(args: argparse.Namespace) -> list[dict]:
    models, train, val, test = _pretrained(args)
    rows = []
    for rule, kw in RULES.items():
        cfg = PruneConfig(**kw)
        for method, model in models.items():
            before = evaluate(model, test)
            for seed in args.seeds:
                t = Trainer(copy.deepcopy(model), torch.device("cpu"), TrainConfig(augment=False),
                            CostMeter("cpu"), seed=seed)
                r = iterative_prune(t, train, val, cfg, 0.05)
                rows.append({"rule": rule, "method": method, "seed": seed, "iterations": r.iterations,
                             "tried": r.iterations_tried, "stopped_by": r.stopped_by,
                             "active": r.active_after,
                             "val_drop_pp": 100 * (r.reference_accuracy - r.final_accuracy),
                             "test_change_pp": 100 * (before - evaluate(t.model, test)),
                             "retrain_epochs": r.retrain_passes / len(train)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def selection_bias(args: argparse.Namespace) -> list[dict]:
    models, train, val, test = _pretrained(args)
    half_a, half_b = val.subset(slice(0, len(val) // 2)), val.subset(slice(len(val) // 2, None))
    rows = []
    for method, model in models.items():
        t = Trainer(copy.deepcopy(model), torch.device("cpu"), TrainConfig(augment=False),
                    CostMeter("cpu"), seed=1)
        base = {k: t.evaluate(d) for k, d in (("A", half_a), ("B", half_b), ("test", test))}

        def log(step, method=method, t=t, base=base):
            if step.kept and step.iteration % args.every == 0:
                now = {k: t.evaluate(d) for k, d in (("A", half_a), ("B", half_b), ("test", test))}
                rows.append({"method": method, "iteration": step.iteration, "active": step.active,
                             **{f"{k}_change_pp": 100 * (now[k] - base[k]) for k in now}})
                print(json.dumps(rows[-1]), flush=True)
        iterative_prune(t, train, half_a, PruneConfig(noise_z=args.z, correction=args.correction,
                                                      holdout=0.0), 0.05, on_step=log)
    return rows


def compression(args: argparse.Namespace) -> list[dict]:
    from gnp.experiments import AUGMENT_DEFAULT, default_val_size
    ds = load_dataset(args.dataset, args.data_dir)
    s = Schedule(train=TrainConfig(augment=AUGMENT_DEFAULT.get(args.dataset, True)))
    cpu = torch.device("cpu")
    rows = []
    for seed in args.seeds:
        n_val = default_val_size(args.dataset, len(ds.train))
        chunks, val = incremental_split(ds.train, 10, n_val, seed=seed)  # the protocol's split
        train = Data.concat(chunks)
        seen: dict[str, torch.nn.Module] = {}
        r = update("tfs", None, new=train, all=train, val=val, schedule=s.with_nonrecoverable(),
                   build=lambda: build_model(args.model, ds.input_shape, ds.num_classes),
                   device=cpu, seed=seed * 1000 + 10,  # the protocol's seed for the last chunk
                   observe=lambda stage, m: seen.setdefault(stage, copy.deepcopy(m)))
        dense = seen["pre-prune"]
        ref = {"val": sample_scores(dense, val), "test": sample_scores(dense, ds.test)}

        def row(label: str, model: torch.nn.Module, **extra) -> None:
            n = count_parameters(model)
            now = {k: sample_scores(model, d)[0] for k, d in (("val", val), ("test", ds.test))}
            d = (ref["test"][0] - now["test"]).double()  # +1 where only the dense model is right
            z = float(d.sum() / d.pow(2).sum().sqrt()) if bool(d.any()) else 0.0
            rows.append({"seed": seed, "model": label, "active": n.active,
                         "compression": n.compression,
                         "val_acc": float(now["val"].mean()),
                         "val_check": recovered(ref["val"][0], now["val"], ref["val"][1],
                                                z=s.prune.noise_z, correction=s.prune.correction),
                         "test_err_pct": 100 * (1 - float(now["test"].mean())),
                         "test_err_change_pp": 100 * float(d.mean()), "test_err_z": z, **extra})
            print(json.dumps(rows[-1]), flush=True)
        row("dense (TFS before pruning)", dense)
        row("rule: served (recoverable)", r.model, iterations=r.prune.iterations,
            stopped_by=r.prune.stopped_by)
        if r.compact is not None:
            row("rule: non-recoverable export", r.compact)
        t = Trainer(copy.deepcopy(dense), cpu, s.train, CostMeter("cpu"),
                    seed=derive_seed(seed, "compress"))
        lr, steps = s.prune.retrain_lr_factor * s.train.lr, 0
        for target in sorted(args.targets):
            while count_parameters(t.model).compression < target:
                if prune_step(t.masks, s.prune.beta, recoverable=True) == 0:
                    break
                t.masks.mask_state(t.opt)
                t.train_epoch(train, fraction=0.5, lr=lr)
                steps += 1
            # the same 2 recovery epochs annealed (cosine from the rule's rate to 1% of it),
            # on a copy, so the curve itself goes on as if it had not been measured
            ta = Trainer(copy.deepcopy(t.model), cpu, s.train, CostMeter("cpu"),
                         seed=derive_seed(seed, f"anneal {target:g}"))
            ta.plan(2 * ta.steps(len(train)), peak=lr)
            for _ in range(2):
                t.train_epoch(train, lr=lr)
                ta.train_epoch(train)
            epochs = t.meter.sample_passes / len(train)
            row(f"curve: {target:g}x", t.model, target=target, steps=steps, epochs=epochs)
            row(f"curve: {target:g}x, annealed", ta.model, target=target, steps=steps,
                epochs=epochs)
    return rows


def _plot_compression(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    seeds = sorted({r["seed"] for r in rows})
    for i, seed in enumerate(seeds):
        rs = [r for r in rows if r["seed"] == seed]
        dense = next(r for r in rs if r["model"].startswith("dense"))
        color = f"C{i}"
        for annealed, style in ((False, "-"), (True, "--")):
            curve = [r for r in rs if r["model"].startswith("curve")
                     and r["model"].endswith("annealed") == annealed]
            ax.plot([r["compression"] for r in curve], [r["test_err_pct"] for r in curve],
                    style, marker="o", color=color,
                    label=f"seed {seed}: gradual pruning, no check"
                          + (", recovery annealed" if annealed else ""))
        ax.axhline(dense["test_err_pct"], color=color, ls=":", lw=1)
        for r in rs:
            if r["model"].startswith("rule"):
                ax.scatter([r["compression"]], [r["test_err_pct"]], color=color, s=80,
                           marker="*" if "served" in r["model"] else "s", zorder=3)
    ax.scatter([], [], color="k", marker="*", s=80, label="the rule: served (recoverable)")
    ax.scatter([], [], color="k", marker="s", label="the rule: non-recoverable export")
    ax.plot([], [], color="k", ls=":", label="dense (before pruning)")
    ax.axvline(10, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("compression (dense / active parameters, log)")
    ax.set_ylabel("test error %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(out: Path, name: str, args: argparse.Namespace, rows: list[dict]) -> None:
    cmd = "python -m gnp.ablate " + " ".join(sys.argv[1:])
    doc = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "platform": platform.platform(), "torch": torch.__version__, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# {name}", "", f"Command: `{cmd}`; {doc['date']}, CPU.", ""]
    if name == "compression":
        lines += _compression_summary(rows) + ["", "Every row:", ""]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    if name == "selection-bias":
        _plot_bias(rows, out / "selection-bias.png")
    if name == "compression":
        _plot_compression(rows, out / "compression.png")


def _compression_summary(rows: list[dict]) -> list[str]:
    """Seed means per model: compression, test error and its change from the dense model."""
    seeds = sorted({r["seed"] for r in rows})
    out = [f"Means over seeds {', '.join(map(str, seeds))} (± sd). Test error change: from the "
           "dense model's, in percentage points; z: the paired z of that change on the test "
           "samples (McNemar's; above 2 is a loss beyond noise); val check: seeds whose model "
           "passes the pruning rule's own paired no-loss check on the whole validation set.", "",
           "| model | compression | active | test err % | change (pp) | z | val check |",
           "|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == label]

        def ms(key: str, fmt: str, rs=rs) -> str:
            v = [float(r[key]) for r in rs]
            sd = f" ± {statistics.stdev(v):{fmt.lstrip('+')}}" if len(v) > 1 else ""
            return f"{statistics.mean(v):{fmt}}{sd}"
        out.append(f"| {label} | {ms('compression', '.1f')}x | {ms('active', ',.0f')} | "
                   f"{ms('test_err_pct', '.2f')} | {ms('test_err_change_pp', '+.2f')} | "
                   f"{ms('test_err_z', '.1f')} | {sum(bool(r['val_check']) for r in rs)} of "
                   f"{len(rs)} |")
    return out


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 and v != 0 else f"{v:.2f}"
    return str(v)


def _plot_bias(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, method in zip(axes, ("tfs", "nest")):
        rs = [r for r in rows if r["method"] == method]
        for key, label in (("A_change_pp", "half A (decides)"), ("B_change_pp", "half B (unseen)"),
                           ("test_change_pp", "test (unseen)")):
            ax.plot([r["active"] for r in rs], [r[key] for r in rs], marker="o", label=label)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{method}: accuracy change while pruning")
        ax.set_xlabel("active weights (log)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy change (pp)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gnp.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["prune-rule", "selection-bias", "compression"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--chunk", type=int, default=1, help="prune models trained on chunks 1..N")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[3, 4])
    p.add_argument("--z", type=float, default=0.5, help="selection-bias: the rule's z")
    p.add_argument("--correction", type=float, default=1.0,
                   help="selection-bias: the rule's continuity correction")
    p.add_argument("--model", default="lenet-300-100", help="compression: the model")
    p.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")],
                   default=[2, 4, 6, 8, 10, 12, 15, 20, 30],
                   help="compression: the curve's target compressions (dense / active)")
    p.add_argument("--every", type=int, default=5, help="selection-bias: measure every N steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {"prune-rule": prune_rule, "selection-bias": selection_bias,
            "compression": compression}[args.what](args)
    _write(args.out, args.what, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
