import json
import shutil

import pytest
import torch

from gnp.experiments import code_version, main, parse_args, schedule_of
from gnp.report import _code_versions, aggregate, claims, markdown_table


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
    # every row says which code made it (this checkout's commit)
    assert {r["code"] for r in rows} == {code_version()} and code_version() is not None
    assert f"Code: gnp at {code_version()}." in md


def test_the_report_says_when_rows_span_commits():
    rows = [{**_row(k, "ours", 10, 100, 20), "code": c}
            for k, c in ((1, None), (2, None), (3, "abc"), (4, "abc"))]
    assert _code_versions(rows[:2]) == ""  # runs from before rows recorded their code
    assert _code_versions(rows[2:]) == " Code: gnp at abc."
    assert _code_versions(rows) == (" Code (the rows span commits): unrecorded made seed 0 "
                                    "chunks 1-2; abc made seed 0 chunks 3-4.")
    # A merged baseline run: one chunk has rows of two commits, so the methods are named.
    rows += [{**_row(k, "tfs", 10, 100, 60), "code": "def"} for k in (1, 2, 3, 4)]
    assert _code_versions(rows) == (" Code (the rows span commits): unrecorded made seed 0 "
                                    "chunks 1-2 (ours); abc made seed 0 chunks 3-4 (ours); "
                                    "def made seed 0 chunks 1-4 (tfs).")
    # A rerun that adds the last chunk of two methods: each method's own chunks, so the
    # line does not credit the first run with a chunk it never made.
    rows = [{**_row(k, m, 10, 100, 20), "code": None} for k in (1, 2, 3) for m in ("ours", "tfs")
            if (k, m) != (3, "tfs")] + [{**_row(3, "tfs", 10, 100, 60), "code": "abc"}]
    assert _code_versions(rows) == (" Code (the rows span commits): unrecorded made seed 0 "
                                    "chunks 1-3 (ours), chunks 1-2 (tfs); abc made seed 0 "
                                    "chunk 3 (tfs).")


def _row(k, m, err, params, ep, seed=0):
    return {"seed": seed, "chunk": k, "method": m, "data_fraction": k / 2, "test_error_pct": err,
            "active_params": params, "epochs": ep}


def test_claims_compare_ours_with_tfs_and_nft_on_seed_means():
    rows = [_row(1, m, 10, 100, 60) for m in ("ours", "tfs", "nft")]
    rows += [_row(2, "ours", 10.1, 90, 25), _row(2, "tfs", 10.0, 100, 60), _row(2, "nft", 10.0, 120, 60)]
    (c,) = claims(rows)
    assert c["vs"]["tfs"]["epoch_ratio"] == pytest.approx(25 / 60) and c["holds"]
    rows[3] = _row(2, "ours", 10.3, 90, 25)  # 0.3 pp worse than both: the claim fails
    assert not claims(rows)[0]["holds"]
    rows[3] = _row(2, "ours", 10.1, 110, 25)  # more params than TFS
    assert not claims(rows)[0]["holds"] and not claims(rows)[0]["vs"]["tfs"]["params_ok"]
    rows[3] = _row(2, "ours", 10.1, 90, 31)  # more than half NFT's epochs
    assert not claims(rows)[0]["vs"]["nft"]["epochs_ok"]


def test_seeds_are_aggregated_as_mean_and_sd():
    rows = [_row(2, "ours", e, 100, 20, seed=s) for s, e in enumerate((10.0, 12.0, 14.0))]
    rows += [_row(2, "tfs", 12.5, 200, 60, seed=s) for s in range(3)]
    cell = aggregate(rows)[(2, "ours")]
    mean, sd, n = cell["test_error_pct"]
    assert (mean, n) == (12.0, 3) and sd == pytest.approx(2.0)
    assert "12.00 ± 2.00" in markdown_table(rows)
    # The claim uses the seed means: 12.0 <= 12.5 + 0.2 although one seed is 14.0.
    rows += [_row(1, m, 10, 100, 60) for m in ("ours", "tfs")]
    (c,) = claims(rows)
    assert c["vs"]["tfs"]["error_diff_pp"] == pytest.approx(-0.5) and c["holds"]


