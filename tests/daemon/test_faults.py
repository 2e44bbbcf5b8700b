"""Fault injection, small: one SIGKILL at each kill point, a broker pause, a corrupt chunk,
a missing manifest and poison messages, against the real daemon and broker (opt-in: slow).

The full run (20+ kills, a 60 s pause) is ``tools/fault_injection.py``; its results are in
docs/results/faults/. This runs the same code with 4 trials and a 5 s pause (~7 minutes
on a loaded 2-core machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tools/ is not installed (as in tests/deploy/conftest.py)
    sys.path.insert(0, str(REPO))

from tools.fault_injection import run_faults, write_markdown  # noqa: E402
from tools.harness import Probe, attribute_kills, stored_ids  # noqa: E402


def test_read_back_sees_an_id_stored_twice_and_an_unreadable_file(tmp_path):
    """The exactly-once check can fail: a chunk file copied under a second name, a torn one."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    chunks = tmp_path / "chunks"
    chunks.mkdir()
    table = pa.table({"id": ["a", "b"], "label": [1, 2]})
    with ipc.new_file(str(chunks / "chunk-000001.arrow"), table.schema) as w:
        w.write_table(table)
    data = (chunks / "chunk-000001.arrow").read_bytes()
    (chunks / "chunk-000002.arrow").write_bytes(data)
    (chunks / "chunk-000003.arrow").write_bytes(data[: len(data) // 2])
    ids, unreadable = stored_ids(tmp_path)
    assert sorted(ids) == ["a", "a", "b", "b"]
    assert [u.split(":")[0] for u in unreadable] == ["chunk-000003.arrow"]


def test_a_request_in_flight_at_a_kill_is_counted_with_the_kill():
    probes = [Probe(1.0, "kill:seal:up", True, 0.01, "200"),
              Probe(2.0, "kill:seal:up", False, 0.3, "ReadError"),
              Probe(2.5, "kill:seal:down", False, 0.01, "ConnectError")]
    attribute_kills(probes, [(2.2, "kill:seal:down")])
    assert [p.phase for p in probes] == ["kill:seal:up", "kill:seal:down", "kill:seal:down"]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_every_good_id_stored_exactly_once_and_served_while_up(tmp_path):
    res = run_faults(trials=4, seed=7, root=tmp_path, pause=5.0, chunk=100, rate=150.0)
    write_markdown(res, "pytest tests/daemon/test_faults.py -m slow", tmp_path / "faults.md")
    final = res["final"]

    # Exactly once, read back from the chunk files; no poison stored.
    assert final["drained"] and final["all_learnt"]
    assert final["stored_rows"] == final["good_produced"] == final["distinct_good_produced"]
    assert final["lost"] == final["duplicated"] == final["unexpected"] == 0
    assert final["poison_stored"] == 0 and not final["unreadable_files"]
    assert final["chunk_files_match_manifest"] and final["sigterm_exit_code"] == 0

    # Every kill point was reached and the daemon came back each time.
    assert [t["kind"] for t in res["trials"]] == ["ingest", "seal", "update", "checkpoint"]
    assert all(t["point_reached"] for t in res["trials"])

    # Serving: no failed predict while the daemon process was up.
    assert res["serving_while_up"]["requests"] > 100
    assert res["serving_while_up"]["failed"] == 0, res["serving"]

    # The other faults were survived as designed.
    assert res["broker_pause"]["daemon_alive_after"] and res["broker_pause"]["polling_after_resume"]
    assert res["corrupt_chunk"]["reported"] and res["corrupt_chunk"]["update_succeeded_after"]
    assert res["missing_manifest"]["daemon_exit_code_without_manifest"] != 0
    assert res["missing_manifest"]["rebuild_exit_code"] == 0
    assert res["poison"]["rejected_delta"] == res["poison"]["poison_sent"]
