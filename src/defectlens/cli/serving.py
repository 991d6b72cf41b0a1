"""`serve` and `loadtest`: the inspection service, and the check that it keeps every answer."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from defectlens.cli.options import add_runtime_option
from defectlens.errors import DefectLensError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the inspection service: REST API, dashboard, history", description=(
        "Serve models over HTTP with a web dashboard at / and the API schema at /docs. Every inspection is kept in the "
        "history database. Clients load further models by name from --model-dir, never by path."))
    p.add_argument("models", nargs="*", help="model files (.dlens or .onnx) to load at start; named by their file stem")
    p.add_argument("--model-dir", default=None, help="folder clients may load models from (default: the first model's folder, else ./models)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--db", default=os.environ.get("DEFECTLENS_DB", "sqlite:///defectlens_history.db"), help=(
        "history database: any SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db (default: $DEFECTLENS_DB or "
        "sqlite:///defectlens_history.db)"))
    p.add_argument("--api-key", action="append", default=[], help=(
        "an API key, as ROLE:SECRET with ROLE viewer (read), operator (inspect, feedback) or admin (thresholds, models, "
        "rollback); a bare SECRET is an admin key. Repeat for several; also $DEFECTLENS_API_KEYS (comma-separated). "
        "Without one, the service is read-and-inspect only"))
    p.add_argument("--protect-inspect", action="store_true", help="require an operator (or admin) key to inspect too")
    p.add_argument("--protect-read", action="store_true", help="require a viewer key (or higher) to read history, models and metrics")
    _add_line_options(p)
    _add_batching_options(p)
    add_runtime_option(p)
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body in MB (default: 16)")
    p.add_argument("--max-megapixels", type=float, default=64.0, help="largest image in megapixels (default: 64)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run_serve)

    p = sub.add_parser("loadtest", help="load a running service and check its history kept every answer", description=(
        "Send REQUESTS inspections from CONCURRENCY threads to a running 'defectlens serve', print requests/s and "
        "p50/p99 latency, then check through the history API that every answered request has exactly one row."))
    p.add_argument("url", help="service address, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="loaded model to inspect with")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders to send (cycled)")
    p.add_argument("--requests", type=int, default=2000, help="number of requests (default: 2000)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel clients (default: 8)")
    p.add_argument("--api-key", default=os.environ.get("DEFECTLENS_API_KEY"), help="key, when the service guards inspection")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(run=run_loadtest)


def _add_batching_options(p: argparse.ArgumentParser) -> None:
    """Dynamic batching: concurrent single-image requests to one model share a forward pass."""
    p.add_argument("--batch-max", type=int, default=8, help="most images in one forward pass (default: 8; 1 turns batching off)")
    p.add_argument("--batch-wait-ms", type=float, default=3.0, help=(
        "how long the first request waits for others to share its pass (default: 3 ms)"))
    p.add_argument("--queue-max", type=int, default=64, help=(
        "requests waiting per model; beyond it the service answers 503 with Retry-After (default: 64)"))
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS", help=(
        "a request waiting longer for its model is answered 503, and nothing is recorded for it (default: 30)"))


def _add_line_options(p: argparse.ArgumentParser) -> None:
    """What a service on a production line adds: learning from operators, the journal, the drift watch."""
    p.add_argument("--keep-images", default=None, metavar="DIR", help=(
        "keep a copy of every inspected image here; a part an operator confirms good then teaches the model"))
    p.add_argument("--no-learn", action="store_true", help=(
        "record feedback only: a part confirmed good does not change the running model (queue it for 'learn' or 'fit')"))
    p.add_argument("--journal", default=None, metavar="DIR", help=(
        "where inspection rows wait while the history database is away (default: .history-journal/ in the model folder)"))
    p.add_argument("--drift-window", type=int, default=100, help="recent inspections the drift watch compares (default: 100)")
    p.add_argument("--drift-alpha", type=float, default=1e-3, help="drift watch significance: smaller is calmer (default: 0.001)")
    p.add_argument("--drift-min-effect", type=float, default=0.3, help=(
        "drift watch: how far recent scores must have moved (KS statistic, 0-1) before 'drift' (default: 0.3)"))
    p.add_argument("--drift-frr-factor", type=float, default=2.0, help=(
        "drift watch: moved scores are 'drift' once parts like them would be falsely rejected this many times as often as "
        "the calibration promised; below it they are a 'warning' (default: 2)"))


def _service_settings(args: argparse.Namespace):
    from defectlens.calibration.drift import DriftSettings
    from defectlens.service.app import ServiceSettings
    from defectlens.service.batching import BatchSettings

    models = [Path(m) for m in args.models]
    model_dir = Path(args.model_dir) if args.model_dir else models[0].parent if models else Path("models")
    keys = args.api_key + [k for k in os.environ.get("DEFECTLENS_API_KEYS", "").split(",") if k.strip()]
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise DefectLensError("--max-upload-mb and --max-megapixels must be positive")
    for flag in ("protect_inspect", "protect_read"):
        if getattr(args, flag) and not keys:
            raise DefectLensError(f"--{flag.replace('_', '-')} needs an API key (--api-key or $DEFECTLENS_API_KEYS)")
    drift = DriftSettings(window=args.drift_window, min_samples=min(30, args.drift_window), alpha=args.drift_alpha, min_effect=args.drift_min_effect,
                          frr_factor=args.drift_frr_factor)
    return ServiceSettings(db_url=args.db, model_dir=model_dir, models=models, api_keys=keys, protect_inspect=args.protect_inspect,
                           protect_read=args.protect_read, drift=drift,
                           max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6),
                           image_dir=Path(args.keep_images) if args.keep_images else None,
                           journal_dir=Path(args.journal) if args.journal else None, learn=not args.no_learn,
                           runtime=args.runtime, batching=BatchSettings(args.batch_max, args.batch_wait_ms, args.queue_max, args.request_timeout))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from defectlens._version import __version__
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.service.app import InspectionService, create_app

    settings = _service_settings(args)
    service = InspectionService(settings)
    loaded = ", ".join(m.name for m in service.registry.loaded()) or "none"
    print(f"defectlens {__version__} on {machine_description()}")
    print(f"models: {loaded} (model folder {settings.model_dir.resolve()}); history: {service.status()['database']['url']}")
    for model in service.registry.loaded():
        print(f"  {model.name}: {model.bundle.runtime.line()}")
    if not settings.api_keys:
        print("no API key configured: loading models and changing thresholds are refused (--api-key to allow them)")
    print(f"dashboard http://{args.host}:{args.port}/  API schema http://{args.host}:{args.port}/docs", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug")
    service.close()
    return 0


def run_loadtest(args: argparse.Namespace) -> int:
    from defectlens.data.images import flatten_inputs
    from defectlens.jsonutil import finite
    from defectlens.service.loadtest import check_history, history_rows, run_load

    if args.requests < 1 or args.concurrency < 1:
        raise DefectLensError("--requests and --concurrency must be at least 1")
    images = [p.read_bytes() for p in flatten_inputs(args.images)]
    result = run_load(args.url, args.model, images, args.requests, args.concurrency, args.api_key)
    try:
        result.check = check_history(history_rows(args.url, result.run_id), result.acknowledged, result.requests)
    except Exception as exc:  # noqa: BLE001 -- a server gone after the load is a finding to print, not a traceback
        result.check = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    summary = result.summary()
    print(f"{summary['ok']}/{summary['requests']} answered in {summary['seconds']} s: {summary['requests_per_s']} requests/s, "
          f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, concurrency {summary['concurrency']}")
    if summary["failures"]:
        print(f"failures: {summary['failures']}")
    check = result.check
    print("history: " + (f"{check['rows']} rows, {check.get('n_missing', 0)} missing, {len(check.get('duplicated', []))} duplicated"
                         if "rows" in check else check.get("error", "not checked")))
    if args.json:
        Path(args.json).write_text(json.dumps(finite(summary), indent=2))
    return 0 if result.lost == 0 and check.get("ok") else 1