def test_claims_pair_seeds_when_a_merged_seed_is_still_running():
    """Seed 1 has ours at chunk 2 but not yet TFS: the claim compares seed 0 with seed 0
    (an unpaired mean would put ours 1 pp behind), and the tables say how many seeds."""
    from gnp.report import _claims_table
    rows = [_row(k, m, 10, 100, 60, seed=s) for k in (1,) for m in ("ours", "tfs") for s in (0, 1)]
    rows += [_row(2, "ours", 10.0, 90, 25), _row(2, "ours", 12.0, 90, 25, seed=1),
             _row(2, "tfs", 10.0, 100, 60), _row(3, "ours", 10.0, 90, 25),
             _row(3, "tfs", 10.0, 100, 60)]
    rows += [_row(3, m, 10.0, p, e, seed=1) for m, p, e in (("ours", 90, 25), ("tfs", 100, 60))]
    c2, c3 = claims(rows)
    assert c2["vs"]["tfs"]["error_diff_pp"] == pytest.approx(0.0) and c2["holds"]
    assert (c2["vs"]["tfs"]["seeds"], c3["vs"]["tfs"]["seeds"]) == (1, 2)
    assert "| 100% | +0.00 | 0.90 | 0.42 | 1 | yes |" in _claims_table([c2, c3])
    table = markdown_table(rows)
    assert "| data | seeds |" in table and "| 100% | ours 2, tfs 1 |" in table
    assert "| data | seeds |" not in markdown_table([r for r in rows if r["seed"] == 0])


def test_seeds_option_runs_the_protocol_per_seed(tmp_path):
    out = tmp_path / "seeds"
    assert main(["--dataset", "digits", "--chunks", "2", "--stop-after", "1", "--methods", "tfs",
                 "--out", str(out), "--quick", "--device", "cpu", "--no-progress",
                 "--seeds", "0,1"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["seed"], r["chunk"]) for r in rows] == [(0, 1), (1, 1)]
    assert rows[0]["test_error_pct"] != rows[1]["test_error_pct"] or \
        rows[0]["active_params"] != rows[1]["active_params"]  # different splits and inits
    assert "±" in (out / "results.md").read_text()


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        main(["--methods", "ours,magic", "--out", "x", "--dataset", "digits"])
    with pytest.raises(SystemExit):
        main(["--chunks", "0", "--out", "x", "--dataset", "digits"])
    with pytest.raises(SystemExit):
        main(["--seeds", "0,zero", "--out", "x", "--dataset", "digits"])
    with pytest.raises(SystemExit):
        main(["--alpha", "120", "--out", "x", "--dataset", "digits"])
    with pytest.raises(SystemExit):  # MNIST is never downloaded: a directory is required
        main(["--dataset", "mnist", "--out", "x"])


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
    # A variant run over seeds 0 and 1 takes TFS from two runs, one per seed.
    both = tmp_path / "both"
    main(["--dataset", "digits", "--chunks", "2", "--methods", "ours", "--out", str(both),
          "--quick", "--device", "cpu", "--no-progress", "--seeds", "0,1"])
    assert report_main([str(both), "--baselines", str(base), "--baselines", str(other)]) == 0
    pairs = [(r["seed"], r["chunk"], r["method"]) for r in merge_baselines(both, base)]
    assert pairs == [(0, 1, "ours"), (0, 1, "tfs"), (0, 2, "ours"), (0, 2, "tfs"),
                     (1, 1, "ours"), (1, 2, "ours")]
    md = (both / "results.md").read_text()
    assert "tfs err" in md and "±" in md


