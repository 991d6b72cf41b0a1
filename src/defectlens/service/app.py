"""The FastAPI application: REST API, dashboard pages and error mapping.

``InspectionService`` holds the state (store, models, limits) and does the work; ``create_app``
only maps HTTP onto it, so the same service could sit behind another transport. Everything that
can fail because of the input is answered with a 4xx and a JSON body ``{"error", "status"}``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from defectlens._version import __version__
from defectlens.calibration.drift import DriftSettings
from defectlens.calibration.record import SPREAD_CONFIDENCE
from defectlens.calibration.strategies import frr_upper_by_rejects
from defectlens.data.images import MAX_PIXELS, decode_bytes, to_rgb_float
from defectlens.errors import DefectLensError, ImageError, ImageFormatError, ImageTooLargeError
from defectlens.history.journal import JournaledStore
from defectlens.history.store import UNAVAILABLE, HistoryQuery, HistoryStore, StoreError, as_utc, inspection_row, masked_url
from defectlens.inference.inspection import Inspection
from defectlens.inference.overlay import render_heat
from defectlens.service.batching import BatchSettings, Busy
from defectlens.service.line import LineLoop
from defectlens.service.metrics import ServiceMetrics
from defectlens.service.models import LoadedModel, ModelConflict, ModelNotFound, ModelRegistry
from defectlens.service.security import ApiKeys, BodyLimit, Caller

log = logging.getLogger("defectlens.service")
STATIC = Path(__file__).parent / "static"
FORMATS = ("BMP", "JPEG", "PNG", "TIFF")
EXTENSIONS = {"BMP": ".bmp", "JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif"}
MAX_BATCH = 64


@dataclass
class ServiceSettings:
    db_url: str = "sqlite:///defectlens_history.db"
    model_dir: Path = Path("models")
    models: list[Path] = field(default_factory=list)  # loaded at start, from anywhere the operator names
    api_keys: list[str] = field(default_factory=list)
    protect_inspect: bool = False  # inspecting writes history; a plant may want that guarded too (operator keys)
    protect_read: bool = False  # reading history, models and metrics needs a viewer key too
    max_upload_bytes: int = 16 * 2**20
    max_pixels: int = MAX_PIXELS
    image_dir: Path | None = None  # keep a copy of every inspected image here (content-addressed); feedback learns from it
    drift: DriftSettings = field(default_factory=DriftSettings)
    journal_dir: Path | None = None  # where rows wait while the database is away (default: beside the models)
    learn: bool = True  # a part an operator confirms good teaches the model a new version at once
    runtime: str = "auto"  # what scores the models: inference.load_model's runtime
    batching: BatchSettings = field(default_factory=BatchSettings)  # how concurrent requests share forward passes

    def journal_folder(self) -> Path:
        return self.journal_dir or self.model_dir / ".history-journal" / hashlib.sha256(self.db_url.encode()).hexdigest()[:12]


class InspectionService:
    """What the endpoints call. Built before the server starts, so a bad model or database URL is
    a one-line error at the command line, not a crashed worker."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.store = HistoryStore(settings.db_url).upgrade()
        self.history = JournaledStore(self.store, settings.journal_folder())
        self.registry = ModelRegistry(settings.model_dir, self.store, settings.runtime, settings.batching)
        self.keys = ApiKeys(settings.api_keys)
        for path in settings.models:
            self.registry.load_file(Path(path))
        self.started = time.time()
        self._busy = threading.Lock()
        self.in_flight = 0
        self.served = 0
        self.metrics = ServiceMetrics(lambda: self.in_flight)
        self.line = LineLoop(self.store, self.registry, self.metrics, settings.drift, self.saved_image, settings.learn)

    def audit(self, caller: Caller, action: str, model: str | None, details: dict[str, Any]) -> None:
        self.store.audit(caller.actor, caller.role, action, model, details)

    @contextmanager
    def _counted(self) -> Iterator[None]:
        with self._busy:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._busy:
                self.in_flight -= 1
                self.served += 1

    # -- inspection -------------------------------------------------------------------------
    def admit(self, name: str) -> Callable[[], None]:
        """A place in ``name``'s queue, taken before a worker thread is: see ``Batcher.admit``."""
        model = self.registry.get(name)
        try:
            return model.batcher.admit()
        except Busy:
            self.metrics.refused.labels(model.name).inc()
            raise

    def thread_tokens(self) -> int:
        """Worker threads the server needs: every admitted request can hold one while it waits for
        its pass, and reads (/health, /metrics, history) must still find one free."""
        return max(40, self.settings.batching.max_queue + self.settings.batching.max_batch + 16)

    def inspect(self, name: str, data: bytes, source: str, request_id: str | None, overlay: bool) -> dict[str, Any]:
        model = self.registry.get(name)
        if request_id and (earlier := self._replay(request_id, name)) is not None:
            return earlier
        image = decode_bytes(data, source, self.settings.max_pixels, FORMATS)
        with self._counted():
            t0 = time.perf_counter()
            try:
                inspection, checksum, waited, batch = model.inspect(image)
            except Busy:
                self.metrics.refused.labels(model.name).inc()
                raise
        inspection.source = source
        inspection.timings_ms["queue"] = waited
        self.metrics.batched(model.name, batch)
        row, created = self.history.record(self._row(model.name, checksum, inspection, data, image.format, request_id))
        if not created:  # the same key raced in twice: both get the one stored row
            return {**row, "replayed": True}
        self._observed(model, inspection, time.perf_counter() - t0)
        return self._answer(row, inspection, image if overlay else None, model)

    def _observed(self, model: LoadedModel, inspection: Inspection, seconds: float) -> None:
        self.metrics.inspected(model.name, inspection.verdict, seconds)
        self.line.observe(model, inspection.score)

    def inspect_batch(self, name: str, uploads: list[tuple[str, bytes]], request_id: str | None) -> dict[str, Any]:
        """One batched forward pass for the whole upload; a bad file is reported in place."""
        model = self.registry.get(name)
        if not uploads:
            raise DefectLensError("no files in the batch: send them as multipart fields named 'files'")
        if len(uploads) > MAX_BATCH:
            raise DefectLensError(f"{len(uploads)} files in one batch; at most {MAX_BATCH}")
        base = request_id or uuid.uuid4().hex
        results: list[dict[str, Any] | None] = [None] * len(uploads)
        errors: list[dict[str, Any]] = []
        todo: list[tuple[int, Image.Image]] = []
        for i, (source, data) in enumerate(uploads):
            if request_id and (earlier := self._replay(f"{base}-{i}", name)) is not None:
                results[i] = earlier
                continue
            try:
                todo.append((i, decode_bytes(data, source, self.settings.max_pixels, FORMATS)))
            except ImageError as exc:
                errors.append({"index": i, "source": source, "error": str(exc)})
        if todo:
            t0 = time.perf_counter()
            with self._counted(), model.lock:
                found = list(model.inspector.inspect_many([img for _, img in todo]))
                checksum = model.checksum
                model.inspections += len(todo)
            per_image = (time.perf_counter() - t0) / len(todo)
            for (i, image), inspection in zip(todo, found, strict=True):
                source, data = uploads[i]
                if isinstance(inspection, ImageError):
                    errors.append({"index": i, "source": source, "error": f"{source}: {inspection}"})
                    continue
                inspection.source = source
                row, created = self.history.record(self._row(model.name, checksum, inspection, data, image.format, f"{base}-{i}"))
                if created:
                    self._observed(model, inspection, per_image)
                results[i] = self._answer(row, inspection, None, model)
        return {"results": [r for r in results if r is not None], "errors": sorted(errors, key=lambda e: e["index"])}

    def _replay(self, request_id: str, name: str) -> dict[str, Any] | None:
        earlier = self.history.by_request_id(request_id)
        if earlier is None:
            return None
        if earlier["model"] != name:
            raise ModelConflict(f"request id '{request_id}' was already used for model '{earlier['model']}'")
        return {**earlier, "replayed": True}

    def _row(self, model: str, checksum: str, inspection: Inspection, data: bytes, fmt: str | None, request_id: str | None) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        return inspection_row(inspection, model, checksum, digest, request_id or uuid.uuid4().hex, self._keep(digest, data, fmt))

    def _keep(self, digest: str, data: bytes, fmt: str | None) -> str | None:
        """Content-addressed copy: the same image twice is stored once, and names never collide."""
        folder = self.settings.image_dir
        if folder is None:
            return None
        rel = f"{digest[:2]}/{digest}{EXTENSIONS.get(fmt or '', '.img')}"
        path = folder / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return rel

    def _answer(self, row: dict[str, Any], inspection: Inspection, image: Image.Image | None, model: LoadedModel) -> dict[str, Any]:
        answer = {**row, "confidence": inspection.confidence, "replayed": False}
        if image is not None:
            cal = model.inspector.calibration
            heat = render_heat(to_rgb_float(image), inspection, None if cal is None else cal.pixel_threshold)
            buffer = io.BytesIO()
            heat.save(buffer, format="PNG")
            answer["overlay"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        return answer

    def saved_image(self, inspection_id: int) -> Path:
        row = self.store.get(inspection_id)
        folder = self.settings.image_dir
        if row is None:
            raise ModelNotFound(f"inspection {inspection_id}: not in the history")
        if folder is None or not row["image_path"]:
            raise ModelNotFound(f"inspection {inspection_id}: no copy of its image was kept")
        path = (folder / row["image_path"]).resolve()
        if not path.is_relative_to(folder.resolve()) or not path.is_file():
            raise ModelNotFound(f"inspection {inspection_id}: its image copy is gone")
        return path

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "models": [{**m.describe(), "drift": self.line.drift_state(m)} for m in self.registry.loaded()],
            "queue": {"in_flight": self.in_flight},
            "served": self.served,
            "database": {"url": masked_url(self.store.url), "revision": self._revision()},
            "history": self.history.state(),
            "limits": {"max_upload_bytes": self.settings.max_upload_bytes, "max_pixels": self.settings.max_pixels, "formats": list(FORMATS)},
            "auth": {"keys_configured": self.keys.configured, "inspect_requires_key": self.settings.protect_inspect,
                     "read_requires_key": self.settings.protect_read, "keys_per_role": self.keys.roles()},
        }

    def _revision(self) -> str | None:
        try:
            return self.store.revision()
        except UNAVAILABLE:
            return None

    def close(self) -> None:
        self.history.close()
        self.store.close()

    def model_details(self, name: str) -> dict[str, Any]:
        model = self.registry.get(name)
        cal = model.bundle.calibration
        return {
            **model.describe(),
            "good_scores": [] if cal is None else cal.good_scores,
            "defect_scores": [] if cal is None else cal.defect_scores,
            "synthetic_scores": [] if cal is None else cal.synthetic_scores,  # an estimate of recall, not real defects
            "guarantee": None if cal is None else cal.guarantee,
            # [i]: the FRR one calibration set keeps with SPREAD_CONFIDENCE when i good scores lie above the threshold
            "frr_upper": [] if cal is None or not cal.good_scores else frr_upper_by_rejects(len(cal.good_scores), SPREAD_CONFIDENCE),
            "frr_upper_confidence": SPREAD_CONFIDENCE,
            "threshold_changes": self.store.threshold_history(name, model.checksum),
            "selection": model.bundle.metadata.get("selection"),  # how fit --detector auto chose, when it did
            "versions": self.registry.versions(name),
        }


