"""Tables and plots of an incremental-protocol run (results.json -> results.md, results.png).

Rows are aggregated over seeds: each cell is the mean +- sample standard deviation of
the seeds that ran that chunk and method (no +- with one seed). The paper's claims are
checked on the seed means, chunk by chunk from the second on.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["aggregate", "claims", "write_report", "markdown_table", "merge_baselines",
           "schedule_changes"]

ERROR_MARGIN_PP = 0.2  # ours' error may exceed a baseline's by this much (seed means)
MAX_EPOCH_RATIO = 0.5  # ours' epochs must be at most this share of each baseline's


def _rows(rows: list[Any]) -> list[dict]:
    return [r if isinstance(r, dict) else asdict(r) for r in rows]


def aggregate(rows: list[Any]) -> dict[tuple[int, str], dict[str, Any]]:
    """(chunk, method) -> {field: (mean, sd, n)} over seeds, numeric fields only;
    `stopped_by` collects the pruning stop reasons."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in _rows(rows):
        groups.setdefault((r["chunk"], r["method"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        cell: dict[str, Any] = {"n": len(rs), "data_fraction": rs[0]["data_fraction"],
                                "stopped_by": [r.get("prune_stopped_by", "") for r in rs]}
        for f, v in rs[0].items():
            vals = [r[f] for r in rs if isinstance(r.get(f), (int, float)) and not isinstance(r.get(f), bool)]
            if vals and f not in ("seed", "chunk", "data_fraction"):
                sd = statistics.stdev(vals) if len(vals) > 1 else None
                cell[f] = (statistics.fmean(vals), sd, len(vals))
        out[key] = cell
    return out


def _order(rows: list[dict]) -> tuple[list[int], list[str]]:
    chunks = sorted({r["chunk"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return chunks, methods


def _fmt(cell: dict, field: str, spec: str) -> str:
    if field not in cell:
        return ""
    mean, sd, _ = cell[field]
    return f"{mean:{spec}}" + (f" ± {sd:{spec}}" if sd is not None else "")


def _seed_counts(agg: dict, k: int, methods: list[str]) -> str:
    """How many seeds a table row averages: "3", or per method where they differ."""
    ns = {m: agg[(k, m)]["n"] for m in methods if (k, m) in agg}
    if len(set(ns.values())) == 1:
        return str(next(iter(ns.values())))
    return ", ".join(f"{m} {n}" for m, n in ns.items())


def _md(head: list[str], body: list[list[str]]) -> str:
    """A markdown table: the header row, its rule, a row per list of cells."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(cells) + " |" for cells in body)])


def markdown_table(rows: list[Any], metric: str = "err") -> str:
    """Paper Table 4 layout: a row per data fraction; error % (or WER %), active params, epochs
    per method. Where some cells average fewer seeds than others (a run still going, merged
    with finished seeds), a column says how many seeds each row holds."""
    rows = _rows(rows)
    chunks, methods = _order(rows)
    agg = aggregate(rows)
    uneven = len({c["n"] for c in agg.values()}) > 1
    head = ["data"] + (["seeds"] if uneven else []) + [
        f"{m} {c}" for m in methods for c in (f"{metric} %", "params", "epochs")]
    body = []
    for k in chunks:
        frac = next(c["data_fraction"] for (kk, _), c in agg.items() if kk == k)
        cells = [f"{frac:.0%}"] + ([_seed_counts(agg, k, methods)] if uneven else [])
        for m in methods:
            c = agg.get((k, m), {})
            cells += [_fmt(c, "test_error_pct", ".2f"), _fmt(c, "active_params", ",.0f"),
                      _fmt(c, "epochs", ".1f")]
        body.append(cells)
    return _md(head, body)


def claims(rows: list[Any], error_margin_pp: float = ERROR_MARGIN_PP,
           max_epoch_ratio: float = MAX_EPOCH_RATIO) -> list[dict]:
    """Per chunk from the second on: ours vs each baseline present (tfs, nft), on the means
    over the seeds both have at that chunk (paired: a seed one method lacks is left out of
    that comparison, so seeds still running do not tilt it)."""
    rows = _rows(rows)
    chunks, _ = _order(rows)
    by_seed: dict[tuple[int, str], dict[int, dict]] = {}
    for r in rows:
        by_seed.setdefault((r["chunk"], r["method"]), {})[r.get("seed", 0)] = r
    out = []
    for k in chunks[1:]:
        ours = by_seed.get((k, "ours"))
        if not ours:
            continue
        c = {"chunk": k, "data_fraction": next(iter(ours.values()))["data_fraction"], "vs": {}}
        for b in ("tfs", "nft"):
            base = by_seed.get((k, b), {})
            seeds = sorted(ours.keys() & base.keys())
            if not seeds:
                continue
            mean = lambda rs, f: statistics.fmean(rs[s][f] for s in seeds)  # noqa: E731
            err = mean(ours, "test_error_pct") - mean(base, "test_error_pct")
            params = mean(ours, "active_params") / mean(base, "active_params")
            epochs = mean(ours, "epochs") / mean(base, "epochs")
            c["vs"][b] = {"error_diff_pp": err, "params_ratio": params, "epoch_ratio": epochs,
                          "error_ok": err <= error_margin_pp, "params_ok": params <= 1.0,
                          "epochs_ok": epochs <= max_epoch_ratio, "seeds": len(seeds)}
        if not c["vs"]:
            continue
        c["holds"] = all(v["error_ok"] and v["params_ok"] and v["epochs_ok"] for v in c["vs"].values())
        out.append(c)
    return out


def _claims_table(cs: list[dict]) -> str:
    bases = list(dict.fromkeys(b for c in cs for b in c["vs"]))
    uneven = len({v["seeds"] for c in cs for v in c["vs"].values()}) > 1
    head = ["data"] + [f"{x} vs {b.upper()}" for b in bases
                       for x in ("err diff (pp)", "params ratio", "epochs ratio")] + \
        (["seeds paired"] if uneven else []) + ["holds"]
    body = []
    mark = lambda ok: "" if ok else " ✗"  # noqa: E731
    for c in cs:
        cells = [f"{c['data_fraction']:.0%}"]
        for b in bases:
            v = c["vs"].get(b)
            cells += ([f"{v['error_diff_pp']:+.2f}{mark(v['error_ok'])}",
                       f"{v['params_ratio']:.2f}{mark(v['params_ok'])}",
                       f"{v['epoch_ratio']:.2f}{mark(v['epochs_ok'])}"] if v else ["", "", ""])
        if uneven:
            cells.append(", ".join(f"{b.upper()} {v['seeds']}" for b, v in c["vs"].items())
                         if len({v["seeds"] for v in c["vs"].values()}) > 1
                         else str(next(iter(c["vs"].values()))["seeds"]))
        body.append(cells + ["yes" if c["holds"] else "no"])
    return _md(head, body)


def _diagnostics_table(rows: list[dict]) -> str:
    """Pre-pruning accuracy, growth densities and pruning stop reasons, per chunk and method."""
    chunks, methods = _order(rows)
    agg = aggregate(rows)
    head = ["data", "method", "test err % before pruning", "val acc before pruning", "val acc served",
            "density before growth",
            "density after last growth", "max density", "prune iterations", "prune epochs",
            "pruning stopped by", "peak lr"]
    body = []
    for k in chunks:
        for m in methods:
            c = agg.get((k, m))
            if not c:
                continue
            stops = ", ".join(f"{s} x{c['stopped_by'].count(s)}" for s in dict.fromkeys(c["stopped_by"]))
            body.append([
                f"{c['data_fraction']:.0%}", m, _fmt(c, "pre_prune_test_error_pct", ".2f"),
                _fmt(c, "pre_prune_val_accuracy", ".4f"),
                _fmt(c, "val_accuracy", ".4f"), _fmt(c, "density_before_growth", ".3f"),
                _fmt(c, "density_after_growth", ".3f"), _fmt(c, "max_density", ".3f"),
                _fmt(c, "prune_iterations", ".1f"), _fmt(c, "prune_epochs", ".1f"), stops,
                _fmt(c, "peak_lr", ".3g")])
    return _md(head, body)


def _compact_table(rows: list[dict]) -> str:
    """The non-recoverable exports; "" where no cell has one."""
    chunks, methods = _order(rows)
    agg = aggregate(rows)
    head = ["data", "method", "recoverable err %", "recoverable params", "compact err %",
            "compact params", "compact / recoverable", "compact file (bytes)", "dense file (bytes)"]
    body = []
    for k in chunks:
        for m in methods:
            c = agg.get((k, m))
            if not c or "compact_params" not in c:
                continue
            ratio = c["compact_params"][0] / c["active_params"][0]
            body.append([
                f"{c['data_fraction']:.0%}", m, _fmt(c, "test_error_pct", ".2f"),
                _fmt(c, "active_params", ",.0f"), _fmt(c, "compact_test_error_pct", ".2f"),
                _fmt(c, "compact_params", ",.0f"), f"{ratio:.2f}",
                _fmt(c, "compact_bytes", ",.0f"), _fmt(c, "dense_bytes", ",.0f")])
    return _md(head, body) if body else ""


def _physical_table(rows: list[dict]) -> str:
    """FLOPs and the physical compaction (gnp.compact) of each served model; "" where no
    cell has them."""
    chunks, methods = _order(rows)
    agg = aggregate(rows)
    head = ["data", "method", "err %", "active params", "MACs/sample (active)",
            "compact model params", "compact MACs/sample", "compact file (bytes)"]
    body = []
    for k in chunks:
        for m in methods:
            c = agg.get((k, m))
            if not c or "physical_params" not in c:
                continue
            body.append([
                f"{c['data_fraction']:.0%}", m, _fmt(c, "test_error_pct", ".2f"),
                _fmt(c, "active_params", ",.0f"), _fmt(c, "macs", ",.0f"),
                _fmt(c, "physical_params", ",.0f"), _fmt(c, "physical_macs", ",.0f"),
                _fmt(c, "physical_bytes", ",.0f")])
    return _md(head, body) if body else ""


def _plot(rows: list[dict], path: Path, metric: str = "error") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks, methods = _order(rows)
    agg = aggregate(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, ax, label in (("test_error_pct", axes[0], f"test {metric} (%)"),
                           ("active_params", axes[1], "active parameters"),
                           ("epochs", axes[2], "training cost (all-data epochs)")):
        for m in methods:
            pts = [(agg[(k, m)]["data_fraction"], agg[(k, m)][key]) for k in chunks if (k, m) in agg]
            xs = [x for x, _ in pts]
            mean = [v[0] for _, v in pts]
            line, = ax.plot(xs, mean, marker="o", label=m)
            for k in chunks:  # every seed as a faint dot: the spread
                seeds = [r[key] for r in rows if r["chunk"] == k and r["method"] == m]
                if len(seeds) > 1:
                    frac = agg[(k, m)]["data_fraction"]
                    ax.scatter([frac] * len(seeds), seeds, s=10, alpha=0.35, color=line.get_color())
            sds = [v[1] for _, v in pts]
            if all(s is not None for s in sds):
                ax.fill_between(xs, [a - s for a, s in zip(mean, sds)], [a + s for a, s in zip(mean, sds)],
                                alpha=0.15, color=line.get_color())
        ax.set_xlabel("fraction of training data seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle("mean over seeds; band = ±1 sd, dots = single seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _code_versions(rows: list[dict]) -> str:
    """Which commits of gnp made the rows ("unrecorded": rows from before rows said); where
    one chunk has rows of several commits (a merged baseline run or rerun), each method's
    own chunks."""
    made: dict[str, dict[int, dict[str, list[int]]]] = {}
    codes_of: dict[tuple[int, int], set[str]] = {}
    for r in rows:
        code, seed = r.get("code") or "unrecorded", r.get("seed", 0)
        made.setdefault(code, {}).setdefault(seed, {}).setdefault(r["method"], []).append(r["chunk"])
        codes_of.setdefault((seed, r["chunk"]), set()).add(code)
    if list(made) == ["unrecorded"]:
        return ""
    if len(made) == 1:
        return f" Code: gnp at {next(iter(made))}."
    mixed = any(len(c) > 1 for c in codes_of.values())

    def span(ks: list[int]) -> str:
        return f"chunks {min(ks)}-{max(ks)}" if min(ks) < max(ks) else f"chunk {ks[0]}"

    def of_seed(seed: int, by_method: dict[str, list[int]]) -> str:
        if not mixed:
            return f"seed {seed} {span([k for ks in by_method.values() for k in ks])}"
        spans: dict[str, list[str]] = {}  # chunk span -> the methods with those chunks
        for m, ks in by_method.items():
            spans.setdefault(span(ks), []).append(m)
        return f"seed {seed} " + ", ".join(f"{sp} ({', '.join(ms)})" for sp, ms in spans.items())

    return " Code (the rows span commits): " + "; ".join(
        f"{code} made " + ", ".join(of_seed(seed, bm) for seed, bm in sorted(seeds.items()))
        for code, seeds in made.items()) + "."


def write_report(out: Path, rows: list[Any] | None = None, note: str = "") -> None:
    """Write results.md and results.png in `out` (rows default to out/results.json)."""
    doc = json.loads((out / "results.json").read_text())
    rows = _rows(rows) if rows is not None else doc["rows"]
    seeds = sorted({r.get("seed", 0) for r in rows})
    cs = claims(rows)
    held = sum(c["holds"] for c in cs)
    metric = doc.get("metric", "error")  # "WER" for speech: it stands where "error" does
    md = [f"# Incremental protocol: {doc['args']['model']} on {doc['args']['dataset']}", "",
          f"Command: `{doc['command']}`", "",
          f"Machine: {doc['machine']['platform']}, torch {doc['machine']['torch']}, "
          f"device {rows[0]['device'] if rows else '?'}; {doc['date']}. "
          f"Seeds: {', '.join(map(str, seeds))} (cells: mean ± sd over seeds)."
          + _code_versions(rows), "",
          *([note, ""] if note else []),
          "Test error of the served (recoverably pruned) model, its active parameters, and the "
          "update's training cost in all-data-epoch equivalents (growth passes and pruning "
          "retraining included)." + (f" Error is the {metric}." if metric != "error" else ""),
          "", markdown_table(rows, "err" if metric == "error" else metric), ""]
    if any(r.get("seen_error_pct") is not None for r in rows):
        from gnp.speech_protocol import plot_speakers, speaker_table
        md += ["## Speaker-incremental: WER on seen and unseen speakers", "",
               "After each update, the served model's WER on the official test recordings of "
               "the speakers learnt so far and of those not yet learnt (results-speakers.png).",
               "", speaker_table(rows), ""]
        plot_speakers(rows, out / "results-speakers.png")
    if cs:
        md += ["## Claims checked (seed means, from the second chunk on)", "",
               f"ours' test error <= each baseline's + {ERROR_MARGIN_PP} pp, active parameters <= "
               f"each baseline's, epochs <= {MAX_EPOCH_RATIO} x each baseline's (✗ marks a miss); "
               "each comparison on the seeds both methods have at that chunk.",
               "", _claims_table(cs), "", f"Holds at {held} of {len(cs)} chunks.", ""]
    md += ["## Diagnostics", "", "Test error and validation accuracy before pruning, validation "
           "accuracy of the served model; "
           "density of the masked layers before the first and after the last growth step of the "
           "update, and the densest it got; pruning iterations kept, the pruning phase's "
           "retraining in all-data epochs, and why pruning stopped.", "",
           _diagnostics_table(rows), ""]
    # A section only where it has a row: a cell's fields are those of its first seed's row,
    # so a field that only rows merged from a later run hold (a rerun's) fills no cell.
    if table := _compact_table(rows):
        md += ["## Non-recoverable export", "", "Pruned on from the served model past the "
               "recoverable conditions, within 0.5 pp of its validation accuracy (plus the paired "
               "noise allowance); stored compactly (packed mask bits + active values, "
               "`gnp.export`).", "", table, ""]
    if table := _physical_table(rows):
        md += ["## FLOPs and physical size", "", "Multiply-accumulates per sample over the "
               "served model's active weights (what sparse hardware would pay), and the plain "
               "dense model `gnp.compact` slices out of it (inactive units removed; what ordinary "
               "dense kernels pay): its parameters, MACs and safetensors file.", "", table, ""]
    (out / "results.md").write_text("\n".join(md))
    _plot(rows, out / "results.png", metric)


_SAME_PROTOCOL = ("model", "dataset", "chunks", "val_size", "train_size", "quick", "augment")


def merge_baselines(out: Path, baselines: Path, rows: list[dict] | None = None) -> list[dict]:
    """Rows of `out` (or `rows`, e.g. out's merged with more seeds) plus, from `baselines`
    (a run of the same protocol over seeds those rows have), the rows of each (seed,
    method) they lack: a variant of one method gets the other methods' rows of the same
    seeds, from one run or from several (one per seed, run as separate processes)."""
    doc = json.loads((out / "results.json").read_text())
    base = json.loads((baselines / "results.json").read_text())
    rows = doc["rows"] if rows is None else rows
    differ = [k for k in _SAME_PROTOCOL if doc["args"].get(k) != base["args"].get(k)]
    if not set(_run_seeds(base)) <= set(_run_seeds(doc)) | {r.get("seed", 0) for r in rows}:
        differ.append("seeds")
    if differ:
        raise ValueError(f"{baselines} ran a different protocol ({', '.join(differ)} differ)")
    have = {(r.get("seed", 0), r["method"]) for r in rows}
    chunks = {r["chunk"] for r in rows}
    extra = [r for r in base["rows"]
             if (r.get("seed", 0), r["method"]) not in have and r["chunk"] in chunks]
    return sorted(rows + extra, key=lambda r: (r.get("seed", 0), r["chunk"], r["method"] != "ours"))


def _run_seeds(doc: dict) -> list[int]:
    seeds = doc["args"].get("seeds")
    return list(seeds) if seeds is not None else sorted({r.get("seed", 0) for r in doc["rows"]})


def _flat(doc: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.05}} -> {"train.lr": 0.05}."""
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def schedule_changes(recorded: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{"train.lr": (recorded value, current value)} for each schedule field (nested ones
    as dotted names) that both records hold and that differs. The same arguments can mean
    another schedule once a default changed, so runs are compared by what they recorded;
    a field only one record holds was added since, and its default keeps the old behaviour."""
    a, b = _flat(recorded), _flat(current)
    return {k: (a[k], b[k]) for k in sorted(a) if k in b and a[k] != b[k]}


def _same_protocol(doc: dict, more: dict, other: Path, *also: str) -> None:
    """Raise ValueError unless `more` (the run in `other`) ran `doc`'s protocol: the same
    arguments that shape the rows (and `also`) and the same recorded schedule. The peak lr
    of updates is compared as recorded in the schedules where both record it: the flag
    spelled out (`--incremental-lr 0.01`) and the default of the day that gave the same
    value are the same protocol."""
    keys = [*_SAME_PROTOCOL, *also, "compact"]
    if not all("incremental_lr" in d.get("schedule", {}) for d in (doc, more)):
        keys.append("incremental_lr")
    differ = [k for k in keys if doc["args"].get(k) != more["args"].get(k)]
    differ += [f"schedule {k}" for k in schedule_changes(doc.get("schedule", {}),
                                                           more.get("schedule", {}))]
    if differ:
        raise ValueError(f"{other} ran a different protocol ({', '.join(differ)} differ)")


def merge_seeds(out: Path, other: Path) -> list[dict]:
    """Rows of `out` plus the rows of seeds it lacks from `other`, a run of the same protocol
    and methods with other seeds (seeds run as separate processes)."""
    doc = json.loads((out / "results.json").read_text())
    more = json.loads((other / "results.json").read_text())
    _same_protocol(doc, more, other, "methods")
    have = {r.get("seed", 0) for r in doc["rows"]}
    return doc["rows"] + [r for r in more["rows"] if r.get("seed", 0) not in have]


# What a row's computation gives (its timing and the commit it names aside): two runs of
# the same code, protocol and seed give these exactly on the CPU, so rows both hold must agree.
_COMPUTED = ("test_error_pct", "active_params", "epochs", "sample_passes", "val_accuracy")


def merge_rows(out: Path, other: Path, rows: list[dict] | None = None) -> tuple[list[dict], int]:
    """Rows of `out` (or `rows`) plus each (seed, chunk, method) row of `other` they lack,
    and how many rows both held: `other` reran part of the same protocol (a method or a
    seed whose checkpoint was lost). Rows both hold must agree in :data:`_COMPUTED`, or the
    runs are not the same computation and nothing merges (ValueError)."""
    doc = json.loads((out / "results.json").read_text())
    more = json.loads((other / "results.json").read_text())
    _same_protocol(doc, more, other)
    rows = doc["rows"] if rows is None else rows
    have = {(r.get("seed", 0), r["chunk"], r["method"]): r for r in rows}
    extra, shared = [], 0
    for r in more["rows"]:
        key = (r.get("seed", 0), r["chunk"], r["method"])
        if key not in have:
            extra.append(r)
            continue
        shared += 1
        bad = [f"{f} {have[key].get(f)!r} vs {r.get(f)!r}" for f in _COMPUTED
               if have[key].get(f) != r.get(f)]
        if bad:
            raise ValueError(f"{other} disagrees at seed {key[0]} chunk {key[1]} {key[2]} "
                             f"({'; '.join(bad)}): not the same computation")
    merged = sorted(rows + extra, key=lambda r: (r.get("seed", 0), r["chunk"]))
    return merged, shared


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m gnp.report",
                                description="Rewrite results.md and results.png of a run.")
    p.add_argument("out", type=Path, help="a directory holding results.json")
    p.add_argument("--baselines", type=Path, action="append", default=[],
                   help="take the methods this run lacks from another run of the same protocol")
    p.add_argument("--seeds-from", type=Path, action="append", default=[],
                   help="add the seeds this run lacks from another run of the same protocol")
    p.add_argument("--rows-from", type=Path, action="append", default=[],
                   help="add the (seed, chunk, method) rows this run lacks from a rerun of part "
                        "of it (the same protocol; rows both hold must agree)")
    p.add_argument("--note", default="", help="a sentence to put above the table (how it was run)")
    args = p.parse_args(argv)
    try:
        rows, note = _merged(args)
    except (OSError, ValueError) as e:  # a missing results.json, another protocol
        print(f"gnp.report: {e}; nothing written", file=sys.stderr)
        return 2
    write_report(args.out, rows, note=" ".join(x for x in (args.note, note) if x).strip())
    print(f"wrote {args.out}/results.md, results.png")
    return 0


def _merged(args) -> tuple[list[dict] | None, str]:
    """The rows of `args.out` with the seeds and baselines the arguments name, and the
    sentence that says where they came from."""
    rows = None
    if args.seeds_from:
        rows = []
        for d in args.seeds_from:
            rows += [r for r in merge_seeds(args.out, d)
                     if r.get("seed", 0) not in {x.get("seed", 0) for x in rows}]
        runs = [json.loads((d / "results.json").read_text())["command"] for d in args.seeds_from]
        note_seeds = "Seeds run as separate processes, merged here: " + "; ".join(
            f"`{c}`" for c in runs) + ". "
    else:
        note_seeds = ""
    note_rows = ""
    for d in args.rows_from:
        rows, shared = merge_rows(args.out, d, rows)
        note_rows += (f"Rows this run lacks from `{json.loads((d / 'results.json').read_text())['command']}`"
                      f" (a rerun of part of it; the {shared} rows both hold agree exactly). ")
    for b in args.baselines:
        rows = merge_baselines(args.out, b, rows)
    note = "".join(f"Rows of methods this run lacks from `{b}`. " for b in args.baselines)
    return rows, note_seeds + note_rows + note


if __name__ == "__main__":
    raise SystemExit(main())
