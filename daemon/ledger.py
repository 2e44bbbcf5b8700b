"""The update worker's durable record: failed attempts, quarantine and corrupt chunks.

Kept in ``<store>/updates.json`` (replaced atomically), so a restart neither forgets a
poisoned chunk (the crash loop of retrying it forever) nor its count of failures::

    {"failures": {"7": 1}, "quarantined": ["5"], "corrupt": {"3": "checksum mismatch ..."}}

Only failures the training itself is blamed for are counted here; infrastructure
failures (out of memory, a full disk, a killed or timed-out child) never are.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from daemon.manifest import write_atomic

__all__ = ["LEDGER", "UpdateLedger"]

log = logging.getLogger(__name__)

LEDGER = "updates.json"


class UpdateLedger:
    """Failure counts, quarantined and corrupt chunk ids of one store, persisted on change.

    Args:
        path: the ledger file (``<store>/updates.json``); missing = empty.
        max_attempts: failed updates after which a chunk is quarantined.
    """

    def __init__(self, path: Path, max_attempts: int = 2) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.path, self.max_attempts = Path(path), max_attempts
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._quarantined: set[str] = set()
        self._corrupt: dict[str, str] = {}
        self._load()

    @property
    def quarantined(self) -> frozenset[str]:
        return frozenset(self._quarantined)

    @property
    def corrupt(self) -> dict[str, str]:
        """Chunk id -> why its file cannot be used."""
        return dict(self._corrupt)

    def failures(self, chunk_id: str) -> int:
        return self._failures.get(chunk_id, 0)

    def excluded(self) -> frozenset[str]:
        """Chunks left out of every update: quarantined or corrupt."""
        return frozenset(self._quarantined | set(self._corrupt))

    def record_failure(self, chunk_ids: Iterable[str]) -> tuple[str, ...]:
        """Count one failed update against each chunk; returns the newly quarantined ones."""
        newly = []
        with self._lock:
            for i in chunk_ids:
                self._failures[i] = self._failures.get(i, 0) + 1
                if self._failures[i] >= self.max_attempts and i not in self._quarantined:
                    self._quarantined.add(i)
                    newly.append(i)
            self._save()
        return tuple(newly)

    def record_success(self, chunk_ids: Iterable[str]) -> None:
        """Forget the failures of chunks that have now been learnt."""
        with self._lock:
            if any(self._failures.pop(i, None) is not None for i in list(chunk_ids)):
                self._save()

    def mark_corrupt(self, reasons: dict[str, str]) -> tuple[str, ...]:
        """Record chunks whose files are unusable; returns those not known before."""
        with self._lock:
            new = tuple(i for i in reasons if i not in self._corrupt)
            if new:
                self._corrupt.update({i: reasons[i] for i in new})
                self._save()
        return new

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # Losing the counts only grants a poisoned chunk more tries: warn and go on.
            log.error("cannot read %s (%s): starting with no failure counts", self.path, e)
            return
        try:  # a hand edit (operations.md asks for one) may leave valid JSON of another shape
            failures = {str(k): int(v) for k, v in dict(doc.get("failures") or {}).items()}
            quarantined = {str(i) for i in doc.get("quarantined") or ()}
            corrupt = {str(k): str(v) for k, v in dict(doc.get("corrupt") or {}).items()}
        except (AttributeError, TypeError, ValueError) as e:
            log.error("cannot read %s (%s: %s; expected {\"failures\": {id: count}, "
                      "\"quarantined\": [id, ...], \"corrupt\": {id: reason}}): starting with no "
                      "failure counts", self.path, type(e).__name__, e)
            return
        self._failures, self._quarantined, self._corrupt = failures, quarantined, corrupt

    def _save(self) -> None:
        doc = {"failures": dict(sorted(self._failures.items())),
               "quarantined": sorted(self._quarantined, key=lambda i: (len(i), i)),
               "corrupt": dict(sorted(self._corrupt.items()))}
        data = (json.dumps(doc, indent=1) + "\n").encode()
        try:
            write_atomic(self.path, lambda f: f.write(data))
        except OSError as e:  # a full disk must not stop the worker; the state stays in memory
            log.error("cannot write %s: %s", self.path, e)
