"""python -m gnp.bench: the table it writes (rates, ratios and the compute floor)."""

import json

import pytest
import torch

from gnp import bench


def test_bench_writes_rates_ratios_and_floor(tmp_path):
    assert bench.main(["--device", "cpu", "--samples", "512", "--rounds", "1", "--workers", "0",
                       "--compile", "none", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "train_throughput_cpu.json").read_text())
    assert [r["augment"] for r in doc["rows"]] == [False, True]
    off, on = doc["rows"]
    for row in doc["rows"]:
        med = row["median"]
        best = max(v for k, v in med.items() if k.startswith("dataloader"))
        assert row["ratio_vs_best_dataloader"] == med["gnp"] / best
        assert all(v > 0 for v in med.values())
    # the floor runs once, without augmentation, and is compared with the same DataLoaders
    assert "floor" in off["median"] and "floor" not in on["median"]
    # (--workers 0: the only DataLoader contender is the 0-worker one)
    assert off["floor_vs_best_dataloader"] == off["median"]["floor"] / off["median"]["dataloader-0"]
    md = (tmp_path / "train_throughput_cpu.md").read_text()
    assert "compute floor" in md and "load average" in md
    assert md.count("\n| o") == 2  # one row per augmentation setting
    assert "torch.compile" not in md and off["compiled_vs_eager"] == {}


def test_compile_modes_of_the_bench():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench.compile_modes("auto", cpu) == ["default"]
    assert bench.compile_modes("auto", cuda) == ["default", "reduce-overhead"]
    assert bench.compile_modes("none", cuda) == []
    assert bench.compile_modes("default, max-autotune", cpu) == ["default", "max-autotune"]
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
        bench.compile_modes("fast", cpu)
    with pytest.raises(SystemExit):  # the CLI says so before loading anything
        bench.main(["--compile", "fast"])


def test_bench_times_the_other_memory_layout_of_a_convolutional_model(tmp_path):
    """For a model with convolutions the bench times the layout "auto" does not pick beside
    the trainer's, and writes another model's table under its own name."""
    assert bench.other_layout("lenet-300-100", (1, 28, 28), torch.device("cpu")) is None
    assert bench.other_layout("lenet-5", (1, 28, 28), torch.device("cpu")) == "contiguous"
    assert bench.other_layout("lenet-5", (1, 28, 28), torch.device("cuda")) == "channels_last"
    assert bench.main(["--device", "cpu", "--model", "lenet-5", "--samples", "256", "--rounds", "1",
                       "--workers", "0", "--compile", "none", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "train_throughput_cpu.json").exists()
    doc = json.loads((tmp_path / "train_throughput_lenet-5_cpu.json").read_text())
    for row in doc["rows"]:
        o = row["other_layout"]
        assert o["layout"] == "contiguous"
        assert o["vs_auto"] == row["median"]["layout-contiguous"] / row["median"]["gnp"]
    md = (tmp_path / "train_throughput_lenet-5_cpu.md").read_text()
    assert "| off | contiguous |" in md and "| on | contiguous |" in md
