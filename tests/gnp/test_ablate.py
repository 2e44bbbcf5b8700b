"""python -m gnp.ablate compression: the protocol's dense model, the rule's verdict on it and
a gradual-pruning curve, each with its test error beside the dense model's."""

import json

import pytest

from gnp import ablate


def test_compression_measures_the_rule_and_a_curve_against_the_dense_model(tmp_path):
    assert ablate.main(["compression", "--dataset", "digits", "--seeds", "0",
                        "--targets", "4,2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "compression.json").read_text())["rows"]
    dense, served, export, *curves = rows
    curve = [r for r in curves if not r["model"].endswith("annealed")]
    annealed = [r for r in curves if r["model"].endswith("annealed")]
    assert dense["model"].startswith("dense") and dense["compression"] == 1.0
    assert dense["test_err_change_pp"] == 0.0 and dense["test_err_z"] == 0.0 and dense["val_check"]
    # the rule prunes the dense model and its export prunes on past it
    assert 1.0 < served["compression"] < export["compression"]
    assert served["stopped_by"] in {"accuracy", "no_progress", "max_iterations"}
    # the curve goes down to each target in turn, pruning on from where it was
    assert [r["target"] for r in curve] == [2.0, 4.0]
    assert all(r["compression"] >= r["target"] for r in curve)
    assert curve[0]["steps"] < curve[1]["steps"] and curve[0]["epochs"] < curve[1]["epochs"]
    # beside each point, the same model with its 2 recovery epochs annealed
    assert [(r["target"], r["active"]) for r in annealed] == [(r["target"], r["active"]) for r in curve]
    for r in rows:  # the change is the error's, from the dense model's
        assert r["test_err_change_pp"] == pytest.approx(r["test_err_pct"] - dense["test_err_pct"],
                                                        abs=1e-4)
    md = (tmp_path / "compression.md").read_text()
    assert "Means over seeds 0" in md and "| curve: 4x, annealed | 4" in md
    assert "| 0 | curve: 4x |" in md and (tmp_path / "compression.png").stat().st_size > 0
