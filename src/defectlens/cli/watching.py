"""`watch`: a hot folder or a camera inspected as parts arrive, verdicts published to the plant."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from defectlens.cli.options import add_overlay_option, add_runtime_option


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="inspect images as they arrive in a folder, or frames of a camera or video", description=(
        "Watch SOURCE and inspect every part exactly once, across restarts: a folder (a file is taken once it is completely "
        "written), or a video file, RTSP URL or camera device (0, /dev/video0) sampled at --fps. Records go to --out "
        "(results.jsonl is the journal a restart resumes from), rows to --db, verdicts to every --publish destination "
        "through an outbox on disk that loses none while the receiver is away."))
    p.add_argument("model", help="model file (.dlens, or one exported to .onnx)")
    p.add_argument("source", help="folder to watch, or video file / RTSP URL / camera device")
    p.add_argument("--out", default=None, help="folder for results.jsonl, overlays, the outbox and errors/ (default: watch_<model>)")
    p.add_argument("--db", default=None, help="also record every inspection in this history database (SQLAlchemy URL)")
    p.add_argument("--publish", action="append", default=[], metavar="URL", help=(
        "send each verdict to mqtt://broker[:port][/topic-prefix] (QoS 1, topic <prefix>/<model>) or to an http(s):// "
        "webhook (POST, retried with backoff); repeat for several"))
    p.add_argument("--done", default=None, help="move each inspected file here (default: leave it in place)")
    p.add_argument("--errors", default=None, help="move unreadable files here, each with a .reason.txt (default: <out>/errors)")
    p.add_argument("--fps", type=float, default=0.0, help="video: frames per second to inspect (default: every frame)")
    p.add_argument("--settle", type=float, default=0.5, metavar="SECONDS", help=(
        "a file is complete when closed after writing, or unchanged this long (default: 0.5)"))
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS", help=(
        "an unreadable file changed less than this long ago is tried again once it settles, as a writer may have paused; "
        "older ones go to the errors folder (default: 10)"))
    add_overlay_option(p)
    add_runtime_option(p)
    p.set_defaults(run=run_watch)


def run_watch(args: argparse.Namespace) -> int:
    from defectlens.station.watch import Watcher

    out = Path(args.out) if args.out else Path(f"watch_{Path(args.model).stem}")
    watcher = Watcher(Path(args.model), args.source, out, db=args.db, publish=args.publish, done=Path(args.done) if args.done else None,
                      errors=Path(args.errors) if args.errors else None, fps=args.fps, settle_s=args.settle, overlays=args.overlays,
                      runtime=args.runtime, grace_s=args.grace)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(watcher.inspector.bundle.runtime.line(), flush=True)
    print(f"watching {args.source} with {args.model}; records in {out}" + (f"; publishing to {', '.join(args.publish)}" if args.publish else ""),
          flush=True)
    counts = watcher.run(stop)
    print(f"inspected {counts.inspected} ({counts.good} good, {counts.defect} defect), {counts.errors} unreadable, "
          f"{counts.skipped} already done", flush=True)
    return 0
