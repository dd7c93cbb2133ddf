"""`plutao serve RUN [RUN ...]`: the runs as an OpenAI-compatible HTTP service (experiments/serve/) on one
host, with a web chat at `/` that compares them."""

from __future__ import annotations

import os
import signal
import sys


def cmd_serve(args) -> int:
    from plutao.train.config.errors import UserError

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("plutao serve needs FastAPI and uvicorn: pip install 'plutao[serve]'") from None
    for name, value, low in (("--slots", args.slots, 1), ("--max-queue", args.max_queue, 1), ("--chunk", args.chunk, 1)):
        if value < low:
            raise UserError(f"{name} must be ≥ {low}, got {value}")
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    from plutao.experiments.serve.api import create_app
    from plutao.experiments.serve.served import load_served
    from plutao.model.engine import Engine

    served = load_served(args.runs, args.slots)
    engine = Engine({name: s.backend for name, s in served.items()}, max_queue=args.max_queue, chunk=args.chunk)
    key = args.api_key or os.environ.get("PLUTAO_API_KEY") or None
    app = create_app(served, engine, api_key=key, timeout=args.timeout, chunk=args.chunk)
    print(f"plutao serve: {', '.join(f'{n} ({s.stage})' for n, s in served.items())} on http://{args.host}:{args.port} "
          f"({args.slots} slots per model{', API key required' if key else ''}); GET /health says when every program "
          "is compiled", file=sys.stderr, flush=True)
    # SIGTERM and SIGINT are the server's: uvicorn stops admitting, lets in-flight requests finish within
    # --grace and returns (then re-raises the signal it caught, which must not turn a clean stop into 143).
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.grace)
    print("plutao serve: stopped", file=sys.stderr, flush=True)
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    s = sub.add_parser("serve", help="serve runs over an OpenAI-compatible HTTP API, with a web chat at /")
    s.add_argument("runs", nargs="+", metavar="RUN", help="run directories (model ids are their names)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health (default: the "
                   "PLUTAO_API_KEY environment variable; none = open)")
    s.add_argument("--slots", type=int, default=32, help="decoding slots per model: requests decoded together "
                   "(default %(default)s)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429 (default "
                   "%(default)s)")
    s.add_argument("--timeout", type=float, help="seconds a request may take before it is answered 408 and its slot "
                   "freed (default: none)")
    s.add_argument("--chunk", type=int, default=4, help="decode steps between admissions (default %(default)s)")
    s.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get to finish after SIGTERM "
                   "(default %(default)s)")
    s.set_defaults(fn=cmd_serve)
