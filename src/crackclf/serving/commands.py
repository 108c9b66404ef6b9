"""``crackclf serve``: the HTTP API and web page (see docs/serving.md)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re

from crackclf.errors import UsageError
from crackclf.inference.commands import model_arguments

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``crackclf`` parser."""
    from crackclf.serving.settings import DEFAULT_FORMATS, ServeSettings

    defaults = ServeSettings()
    serve = subparsers.add_parser(
        "serve", help="HTTP API + web page over a model (http://127.0.0.1:8000/)",
        description="Serve a model over HTTP: the web page at /, POST /predict, POST /analyze, GET /healthz, "
                    "GET /model, OpenAPI docs at /docs. Binds to 127.0.0.1 (this machine only) unless --host says "
                    "otherwise; there is no authentication, so bind elsewhere only on a network you trust.")
    model_arguments(serve)  # the same model options and defaults as predict and evaluate
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server to "
                            "every network this machine is on)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--workers", type=int, default=defaults.workers,
                       help=f"inference threads (default {defaults.workers}: one per usable core)")
    serve.add_argument("--threads", type=int, default=1,
                       help="cores one model call may use (ONNX Runtime splits a batch of 16+ images into this many "
                            "shards; default 1: requests run in parallel on the --workers threads instead)")
    serve.add_argument("--queue", type=int, default=defaults.queue_size,
                       help=f"requests that may wait for a worker before the server answers 503 with Retry-After "
                            f"(default {defaults.queue_size})")
    serve.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20,
                       help=f"largest request body in MiB (default {defaults.max_upload_bytes / 2**20:g})")
    serve.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                       help=f"largest image in pixels, checked from its header (default {defaults.max_pixels:,})")
    serve.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                       help=f"accepted image formats, comma-separated Pillow names "
                            f"(default {','.join(DEFAULT_FORMATS)})")
    serve.add_argument("--max-files", type=int, default=defaults.max_files,
                       help=f"images per /predict request (default {defaults.max_files})")
    serve.add_argument("--max-tiles", type=int, default=defaults.max_tiles,
                       help=f"windows per /analyze photo (default {defaults.max_tiles})")
    serve.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    serve.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from crackclf.serving.settings import ServeSettings

    # Options are checked before the heavy imports and the model load, so a typo fails in a fraction of a second.
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} must be between 0 and 65535 (e.g. 8000).")
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()), max_files=args.max_files,
        max_tiles=args.max_tiles, workers=args.workers, queue_size=args.queue,
    )
    import uvicorn

    from crackclf.inference.predictor import Predictor
    from crackclf.serving.app import create_app

    if args.threads < 1:
        raise UsageError(f"--threads {args.threads} must be >= 1 (e.g. 1).")
    predictor = Predictor.load(args.model, backend=args.backend, threshold=args.threshold, tta=args.tta,
                               threads=args.threads, device=args.device)
    if not _is_loopback(args.host):
        log.warning("binding to %s: anyone who can reach this machine on port %d can use the API (no "
                    "authentication); put it behind a reverse proxy with TLS and access control for shared use.",
                    args.host, args.port)
    log.info("serving %s (%s, %s backend, threshold %.4f) on http://%s:%d/", predictor.model_id,
             predictor.info.backbone, predictor.backend, predictor.threshold, _url_host(args.host), args.port)
    uvicorn.run(create_app(predictor, settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=not args.no_access_log, server_header=False, timeout_graceful_shutdown=5)
    return 0


_BOUND = re.compile(r"Uvicorn running on (http://\S+:\d+)")


def bound_url(server_output: str) -> str | None:
    """The URL a ``crackclf serve`` listens on, read from its start-up line (at ``--log-level info`` or lower).

    Given ``--port 0``, the OS picks a free port as the server binds it; reading it back is how a client learns it
    (a port probed free and released first could be taken by another process in between)."""
    found = _BOUND.search(server_output)
    return found.group(1) if found else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only localhost is known to be local
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
