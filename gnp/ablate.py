"""Ablations of the pruning rule on fixed pre-pruning models (the harness, not the library).

    python -m gnp.ablate prune-rule --out DIR [--dataset fashion-mnist] [--chunk 1] [--seeds 3,4]
    python -m gnp.ablate selection-bias --out DIR [--dataset fashion-mnist]

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
Writes DIR/<name>.json and DIR/<name>.md (and selection-bias.png).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from gnp.cost import CostMeter
from gnp.data import Data, incremental_split, load_dataset
from gnp.models import build_model
from gnp.policies import METHODS, Schedule, _run_phases, derive_seed, sparse_seed
from gnp.prune import PruneConfig, iterative_prune
from gnp.train import TrainConfig, Trainer, evaluate

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


def _write(out: Path, name: str, args: argparse.Namespace, rows: list[dict]) -> None:
    cmd = "python -m gnp.ablate " + " ".join(sys.argv[1:])
    doc = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "platform": platform.platform(), "torch": torch.__version__, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    keys = list(rows[0])
    lines = [f"# {name}", "", f"Command: `{cmd}`; {doc['date']}, CPU.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                                       for v in r.values()) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    if name == "selection-bias":
        _plot_bias(rows, out / "selection-bias.png")


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
    p.add_argument("what", choices=["prune-rule", "selection-bias"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--chunk", type=int, default=1, help="prune models trained on chunks 1..N")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[3, 4])
    p.add_argument("--z", type=float, default=0.5, help="selection-bias: the rule's z")
    p.add_argument("--correction", type=float, default=1.0,
                   help="selection-bias: the rule's continuity correction")
    p.add_argument("--every", type=int, default=5, help="selection-bias: measure every N steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = prune_rule(args) if args.what == "prune-rule" else selection_bias(args)
    _write(args.out, args.what, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
