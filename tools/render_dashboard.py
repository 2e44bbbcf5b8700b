"""Render the Grafana dashboard's main panels to a PNG from a real Prometheus.

Each panel's queries (from deploy/grafana/gnpd-dashboard.json, Grafana variables
substituted) go through Prometheus' ``/api/v1/query_range``; matplotlib draws them in a
grid with Grafana's dark colours, and dashed red lines where the served model version
changed (the dashboard's "Model swaps" annotation).

    # start daemon + producer + Prometheus on loopback for 4 minutes, then render:
    python tools/render_dashboard.py --live 240 --out docs/dashboard.png
    # the same with a speech model learning FSDD (word error rate panel):
    python tools/render_dashboard.py --live 420 --speech-dir DIR --chunk-size 300 --rate 40 \
        --out docs/dashboard-speech.png
    # or render the last 30 minutes of an existing Prometheus:
    python tools/render_dashboard.py --prometheus http://127.0.0.1:9090 --minutes 30
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.promql import load_dashboard, panels, substitute  # noqa: E402

__all__ = ["MAIN_PANELS", "SPEECH_PANELS", "render"]

MAIN_PANELS = (
    "Validation accuracy", "Served model version", "Parameters: active vs dense",
    "Compression ratio", "Update cost (epochs)", "Update duration",
    "Ingest rate", "Rejected messages by reason", "Buffered samples",
    "Updates by outcome", "Predict latency", "Consumer lag",
)
# A speech model's dashboard: its word error rate where an image model shows accuracy.
SPEECH_PANELS = tuple("Word error rate (speech model)" if t == "Validation accuracy" else t
                      for t in MAIN_PANELS)
_BG, _PANEL, _TEXT, _GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
_COLORS = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a")


def _query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as resp:  # noqa: S310
        payload = json.loads(resp.read())
    if payload.get("status") != "success":
        raise RuntimeError(f"{expr}: {payload.get('error')}")
    return payload["data"]["result"]


def _legend(fmt: str, labels: dict[str, str], fallback: str) -> str:
    # One daemon in the picture: drop {{instance}} rather than print 127.0.0.1:port.
    text = fmt.replace("{{instance}}", "")
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return " ".join(text.split()) or fallback


def _scale(unit: str, peak: float) -> tuple[float, str]:
    """(multiplier, axis label) for a Grafana unit."""
    if unit == "percentunit":
        return 100.0, "%"
    if unit == "s":
        return (1000.0, "ms") if peak < 1.0 else (1.0, "s")
    return 1.0, {"x": "x (dense / active)", "reqps": "req/s"}.get(unit, "")


def _swap_times(base: str, start: float, end: float, step: float) -> list[float]:
    times = []
    for series in _query_range(base, "gnp_model_version", start, end, step):
        values = series["values"]
        times += [float(t) for (t, v), (_, prev) in zip(values[1:], values) if v != prev]
    return times


def _draw_panel(ax: Any, panel: dict, series: list[tuple[str, list[float], list[float]]],
                swaps: list[float]) -> None:
    import matplotlib.dates as mdates

    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    peak = max((abs(v) for _, _, vs in series for v in vs if math.isfinite(v)), default=0.0)
    mult, label = _scale(unit, peak)
    shown = [s for s in series if len(series) <= 3 or any(s[2])]
    hidden = len(series) - len(shown)  # e.g. rejection reasons that never occurred
    custom = panel["fieldConfig"]["defaults"].get("custom", {})
    steps = custom.get("lineInterpolation") == "stepAfter"
    if custom.get("stacking", {}).get("mode") == "normal" and shown:
        # Stacked like Grafana draws it; the series share the panel's one query's timestamps.
        grid = sorted({t for _, ts, _ in shown for t in ts})
        rows = [[dict(zip(ts, vs)).get(t, 0.0) * mult for t in grid] for _, ts, vs in shown]
        ax.stackplot([datetime.fromtimestamp(t) for t in grid], rows, labels=[n for n, _, _ in shown],
                     colors=[_COLORS[i % len(_COLORS)] for i in range(len(shown))], alpha=0.8)
    else:
        for i, (name, ts, vs) in enumerate(shown):
            ax.plot([datetime.fromtimestamp(t) for t in ts], [v * mult for v in vs],
                    color=_COLORS[i % len(_COLORS)], lw=1.8, label=name,
                    drawstyle="steps-post" if steps else "default")
    for t in swaps:  # fainter when there are many, so the data stays readable
        ax.axvline(datetime.fromtimestamp(t), color="#f2495c", lw=0.8, ls="--",
                   alpha=0.6 if len(swaps) <= 30 else 0.3)
    title = panel["title"] + (f"  ({hidden} all-zero series hidden)" if hidden else "")
    ax.set_title(title, color=_TEXT, fontsize=11, loc="left")
    ax.set_ylabel(label, color=_TEXT, fontsize=9)
    ax.set_facecolor(_PANEL)
    ax.grid(color=_GRID, lw=0.6)
    ax.tick_params(colors=_TEXT, labelsize=8)
    for spine in ax.spines.values():
        spine.set_color(_GRID)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, facecolor=_PANEL, edgecolor=_GRID, labelcolor=_TEXT, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", color=_TEXT, ha="center", va="center",
                transform=ax.transAxes)


def render(prometheus: str, out: str | Path, *, start: float, end: float, step: float,
           rate_interval: str = "1m", titles: tuple[str, ...] = MAIN_PANELS,
           note: str = "") -> Path:
    """Draw ``titles`` panels for [start, end] from the Prometheus at ``prometheus``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = load_dashboard()
    by_title = {p["title"]: p for p in panels(dashboard) if p["type"] == "timeseries"}
    missing = [t for t in titles if t not in by_title]
    if missing:
        raise ValueError(f"no time-series panel titled {missing} in the dashboard")
    swaps = _swap_times(prometheus, start, end, step)
    cols = 3
    rows = math.ceil(len(titles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.3 * rows), facecolor=_BG)
    for ax, title in zip(axes.flat, titles):
        panel = by_title[title]
        series = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], rate_interval=rate_interval)
            for result in _query_range(prometheus, expr, start, end, step):
                ts = [float(t) for t, _ in result["values"]]
                vs = [float(v) for _, v in result["values"]]
                series.append((_legend(target.get("legendFormat", ""), result["metric"], title), ts, vs))
        _draw_panel(ax, panel, series, swaps)
    for ax in list(axes.flat)[len(titles):]:
        ax.set_visible(False)
    span = f"{datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} to {datetime.fromtimestamp(end):%H:%M:%S}"
    fig.suptitle(f"{dashboard['title']}  |  {span}  |  {len(swaps)} model swaps (red dashes)",
                 color=_TEXT, fontsize=14, x=0.01, ha="left")
    fig.text(0.01, 0.005, "Rendered by tools/render_dashboard.py from a real Prometheus scraping a "
             f"running gnpd{note}; queries from deploy/grafana/gnpd-dashboard.json",
             color="#8e8e8e", fontsize=8)
    fig.tight_layout(rect=(0, 0.015, 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor=_BG)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--live", type=float, metavar="SECONDS",
                        help="run daemon + producer + Prometheus on loopback this long, then render")
    source.add_argument("--prometheus", help="base URL of an existing Prometheus")
    parser.add_argument("--minutes", type=float, default=30, help="with --prometheus: how far back")
    parser.add_argument("--step", type=float, default=None, help="query step in seconds")
    parser.add_argument("--rate-interval", default=None, help="value for $__rate_interval")
    parser.add_argument("--chunk-size", type=int, default=1000,
                        help="with --live: samples per chunk (one update each)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="with --live: samples per second the producer sends")
    parser.add_argument("--speech-dir", type=Path, default=None,
                        help="with --live: learn FSDD speech from this folder of WAV recordings "
                             "(deepspeech2-hlstm) and draw the speech panels")
    parser.add_argument("--speech", action="store_true",
                        help="with --prometheus: draw the speech panels (word error rate)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args(argv)
    titles = SPEECH_PANELS if args.speech or args.speech_dir else MAIN_PANELS
    if args.prometheus:
        end = time.time()
        start = end - args.minutes * 60
        step = args.step or max(args.minutes * 60 / 300, 1.0)
        render(args.prometheus, args.out, start=start, end=end, step=step,
               rate_interval=args.rate_interval or "1m",
               titles=titles)
    else:
        from tools.livestack import LiveStack

        with tempfile.TemporaryDirectory(prefix="gnpd-render-") as tmp, LiveStack(
                tmp, chunk_size=args.chunk_size, rate=args.rate,
                speech_dir=args.speech_dir) as live:
            data = ("8x8 digits" if args.speech_dir is None else
                    "FSDD spoken digits, deepspeech2-hlstm")
            start = time.time()
            print(f"stack up: daemon {live.daemon_url}, Prometheus {live.prometheus_url}; "
                  f"recording {args.live:.0f}s", flush=True)
            time.sleep(args.live)
            end = time.time()
            render(live.prometheus_url, args.out, start=start, end=end, step=args.step or 1.0,
                   rate_interval=args.rate_interval or "10s",
                   titles=titles,
                   note=f" (embedded broker, {data} at {args.rate:g} samples/s, chunks of "
                        f"{args.chunk_size}, quick schedule, CPU)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
