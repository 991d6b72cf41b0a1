"""Where verdicts go: an MQTT broker (QoS 1, a topic per model) or an HTTP receiver (webhook).

Each transport's ``send`` returns only once the receiver acknowledged the message (MQTT PUBACK,
HTTP 2xx) and raises DeliveryError otherwise; the outbox retries and keeps the order.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any
from urllib.parse import urlsplit

from defectlens.errors import DefectLensError
from defectlens.publish.outbox import DeliveryError

ACK_TIMEOUT_S = 10.0


class MqttTransport:
    """``mqtt://[user:password@]host[:port][/topic-prefix]``: each model's verdicts on ``<prefix>/<model>``."""

    def __init__(self, url: str, client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt

        parts = urlsplit(url)
        if not parts.hostname:
            raise DefectLensError(f"{url}: an MQTT URL names a broker, e.g. mqtt://broker:1883/defectlens")
        self.url = url
        self.prefix = parts.path.strip("/") or "defectlens"
        self._connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"defectlens-{uuid.uuid4().hex[:8]}")
        if parts.username:
            self.client.username_pw_set(parts.username, parts.password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_connect = lambda c, u, f, rc, p=None: self._connected.set() if not rc.is_failure else None
        self.client.on_disconnect = lambda c, u, f, rc, p=None: self._connected.clear()
        self.client.connect_async(parts.hostname, parts.port or 1883, keepalive=30)
        self.client.loop_start()

    def topic(self, model: str) -> str:
        return f"{self.prefix}/{model}"

    def send(self, message: dict[str, Any]) -> None:
        if not self._connected.wait(timeout=2.0):
            raise DeliveryError(f"{self.url}: broker not connected")
        info = self.client.publish(message["topic"], json.dumps({"message_id": message["message_id"], **message["payload"]}), qos=1)
        if info.rc != 0:
            raise DeliveryError(f"{self.url}: publish refused (rc {info.rc})")
        try:
            info.wait_for_publish(timeout=ACK_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:  # paho raises when the connection dropped under the message
            raise DeliveryError(f"{self.url}: {exc}") from None
        if not info.is_published():
            raise DeliveryError(f"{self.url}: no acknowledgement within {ACK_TIMEOUT_S:g} s")

    def close(self) -> None:
        self.client.disconnect()  # while the loop runs, so the DISCONNECT packet goes out
        self.client.loop_stop()


class WebhookTransport:
    """``http(s)://...``: one POST per verdict, JSON body; any 2xx answer acknowledges it."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url
        self.client = httpx.Client(timeout=ACK_TIMEOUT_S)

    def topic(self, model: str) -> str:
        return model

    def send(self, message: dict[str, Any]) -> None:
        import httpx

        body = {"message_id": message["message_id"], **message["payload"]}
        try:
            answer = self.client.post(self.url, json=body, headers={"Idempotency-Key": str(body.get("record_id", message["message_id"]))})
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{self.url}: {type(exc).__name__}: {exc}") from None
        if not answer.is_success:
            raise DeliveryError(f"{self.url}: answered HTTP {answer.status_code}")

    def close(self) -> None:
        self.client.close()


def transport_for(url: str) -> MqttTransport | WebhookTransport:
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("mqtt", "tcp"):
        return MqttTransport(url)
    if scheme in ("http", "https"):
        return WebhookTransport(url)
    raise DefectLensError(f"{url}: publish to mqtt://broker[:port][/prefix] or an http(s):// webhook")


__all__ = ["MqttTransport", "WebhookTransport", "transport_for"]
