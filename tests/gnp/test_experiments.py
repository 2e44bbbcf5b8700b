import json

import pytest

from gnp.experiments import main
from gnp.report import claims


def test_experiment_command_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", "lenet-300-100", "--dataset", "digits", "--chunks", "2",
                 "--methods", "ours,tfs", "--out", str(out), "--quick", "--device", "cpu",
                 "--no-progress", "--compact"]) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert [(r["chunk"], r["method"]) for r in rows] == [(1, "ours"), (1, "tfs"), (2, "ours"), (2, "tfs")]
    for r in rows:
        assert 0 <= r["test_error_pct"] <= 100 and r["active_params"] <= r["dense_params"]
        assert r["epochs"] > 0 and r["device"] == "cpu" and r["data_fraction"] == r["chunk"] / 2
    assert rows[2]["compact_params"] is not None and rows[3]["compact_params"] is None
    assert doc["command"].startswith("python -m gnp.experiments --model lenet-300-100")
    md = (out / "results.md").read_text()
    assert "| 50% |" in md and "Claims checked" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_claims_compare_ours_with_tfs_and_nft():
    row = lambda k, m, err, params, ep: {"chunk": k, "method": m, "data_fraction": k / 2,  # noqa: E731
                                         "test_error_pct": err, "active_params": params, "epochs": ep}
    rows = [row(1, "ours", 10, 100, 60), row(1, "tfs", 10, 100, 60), row(1, "nft", 10, 100, 60),
            row(2, "ours", 10.1, 90, 25), row(2, "tfs", 10.0, 100, 60), row(2, "nft", 9, 120, 60)]
    (c,) = claims(rows)
    assert c["saving_vs_tfs"] == pytest.approx(1 - 25 / 60) and c["holds"]
    rows[3] = row(2, "ours", 10.3, 90, 25)  # 0.3 pp worse than TFS: the claim fails
    assert not claims(rows)[0]["holds"]


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        main(["--methods", "ours,magic", "--out", "x", "--dataset", "digits"])
    with pytest.raises(SystemExit):
        main(["--chunks", "0", "--out", "x", "--dataset", "digits"])


def test_report_merges_baselines_only_from_the_same_protocol(tmp_path):
    from gnp.report import main as report_main, merge_baselines

    def run(name, methods, seed="0"):
        out = tmp_path / name
        main(["--dataset", "digits", "--chunks", "2", "--methods", methods, "--out", str(out),
              "--quick", "--device", "cpu", "--no-progress", "--seed", seed])
        return out

    variant, base, other = run("variant", "ours"), run("base", "tfs"), run("other", "tfs", seed="1")
    rows = merge_baselines(variant, base)
    assert [(r["chunk"], r["method"]) for r in rows] == [(1, "ours"), (1, "tfs"), (2, "ours"), (2, "tfs")]
    assert report_main([str(variant), "--baselines", str(base)]) == 0
    assert "Claims checked" in (variant / "results.md").read_text()
    with pytest.raises(ValueError, match="seed"):
        merge_baselines(variant, other)