class ThresholdIn(BaseModel):
    threshold: float = Field(allow_inf_nan=False, description="new image-score threshold")
    reason: str = Field("", max_length=500, description="why, for the record")


class ReasonIn(BaseModel):
    reason: str = Field("", max_length=500)


class FeedbackIn(BaseModel):
    label: Literal["good", "defect"] = Field(description="what the part really was")
    note: str = Field("", max_length=500, description="what the operator saw, for the record")
    defect_type: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _-]*$",
                                    description="for a defect: its kind (scratch, dent, ...), which teaches typing at the next calibrate")


def create_app(service: InspectionService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = service.thread_tokens()
        yield

    app = FastAPI(title="DefectLens inspection service", version=__version__, lifespan=lifespan,
                  description="Inspect images against fitted DefectLens models; every inspection is kept in the history.")
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_upload_bytes)
    app.state.service = service
    _error_handlers(app)

    def admin(request: Request) -> Caller:
        return service.keys.check(request, "admin")

    def operator(request: Request) -> Caller:
        return service.keys.check(request, "operator")

    def inspect_key(request: Request) -> Caller | None:
        return service.keys.check(request, "operator") if service.settings.protect_inspect else None

    def reader(request: Request) -> Caller | None:
        return service.keys.check(request, "viewer") if service.settings.protect_read else None

    # -- liveness and status ----------------------------------------------------------------
    @app.get("/health", tags=["status"])
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["status"])
    def ready() -> JSONResponse:
        """Ready while it can inspect: with the database away, rows wait in the journal and the
        history is reported degraded, but the line goes on."""
        problems, degraded = [], []
        if not service.registry.loaded():
            problems.append("no model loaded")
        if service.history.degraded or not service.store.ping():
            degraded.append(f"history database unreachable: {service.history.waiting} rows wait in the local journal")
        return JSONResponse({"ready": not problems, "problems": problems, "degraded": degraded}, status_code=503 if problems else 200)

    @app.get("/api/status", tags=["status"])
    def status(_: Caller | None = Depends(reader)) -> dict:
        return service.status()

    # -- models -----------------------------------------------------------------------------
    @app.get("/api/models", tags=["models"])
    def models(_: Caller | None = Depends(reader)) -> dict:
        return {"loaded": [m.describe() for m in service.registry.loaded()], "available": service.registry.available()}

    @app.get("/api/models/{name}", tags=["models"])
    def model(name: str, _: Caller | None = Depends(reader)) -> dict:
        return service.model_details(name)

    @app.post("/api/models/{name}/load", tags=["models"])
    def load(name: str, caller: Caller = Depends(admin)) -> dict:
        model = service.registry.load(name)
        service.audit(caller, "model.load", name, {"file": model.path.name, "checksum": model.checksum})
        return model.describe()

    @app.delete("/api/models/{name}", tags=["models"])
    def unload(name: str, caller: Caller = Depends(admin)) -> dict:
        service.registry.get(name)  # an unknown name is refused before anything is written
        service.audit(caller, "model.unload", name, {})  # first: with the database away the model stays loaded
        service.registry.unload(name)
        return {"unloaded": name}

    @app.get("/api/models/{name}/versions", tags=["models"])
    def versions(name: str, _: Caller | None = Depends(reader)) -> dict:
        model = service.registry.get(name)
        return {"model": name, "running": model.describe(), "switches": service.registry.versions(name)}

    @app.post("/api/models/{name}/rollback", tags=["models"])
    def rollback(name: str, caller: Caller = Depends(admin)) -> dict:
        """Back to the version the running one was learned from."""
        return service.line.rollback(name, caller)

    @app.get("/api/models/{name}/drift", tags=["models"])
    def drift(name: str, _: Caller | None = Depends(reader)) -> dict:
        """Recent scores against the calibration's good scores: ok, warning or drift, with the figures."""
        return service.line.drift(name)

    @app.get("/api/models/{name}/threshold", tags=["threshold"])
    def threshold(name: str, _: Caller | None = Depends(reader)) -> dict:
        m = service.registry.get(name)
        return {"model": name, "threshold": m.threshold, "calibrated_threshold": m.calibrated_threshold,
                "changes": service.store.threshold_history(name, m.checksum)}

    @app.put("/api/models/{name}/threshold", tags=["threshold"])
    def set_threshold(name: str, body: ThresholdIn, caller: Caller = Depends(admin)) -> dict:
        return service.registry.set_threshold(name, body.threshold, body.reason, caller.actor, caller.role)

    @app.post("/api/models/{name}/threshold/undo", tags=["threshold"])
    def undo_threshold(name: str, caller: Caller = Depends(admin)) -> dict:
        return service.registry.undo_threshold(name, caller.actor, caller.role)

    @app.delete("/api/models/{name}/threshold", tags=["threshold"])
    def reset_threshold(name: str, body: ReasonIn | None = None, caller: Caller = Depends(admin)) -> dict:
        return service.registry.reset_threshold(name, body.reason if body else "", caller.actor, caller.role)

    # -- inspection -------------------------------------------------------------------------
    @app.post("/api/models/{name}/inspect", tags=["inspect"], openapi_extra=_UPLOAD_DOC)
    async def inspect(request: Request, name: str, overlay: bool = False, source: str | None = None,
                      _: str | None = Depends(inspect_key)) -> dict:
        """One image, as a multipart field ``file`` or as the raw request body."""
        filename, data = await _one_upload(request)
        release = service.admit(name)
        try:
            return await run_in_threadpool(service.inspect, name, data, source or filename, _request_id(request), overlay)
        finally:
            release()

    @app.post("/api/models/{name}/inspect-batch", tags=["inspect"])
    async def inspect_batch(request: Request, name: str, _: str | None = Depends(inspect_key)) -> dict:
        """Several images as multipart fields named ``files``; one result or error per file."""
        form = await request.form(max_files=MAX_BATCH + 1)
        uploads = [(f.filename or f"file{i}", await f.read()) for i, f in enumerate(form.getlist("files")) if isinstance(f, UploadFile)]
        return await run_in_threadpool(service.inspect_batch, name, uploads, _request_id(request))

    # -- history ----------------------------------------------------------------------------
    @app.get("/api/history", tags=["history"])
    def history(model: str | None = None, verdict: Literal["good", "defect", "uncalibrated"] | None = None,
                since: datetime | None = None, until: datetime | None = None, request_prefix: str | None = None,
                limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0), _: Caller | None = Depends(reader)) -> dict:
        q = HistoryQuery(model, verdict, _utc(since), _utc(until), request_prefix)
        total, items = service.store.query(q, limit, offset)
        return {"total": total, "limit": limit, "offset": offset, "items": items}

    @app.get("/api/history/{inspection_id}", tags=["history"])
    def history_item(inspection_id: int, _: Caller | None = Depends(reader)) -> dict:
        row = service.store.get(inspection_id)
        if row is None:
            raise ModelNotFound(f"inspection {inspection_id}: not in the history")
        return row

    @app.post("/api/history/{inspection_id}/feedback", tags=["history"])
    def give_feedback(inspection_id: int, body: FeedbackIn, caller: Caller = Depends(operator)) -> dict:
        """An operator's word on one verdict, kept beside it (never over it). A part confirmed good
        teaches the model a new version when it can learn; otherwise the answer says why not."""
        return service.line.feedback(inspection_id, body.label, body.note, caller, body.defect_type)

    @app.get("/api/history/{inspection_id}/feedback", tags=["history"])
    def feedback_of(inspection_id: int, _: Caller | None = Depends(reader)) -> dict:
        return {"inspection_id": inspection_id, "items": service.store.feedback(inspection_id=inspection_id)}

    @app.get("/api/feedback", tags=["history"])
    def feedback_list(model: str | None = None, label: Literal["good", "defect"] | None = None,
                      status: Literal["learned", "queued", "recorded"] | None = None, limit: int = Query(100, ge=1, le=500),
                      _: Caller | None = Depends(reader)) -> dict:
        return {"items": service.store.feedback(model=model, label=label, status=status, limit=limit)}

    @app.get("/api/audit", tags=["history"])
    def audit(limit: int = Query(100, ge=1, le=500), offset: int = Query(0, ge=0), _: Caller | None = Depends(reader)) -> dict:
        total, items = service.store.audit_entries(limit, offset)
        return {"total": total, "items": items}

    @app.get("/metrics", tags=["status"])
    def metrics(_: Caller | None = Depends(reader)) -> Response:
        """Prometheus text format: inspections and defects per model, latency, drift, queue depth."""
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/api/history/{inspection_id}/image", tags=["history"])
    def history_image(inspection_id: int, _: Caller | None = Depends(reader)) -> FileResponse:
        return FileResponse(service.saved_image(inspection_id))

    @app.get("/api/stats", tags=["history"])
    def stats(model: str | None = None, since: datetime | None = None, until: datetime | None = None,
              bucket: Literal["hour", "day"] = "hour", _: Caller | None = Depends(reader)) -> dict:
        return service.store.stats(HistoryQuery(model, None, _utc(since), _utc(until)), bucket)

    # -- dashboard --------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/history", include_in_schema=False)
    def history_page() -> FileResponse:
        return FileResponse(STATIC / "history.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


_UPLOAD_DOC = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}