def test_report_merges_seeds_run_apart_only_from_the_same_protocol(tmp_path):
    from gnp.report import main as report_main, merge_seeds

    def run(name, seed, methods="tfs"):
        out = tmp_path / name
        main(["--dataset", "digits", "--chunks", "2", "--stop-after", "1", "--methods", methods,
              "--out", str(out), "--quick", "--device", "cpu", "--no-progress", "--seed", seed])
        return out

    first, second, other = run("s0", "0"), run("s1", "1"), run("nft", "1", methods="nft")
    rows = merge_seeds(first, second)
    assert sorted((r["seed"], r["method"]) for r in rows) == [(0, "tfs"), (1, "tfs")]
    assert report_main([str(first), "--seeds-from", str(second)]) == 0
    md = (first / "results.md").read_text()
    assert "±" in md and "separate processes" in md
    with pytest.raises(ValueError, match="methods"):
        merge_seeds(first, other)
    # The same arguments under a default that changed between the runs: the recorded
    # schedules differ, so the seeds do not merge.
    doc = json.loads((second / "results.json").read_text())
    doc["schedule"]["incremental_lr"] = 0.01
    (second / "results.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="schedule incremental_lr"):
        merge_seeds(first, second)
    before = (first / "results.md").read_text()
    assert report_main([str(first), "--seeds-from", str(second)]) == 2  # a message, no traceback
    assert (first / "results.md").read_text() == before  # nothing written


def test_report_fills_rows_from_a_partial_rerun_that_agrees(tmp_path):
    """A method rerun alone (its seed's checkpoint lost) gives the rows of the combined run
    exactly, so the rows the combined run lacks can come from it; a disagreement refuses."""
    from gnp.report import main as report_main, merge_rows

    def run(name, methods, *more, chunks="2"):
        out = tmp_path / name
        assert main(["--dataset", "digits", "--chunks", chunks, "--methods", methods, "--out",
                     str(out), "--quick", "--device", "cpu", "--no-progress", *more]) == 0
        return out

    # The rerun spells out the default the first run took (`--incremental-lr 0`: the
    # training lr): the recorded schedules agree, so it is the same protocol.
    whole, rerun = run("whole", "ours,tfs"), run("tfs", "tfs", "--incremental-lr", "0")
    doc = json.loads((whole / "results.json").read_text())
    expected = [(r["chunk"], r["method"], r["test_error_pct"]) for r in doc["rows"]]
    cut = {**doc, "rows": doc["rows"][:-1]}  # the last tfs row was never made
    (whole / "results.json").write_text(json.dumps(cut))
    rows, shared = merge_rows(whole, rerun)
    assert [(r["chunk"], r["method"], r["test_error_pct"]) for r in rows] == expected
    assert shared == 1  # tfs chunk 1, held by both, equal in every computed field
    assert report_main([str(whole), "--rows-from", str(rerun)]) == 0
    assert "the 1 rows both hold agree exactly" in (whole / "results.md").read_text()
    bad = json.loads((rerun / "results.json").read_text())
    bad["rows"][0]["test_error_pct"] += 0.1
    (rerun / "results.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="disagrees at seed 0 chunk 1 tfs"):
        merge_rows(whole, rerun)
    before = (whole / "results.md").read_text()
    assert report_main([str(whole), "--rows-from", str(rerun)]) == 2  # a message, no traceback
    assert (whole / "results.md").read_text() == before  # nothing written
    with pytest.raises(ValueError, match="chunks"):
        merge_rows(whole, run("three", "tfs", chunks="3"))
    with pytest.raises(ValueError, match="schedule incremental_lr"):
        merge_rows(whole, run("slow", "tfs", "--incremental-lr", "0.01"))


def test_resume_refuses_to_overwrite_finished_chunks_whose_checkpoint_is_lost(tmp_path, capsys):
    common = ["--dataset", "digits", "--chunks", "3", "--methods", "ours,tfs", "--quick",
              "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    assert main([*common, "--stop-after", "2"]) == 0
    (tmp_path / "checkpoints" / "seed0.pt").unlink()  # a fresh checkout: checkpoints are ignored
    before = (tmp_path / "results.json").read_text()
    assert main([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "seed 0 through chunk 2" in err and "--rows-from" in err
    assert (tmp_path / "results.json").read_text() == before  # nothing overwritten
    # Rows of a chunk not every method finished (a stop inside chunk 1) are recomputed.
    doc = json.loads(before)
    (tmp_path / "results.json").write_text(json.dumps({**doc, "rows": doc["rows"][:1]}))
    assert main([*common, "--resume", "--stop-after", "1"]) == 0
    assert "seed 0 starts from the first chunk" in capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["chunk"], r["method"]) for r in rows] == [(1, "ours"), (1, "tfs")]
    assert rows[0]["test_error_pct"] == doc["rows"][0]["test_error_pct"]


def test_a_stopped_run_resumes_where_it_stopped_with_the_same_results(tmp_path, capsys):
    """--resume goes on from the last chunk every method finished (checkpointed carries)
    and gives the rows of a run that never stopped."""
    common = ["--dataset", "digits", "--chunks", "3", "--methods", "ours,nft,cgap", "--quick",
              "--device", "cpu", "--no-progress"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*common, "--out", str(whole)]) == 0
    assert main([*common, "--out", str(parts), "--stop-after", "2"]) == 0
    assert (parts / "checkpoints" / "seed0.pt").exists()
    first = json.loads((parts / "results.json").read_text())["rows"]
    assert {r["chunk"] for r in first} == {1, 2}
    assert main([*common, "--out", str(parts), "--resume"]) == 0
    assert "seed 0 goes on after chunk 2" in capsys.readouterr().out

    def rows(folder):
        doc = json.loads((folder / "results.json").read_text())
        return doc, [{k: v for k, v in r.items() if k != "wall_seconds"} for r in doc["rows"]]

    (_, expected), (doc_parts, resumed) = rows(whole), rows(parts)
    assert [(r["chunk"], r["method"]) for r in resumed] == [
        (k, m) for k in (1, 2, 3) for m in ("ours", "nft", "cgap")]
    assert resumed == expected
    assert "--resume" not in doc_parts["command"]  # the command that gives these rows
    # Going back is refused: the run is already past chunk 1.
    assert main([*common, "--out", str(parts), "--resume", "--stop-after", "1"]) == 2
    assert "already went past chunk 1" in capsys.readouterr().err
    # Other arguments: refused, nothing overwritten.
    assert main([*common, "--out", str(parts), "--resume", "--incremental-lr", "0.05"]) == 2
    assert "other arguments" in capsys.readouterr().err
    assert json.loads((parts / "results.json").read_text())["rows"] == doc_parts["rows"]
    # The same arguments under a default that changed since (the recorded schedule says
    # what the run had): refused, naming the field.
    doc_parts["schedule"]["incremental_lr"] = 0.01
    (parts / "results.json").write_text(json.dumps(doc_parts))
    assert main([*common, "--out", str(parts), "--resume"]) == 2
    assert "incremental_lr: 0.01 there, None now" in capsys.readouterr().err
    doc_parts["schedule"]["incremental_lr"] = None
    doc_parts["schedule"]["train"]["lr"] = 0.1  # nested fields too
    (parts / "results.json").write_text(json.dumps(doc_parts))
    assert main([*common, "--out", str(parts), "--resume"]) == 2
    assert "train.lr: 0.1 there, 0.05 now" in capsys.readouterr().err
    # A field added since the run (absent from its record) keeps the old behaviour by its
    # default: not a reason to refuse.
    doc_parts["schedule"]["train"]["lr"] = 0.05
    del doc_parts["schedule"]["carry_unpruned"], doc_parts["schedule"]["finetune_epochs"]
    (parts / "results.json").write_text(json.dumps(doc_parts))
    assert main([*common, "--out", str(parts), "--resume"]) == 0
    assert "seed 0 goes on after chunk 3" in capsys.readouterr().out
    # A run directory moved (or checked out elsewhere, its checkpoint committed) goes on.
    moved = tmp_path / "elsewhere" / "parts"
    shutil.copytree(parts, moved)
    assert main([*common, "--out", str(moved), "--resume"]) == 0
    assert "seed 0 goes on after chunk 3" in capsys.readouterr().out


def test_finetune_epochs_shortens_only_nft_updates_of_a_trained_model():
    from gnp.policies import METHODS
    s = schedule_of(parse_args(["--finetune-epochs", "22", "--out", "x", "--dataset", "digits"]))
    assert s.finetune_epochs == 22
    assert [p.epochs for p in METHODS["nft"].later(s)] == [22]
    assert [p.epochs for p in METHODS["nft"].first(s)] == [s.baseline_epochs]
    assert [p.epochs for p in METHODS["tfs"].later(s)] == [s.baseline_epochs]
    default = schedule_of(parse_args(["--out", "x", "--dataset", "digits"]))
    assert [p.epochs for p in METHODS["nft"].later(default)] == [default.baseline_epochs]


def test_alpha_sets_the_growth_percentile_and_is_recorded():
    args = parse_args(["--alpha", "80", "--out", "x", "--dataset", "digits"])
    assert schedule_of(args).alpha == 80.0
    assert schedule_of(parse_args(["--out", "x", "--dataset", "digits"])).alpha == 50.0


def test_reduced_runs_test_on_one_fixed_subset_and_cap_pruning_alike(tmp_path):
    from gnp.data import Data, random_subset
    data = Data(torch.arange(100.0).reshape(100, 1), torch.arange(100))
    a, b = random_subset(data, 30, seed=0), random_subset(data, 30, seed=0)
    assert torch.equal(a.y, b.y) and len(set(a.y.tolist())) == 30
    assert not torch.equal(a.y, random_subset(data, 30, seed=1).y)
    with pytest.raises(ValueError, match="1..100"):
        random_subset(data, 101)
    s = schedule_of(parse_args(["--prune-beta", "25", "--prune-steps", "3", "--out", "x",
                                "--dataset", "digits"]))
    assert (s.prune.beta, s.prune.max_iterations) == (25.0, 3)
    assert (s.with_nonrecoverable().nonrecoverable.beta, s.with_nonrecoverable().nonrecoverable.max_iterations) == (25.0, 3)
    out = tmp_path / "reduced"
    assert main(["--dataset", "digits", "--chunks", "2", "--stop-after", "1", "--methods", "tfs,ours",
                 "--out", str(out), "--quick", "--device", "cpu", "--no-progress", "--seeds", "0,1",
                 "--test-size", "40", "--prune-steps", "1"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:  # 40 test samples: every error is a multiple of 2.5%
        assert r["test_error_pct"] / 2.5 == pytest.approx(round(r["test_error_pct"] / 2.5), abs=1e-6)
        assert r["prune_iterations"] <= 1


def test_reduced_run_arguments_are_checked(tmp_path, capsys):
    # Larger than the data set: a message naming the flag before any training, no traceback.
    assert main(["--dataset", "digits", "--test-size", "100000", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert "--test-size 100000: a subset needs 1.." in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
    for bad in (["--prune-beta", "0"], ["--prune-beta", "100"], ["--prune-steps", "-1"],
                ["--test-size", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad + ["--out", "x", "--dataset", "digits"])


def test_report_leaves_out_sections_no_cell_fills(tmp_path):
    """Physical sizes only on a rerun's row (a later engine recorded them): the seed means
    take a cell's fields from its first seed, so no cell has them, and no empty table shows."""
    from gnp.report import write_report

    rows = [_row(k, m, 10, 100, 20, seed=s) | {"device": "cpu"}
            for s in (0, 1) for k in (1, 2) for m in ("ours", "tfs")]
    rows[-1] |= {"physical_params": 90, "macs": 80, "physical_macs": 70, "physical_bytes": 400}
    doc = {"args": {"model": "lenet-300-100", "dataset": "digits"}, "command": "c", "date": "d",
           "machine": {"platform": "p", "torch": "t"}, "rows": rows}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    write_report(tmp_path)
    assert "FLOPs and physical size" not in (tmp_path / "results.md").read_text()
    rows[3] |= {"physical_params": 95, "macs": 85, "physical_macs": 75, "physical_bytes": 410}
    write_report(tmp_path, rows)
    md = (tmp_path / "results.md").read_text()
    assert "FLOPs and physical size" in md and "| 100% | tfs |" in md
