"""benchmarks/inference_latency.py on models a real (tiny) protocol run saved."""

import json
import subprocess
import sys
from pathlib import Path

from gnp.experiments import main

ROOT = Path(__file__).resolve().parents[2]


def test_latency_bench_times_every_export_and_tests_on_the_protocols_subset(tmp_path):
    run = tmp_path / "run"
    assert main(["--dataset", "digits", "--chunks", "1", "--methods", "tfs,ours,cgap", "--quick",
                 "--save-models", "--device", "cpu", "--no-progress", "--test-size", "50", "--prune-steps", "1",
                 "--train-size", "400", "--val-size", "100",
                 "--out", str(run)]) == 0
    out = tmp_path / "latency"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference_latency.py"),
                    "--models", str(run / "models"), "--dataset", "digits", "--test-size", "50",
                    "--threads", "1", "--batches", "1", "--rounds", "3", "--budget-s", "0.3",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=300)
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = {r["model"]: r for r in doc["rows"]}
    assert doc["test_samples"] == 50 and "Test error on 50 test samples" in out.with_suffix(".md").read_text()
    protocol = {r["method"]: r["test_error_pct"] for r in json.loads((run / "results.json").read_text())["rows"]}
    # the same served models on the same test subset: the protocol's figures
    assert abs(rows["masked (ours)"]["test_error_pct"] - protocol["ours"]) < 1e-6
    assert abs(rows["compact (cgap)"]["test_error_pct"] - protocol["cgap"]) < 1e-6
    assert rows["compact (cgap)"]["params"] < rows["dense (tfs weights, no masks)"]["params"]
    for r in rows.values():
        assert r["latency_us"]["1t/b1"]["median"] > 0
    # A test subset larger than the test set: a usage error naming the flag, nothing written.
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference_latency.py"),
                          "--models", str(run / "models"), "--dataset", "digits",
                          "--test-size", "100000", "--out", str(tmp_path / "bad")],
                         cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert bad.returncode == 2 and "--test-size 100000: a subset needs" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad.json").exists()