def _request_id(request: Request) -> str | None:
    """The client's idempotency key: a retry with the same key gets the stored answer."""
    return request.headers.get("Idempotency-Key") or request.headers.get("X-Request-Id")


async def _one_upload(request: Request) -> tuple[str, bytes]:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=2)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "multipart upload needs one file field named 'file'")
        return upload.filename or "upload", await upload.read()
    return "upload", await request.body()


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value) if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _error_handlers(app: FastAPI) -> None:
    def answer(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status)

    for exc_type in UNAVAILABLE:  # reads while the database is away
        app.add_exception_handler(exc_type, lambda _r, exc: answer(503, f"history database unavailable ({type(exc).__name__})"))
    statuses: list[tuple[type[Exception], int]] = [
        (ModelNotFound, 404), (ModelConflict, 409), (ImageTooLargeError, 413), (ImageFormatError, 415), (ImageError, 422),
        (StoreError, 503), (DefectLensError, 400),
    ]
    for exc_type, code in statuses:
        app.add_exception_handler(exc_type, lambda _r, exc, code=code: answer(code, str(exc)))

    @app.exception_handler(Busy)
    async def busy(_request: Request, exc: Busy) -> JSONResponse:
        response = answer(503, str(exc))
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))  # whole seconds, as HTTP asks
        return response

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return answer(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'request'}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return answer(422, "; ".join(parts))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return answer(500, f"internal error ({type(exc).__name__}); the server log has the details")
