"""Verdicts handed to the plant's systems (MQTT, webhooks) through a local outbox that loses none."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from defectlens.publish.outbox import DeliveryError, Outbox
from defectlens.publish.transports import transport_for


class Publisher:
    """One outbox per destination, under ``folder``: a slow webhook never holds up the broker."""

    def __init__(self, urls: list[str], folder: Path) -> None:
        self.routes = []
        for url in urls:
            transport = transport_for(url)
            slug = re.sub(r"[^A-Za-z0-9]+", "-", url.split("://", 1)[-1]).strip("-")[:40]
            name = f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"
            self.routes.append((transport, Outbox(Path(folder) / name, transport.send, name)))

    def publish(self, model: str, payload: dict[str, Any]) -> None:
        for transport, outbox in self.routes:
            outbox.put(transport.topic(model), payload)

    @property
    def backlog(self) -> int:
        return sum(o.backlog for _, o in self.routes)

    def flush(self, timeout: float = 30.0) -> bool:
        return all(o.flush(timeout) for _, o in self.routes)

    def close(self, timeout: float = 5.0) -> None:
        for transport, outbox in self.routes:
            outbox.close(timeout)
            transport.close()


__all__ = ["DeliveryError", "Outbox", "Publisher"]
