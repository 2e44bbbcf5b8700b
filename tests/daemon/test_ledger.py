"""daemon.ledger.UpdateLedger: failure counts, quarantine and corrupt chunks in updates.json."""

import logging

import pytest

from daemon.ledger import UpdateLedger


def test_the_ledger_survives_a_restart(tmp_path):
    path = tmp_path / "updates.json"
    ledger = UpdateLedger(path, 2)
    assert ledger.record_failure(["3", "4"]) == ()
    assert ledger.record_failure(["3"]) == ("3",)
    assert ledger.mark_corrupt({"5": "crc mismatch"}) == ("5",)
    again = UpdateLedger(path, 2)
    assert again.quarantined == frozenset({"3"}) and again.excluded() == frozenset({"3", "5"})
    assert again.record_failure(["4"]) == ("4",)  # its first failure was kept


@pytest.mark.parametrize("text", ['{"failures": {}, "quarantined": 7, "corrupt": {}}', "[]",
                                  '{"failures": {"7": null}}', '{"corrupt": [["5", "x", "y"]]}'])
def test_a_ledger_of_another_shape_is_logged_and_started_afresh_not_fatal(tmp_path, text, caplog):
    # A hand edit (operations.md says to remove an id from "quarantined") that leaves valid
    # JSON of another shape raised out of the worker's constructor: the daemon did not start.
    path = tmp_path / "updates.json"
    path.write_text(text)
    with caplog.at_level(logging.ERROR, logger="daemon.ledger"):
        ledger = UpdateLedger(path, 2)
    assert ledger.excluded() == frozenset() and "expected" in caplog.text
    ledger.record_failure(["1"])
    assert UpdateLedger(path, 2).record_failure(["1"]) == ("1",)  # written back whole


def test_an_emptied_list_by_hand_is_read_as_empty(tmp_path):
    path = tmp_path / "updates.json"
    path.write_text('{"failures": null, "quarantined": null, "corrupt": {"5": "bad"}}')
    ledger = UpdateLedger(path, 2)
    assert ledger.quarantined == frozenset() and ledger.excluded() == frozenset({"5"})
