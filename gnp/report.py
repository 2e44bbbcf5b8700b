"""Tables and plots of an incremental-protocol run (results.json -> results.md, results.png)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["write_report", "claims", "markdown_table", "merge_baselines"]


def _rows(rows: list[Any]) -> list[dict]:
    return [r if isinstance(r, dict) else asdict(r) for r in rows]


def _by(rows: list[dict]) -> tuple[list[int], list[str], dict[tuple[int, str], dict]]:
    chunks = sorted({r["chunk"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return chunks, methods, {(r["chunk"], r["method"]): r for r in rows}


def markdown_table(rows: list[dict]) -> str:
    """Paper Table 4 layout: a row per data fraction; error %, active params, epochs per method."""
    chunks, methods, at = _by(_rows(rows))
    compact = [m for m in methods if any(r.get("compact_params") for r in rows if r["method"] == m)]
    head = ["data"] + [f"{m} {c}" for m in methods for c in ("err %", "params", "epochs")]
    head += [f"{m} compact params" for m in compact]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in chunks:
        cells = [f"{at[(k, methods[0])]['data_fraction']:.0%}" if (k, methods[0]) in at else str(k)]
        for m in methods:
            r = at.get((k, m))
            cells += ([f"{r['test_error_pct']:.2f}", f"{r['active_params']:,}", f"{r['epochs']:.2f}"]
                      if r else ["", "", ""])
        cells += [f"{at[(k, m)]['compact_params']:,}" if at.get((k, m), {}).get("compact_params")
                  else "" for m in compact]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(rows: list[dict], error_margin_pp: float = 0.2, min_saving: float = 0.5) -> list[dict]:
    """For each chunk from the second on: ours' epoch saving vs TFS and NFT, error and size vs TFS."""
    chunks, methods, at = _by(_rows(rows))
    out = []
    for k in chunks[1:]:
        ours, tfs, nft = at.get((k, "ours")), at.get((k, "tfs")), at.get((k, "nft"))
        if not (ours and tfs):
            continue
        c = {"chunk": k, "data_fraction": ours["data_fraction"],
             "saving_vs_tfs": 1 - ours["epochs"] / tfs["epochs"],
             "saving_vs_nft": 1 - ours["epochs"] / nft["epochs"] if nft else None,
             "error_diff_pp": ours["test_error_pct"] - tfs["test_error_pct"],
             "params_ratio": ours["active_params"] / tfs["active_params"]}
        c["holds"] = bool(c["saving_vs_tfs"] >= min_saving
                          and (c["saving_vs_nft"] is None or c["saving_vs_nft"] >= min_saving)
                          and c["error_diff_pp"] <= error_margin_pp and c["params_ratio"] <= 1.0)
        out.append(c)
    return out


def _claims_table(cs: list[dict]) -> str:
    lines = ["| data | epochs saved vs TFS | vs NFT | error ours - TFS (pp) | params ours / TFS | holds |",
             "|---|---|---|---|---|---|"]
    for c in cs:
        nft = f"{c['saving_vs_nft']:.0%}" if c["saving_vs_nft"] is not None else "n/a"
        lines.append(f"| {c['data_fraction']:.0%} | {c['saving_vs_tfs']:.0%} | {nft} | "
                     f"{c['error_diff_pp']:+.2f} | {c['params_ratio']:.2f} | "
                     f"{'yes' if c['holds'] else 'no'} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks, methods, at = _by(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, ax, label in (("test_error_pct", axes[0], "test error (%)"),
                           ("active_params", axes[1], "active parameters"),
                           ("epochs", axes[2], "training cost (all-data epochs)")):
        for m in methods:
            pts = [(at[(k, m)]["data_fraction"], at[(k, m)][key]) for k in chunks if (k, m) in at]
            ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xlabel("fraction of training data seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, rows: list[Any] | None = None, note: str = "") -> None:
    """Write results.md and results.png in `out` (rows default to out/results.json)."""
    doc = json.loads((out / "results.json").read_text())
    rows = _rows(rows) if rows is not None else doc["rows"]
    cs = claims(rows)
    held = sum(c["holds"] for c in cs)
    md = [f"# Incremental protocol: {doc['args']['model']} on {doc['args']['dataset']}", "",
          f"Command: `{doc['command']}`", "",
          f"Machine: {doc['machine']['platform']}, torch {doc['machine']['torch']}, "
          f"device {rows[0]['device'] if rows else '?'}; {doc['date']}.", "",
          *([note, ""] if note else []),
          "Test error of the served (recoverably pruned) model, its active parameters, and the "
          "update's training cost in all-data-epoch equivalents (growth passes and pruning "
          "retraining included). \"compact params\": the non-recoverable export (pruned on past "
          "the recoverable conditions within 0.5 pp of validation accuracy; its pruning is not "
          "part of the update's cost).", "", markdown_table(rows), ""]
    if cs:
        md += ["## Claims checked (from the second chunk on)", "",
               "ours must save >= 50% of the epochs of TFS and of NFT, with a test error no worse "
               "than TFS's + 0.2 pp and no more active parameters than TFS.", "",
               _claims_table(cs), "", f"Holds at {held} of {len(cs)} chunks.", ""]
    (out / "results.md").write_text("\n".join(md))
    _plot(rows, out / "results.png")


_SAME_PROTOCOL = ("model", "dataset", "chunks", "val_size", "train_size", "seed", "quick")


def merge_baselines(out: Path, baselines: Path) -> list[dict]:
    """Rows of `out` plus the rows of methods it lacks from `baselines` (same protocol only)."""
    doc = json.loads((out / "results.json").read_text())
    base = json.loads((baselines / "results.json").read_text())
    differ = [k for k in _SAME_PROTOCOL if doc["args"].get(k) != base["args"].get(k)]
    if differ:
        raise ValueError(f"{baselines} ran a different protocol ({', '.join(differ)} differ)")
    have = {r["method"] for r in doc["rows"]}
    chunks = {r["chunk"] for r in doc["rows"]}
    extra = [r for r in base["rows"] if r["method"] not in have and r["chunk"] in chunks]
    return sorted(doc["rows"] + extra, key=lambda r: (r["chunk"], r["method"] != "ours"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m gnp.report",
                                description="Rewrite results.md and results.png of a run.")
    p.add_argument("out", type=Path, help="a directory holding results.json")
    p.add_argument("--baselines", type=Path, default=None,
                   help="take the methods this run lacks from another run of the same protocol")
    args = p.parse_args(argv)
    rows = merge_baselines(args.out, args.baselines) if args.baselines else None
    write_report(args.out, rows, note=f"Baseline rows from `{args.baselines}`." if args.baselines else "")
    print(f"wrote {args.out}/results.md, results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
