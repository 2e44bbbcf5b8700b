"""Prometheus metrics of the daemon; names follow namespace_subsystem_name_unit.

The table of names, types and meanings lives in docs/INTERFACES.md and the README;
deploy/ (dashboard, alerts) depends on these names, so change them in one place.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["JSON_REJECT_REASONS", "Metrics", "REJECT_REASONS", "UPDATE_OUTCOMES"]

JSON_REJECT_REASONS = (  # what a JSON sample message can be rejected for
    "invalid_json", "not_object", "missing_field", "bad_shape",
    "non_finite", "bad_label", "too_large", "bad_type", "unstorable",
)
# An Arrow batch message that is not an Arrow IPC stream is invalid_arrow; its rows
# are rejected for the JSON reasons (missing_field, bad_shape, non_finite, ...).
REJECT_REASONS = (*JSON_REJECT_REASONS, "invalid_arrow")
UPDATE_OUTCOMES = ("success", "failed", "abandoned", "infra_error")

_UPDATE_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))
_PREDICT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"),
)


class Metrics:
    """All daemon metrics, registered on one registry (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.model_accuracy = Gauge(
            "gnp_model_accuracy", "Validation accuracy (0..1) of the served model", registry=r)
        self.model_wer = Gauge(
            "gnp_model_wer_ratio", "Validation word error rate of the served speech model "
            "(1 - its validation accuracy; NaN while a classifier or no model is served)",
            registry=r)
        self.model_wer.set(float("nan"))  # no model yet: 0 would read as a perfect one
        self.model_parameters = Gauge(
            "gnp_model_parameters", "Active (unpruned) parameters of the served model", registry=r)
        self.model_dense_parameters = Gauge(
            "gnp_model_dense_parameters",
            "Parameters of the served architecture if fully dense", registry=r)
        self.model_served_parameters = Gauge(
            "gnp_model_served_parameters", "Parameters the serving module holds (the compact "
            "model's physical size with GNPD_SERVE__MODEL=compact)", registry=r)
        self.model_served_latency = Gauge(
            "gnp_model_served_latency_seconds", "Measured batch-1 forward time of the serving "
            "module, at publish", registry=r)
        self.model_version = Gauge(
            "gnp_model_version", "Version of the served model (0 = none yet)", registry=r)
        self.model_swaps = Counter(
            "gnp_model_swaps", "Model swaps into serving", registry=r)
        self.model_last_swap = Gauge(
            "gnp_model_last_swap_timestamp_seconds", "Unix time of the last model swap", registry=r)
        self.model_pinned = Gauge(
            "gnp_model_pinned", "Version pinned into serving (0 = not pinned): updates are "
            "saved but not served", registry=r)
        self.model_rollbacks = Counter(
            "gnp_model_rollbacks", "Rollbacks of the served model (POST /v1/model/rollback)",
            registry=r)
        self.update_epochs = Gauge(
            "gnp_update_epochs",
            "Cost of the last successful update in all-data-epoch equivalents", registry=r)
        self.update_sample_passes = Counter(
            "gnp_update_sample_passes", "Training sample passes spent by updates", registry=r)
        self.update_duration = Histogram(
            "gnp_update_duration_seconds", "Wall time of updates, all outcomes",
            buckets=_UPDATE_BUCKETS, registry=r)
        self.updates = Counter(
            "gnp_updates", "Updates by outcome (infra_error: out of memory, full disk, "
            "training child killed or past its time limit; never charged to chunks)",
            ["outcome"], registry=r)
        self.update_quarantined = Gauge(
            "gnp_update_quarantined_chunks",
            "Chunks left out of updates after repeated failures (persists across restarts)",
            registry=r)
        self.update_pending = Gauge(
            "gnp_update_pending_chunks",
            "Sealed chunks not yet learnt (nor quarantined or corrupt): the next update's new data",
            registry=r)
        self.update_last_success = Gauge(
            "gnp_update_last_success_timestamp_seconds",
            "Unix time of the last successful update", registry=r)
        self.ingest_samples = Counter(
            "gnp_ingest_samples", "Valid samples ingested", registry=r)
        self.ingest_rejected = Counter(
            "gnp_ingest_rejected", "Invalid messages sent to the dead-letter topic, by reason",
            ["reason"], registry=r)
        self.ingest_lag = Gauge(
            "gnp_ingest_lag_messages", "End offset minus next offset to read, by partition",
            ["partition"], registry=r)
        self.ingest_reread = Counter(
            "gnp_ingest_reread",
            "Records read again after a recovery (not counted again as samples or rejects)",
            registry=r)
        self.ingest_skipped = Counter(
            "gnp_ingest_skipped_offsets",
            "Offsets never read because retention deleted them first, by partition",
            ["partition"], registry=r)
        self.ingest_connected = Gauge(
            "gnp_ingest_connected",
            "1 while the ingestor's last round trip to the broker worked, else 0", registry=r)
        self.ingest_last_poll = Gauge(
            "gnp_ingest_last_poll_timestamp_seconds",
            "Unix time the ingestor last reached the broker (records fetched or end offsets "
            "read); its start time until then", registry=r)
        self.ingest_lag_timestamp = Gauge(
            "gnp_ingest_lag_timestamp_seconds",
            "Unix time the end offsets behind gnp_ingest_lag_messages were read", registry=r)
        self.store_buffered = Gauge(
            "gnp_store_buffered_samples",
            "Samples not yet trained on (open buffer plus sealed, untrained chunks)", registry=r)
        self.store_chunks = Gauge(
            "gnp_store_chunks", "Sealed chunks on disk", registry=r)
        self.store_corrupt = Gauge(
            "gnp_store_corrupt_chunks",
            "Chunks whose file failed its checksum or could not be read; left out of updates",
            registry=r)
        self.predict_requests = Counter(
            "gnp_predict_requests", "Predict requests by status", ["status"], registry=r)
        self.predict_duration = Histogram(
            "gnp_predict_duration_seconds", "Predict request latency",
            buckets=_PREDICT_BUCKETS, registry=r)
        self.predict_batch_rows = Histogram(
            "gnp_predict_batch_rows", "Instances per forward pass of the dynamic batcher",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096), registry=r)
        # Pre-create labelled children so every series exists from the first scrape.
        for reason in REJECT_REASONS:
            self.ingest_rejected.labels(reason=reason)
        for outcome in UPDATE_OUTCOMES:
            self.updates.labels(outcome=outcome)
        for status in ("ok", "error", "overloaded"):
            self.predict_requests.labels(status=status)
