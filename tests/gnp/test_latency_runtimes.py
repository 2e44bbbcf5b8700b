"""benchmarks/latency_runtimes.py: models of a latency run's widths, timed per runtime."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from latency_runtimes import narrow  # noqa: E402

SHAPE = (1, 28, 28)


def test_narrow_builds_the_compact_export_of_the_given_widths():
    widths = [[93, 784], [28, 93], [10, 28]]
    m = narrow("lenet-300-100", SHAPE, 10, widths)
    assert [list(p.shape) for n, p in m.named_parameters() if n.endswith("weight")] == widths
    assert not [n for n, _ in m.named_buffers() if "mask" in n]  # a plain dense module
    assert m(torch.rand(2, *SHAPE)).shape == (2, 10)
    with pytest.raises(ValueError, match="0 units of 300"):
        narrow("lenet-300-100", SHAPE, 10, [[0, 784], [28, 0], [10, 28]])
    with pytest.raises(ValueError, match="lists 2 shapes"):
        narrow("lenet-300-100", SHAPE, 10, widths[:2])


@pytest.mark.parametrize("runtimes", [
    "eager,torchscript",
    pytest.param("eager,torchscript,aoti", marks=pytest.mark.slow),  # AOTInductor compiles C++: ~20 s
])
def test_every_runtime_is_timed_after_matching_eager(tmp_path, runtimes):
    src = tmp_path / "latency.json"
    rows = [{"model": "dense", "widths": [[8, 784], [4, 8], [10, 4]], "test_error_pct": 10.0},  # small: fast to compile
            {"model": "masked (x)", "widths": [[8, 784], [4, 8], [10, 4]], "test_error_pct": 11.0}]
    src.write_text(json.dumps({"rows": rows}))
    out = tmp_path / "rt"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency_runtimes.py"), "--from", str(src),
                    "--runtimes", runtimes, "--batches", "1", "--rounds", "3", "--budget-s", "0.3",
                    "--out", str(out)],
                   check=True, cwd=ROOT, timeout=600)
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [r["model"] for r in doc["rows"]] == ["dense"]  # masked rows are not exports
    for r in doc["rows"]:
        assert set(r["latency_us"]) == {f"1t/b1/{rt}" for rt in runtimes.split(",")}
        assert all(v["median"] > 0 for v in r["latency_us"].values())
    assert doc["rows"][0]["macs"] == 784 * 8 + 8 * 4 + 4 * 10
    md = out.with_suffix(".md").read_text()
    assert "| dense | 10.00 | 6,366 |" in md and "| dense | " in md.split("### 1t/b1")[1]
    # An unknown runtime: a usage error naming it, nothing written.
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency_runtimes.py"), "--from", str(src),
                          "--runtimes", "eager,tvm", "--out", str(tmp_path / "bad")],
                         cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown ['tvm']" in bad.stderr
    assert not (tmp_path / "bad.json").exists()
