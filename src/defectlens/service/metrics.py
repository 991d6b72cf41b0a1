"""Prometheus metrics of a running service, for the plant's monitoring (``GET /metrics``).

Each service holds its own registry rather than prometheus-client's global one, so two services
in one process (the tests start several) never count into each other.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from defectlens.calibration.drift import STATES

# Latency buckets around what one inspection takes on a CPU: tens of milliseconds to seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.inspections = Counter("defectlens_inspections", "Inspections answered, by model and verdict", ["model", "verdict"], registry=r)
        self.latency = Histogram("defectlens_inspection_seconds", "Time to inspect one image (decode to verdict)", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.feedback = Counter("defectlens_feedback", "Operator feedback given, by model and label", ["model", "label"], registry=r)
        self.versions = Counter("defectlens_model_switches", "Model versions switched to, by model and action (learn, rollback)",
                                ["model", "action"], registry=r)
        self.drift_statistic = Gauge("defectlens_drift_statistic", "KS statistic D of recent scores against the calibration's good scores",
                                     ["model"], registry=r)
        self.drift_state = Gauge("defectlens_drift_state", f"Drift state: {', '.join(f'{i} {s}' for i, s in enumerate(STATES))}",
                                 ["model"], registry=r)
        self.batch_size = Histogram("defectlens_batch_size", "Images in the forward pass each single-image request went through",
                                    ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.refused = Counter("defectlens_refused", "Requests refused with 503 because the model's queue was full or they timed out",
                               ["model"], registry=r)
        queue = Gauge("defectlens_queue_in_flight", "Inspections being worked on or waiting for their model", registry=r)
        queue.set_function(lambda: float(in_flight()))

    def inspected(self, model: str, verdict: str, seconds: float) -> None:
        self.inspections.labels(model, verdict).inc()
        self.latency.labels(model).observe(seconds)

    def batched(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def drift(self, model: str, state: str, statistic: float | None) -> None:
        self.drift_state.labels(model).set(STATES.index(state))
        if statistic is not None:
            self.drift_statistic.labels(model).set(statistic)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServiceMetrics"]
