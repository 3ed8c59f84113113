"""``ddpm-rt serve``: the HTTP API and web page (``ddpm_rt.tools.serve``) on uvicorn.

Safe by default: loopback only; another address needs ``--token`` or ``--insecure``. SIGTERM
(and SIGINT) stop it the way a service manager expects: no new work, what runs finishes
within ``--shutdown-grace`` seconds or is cancelled, exit status 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from ddpm_rt.cli.generate import add_model_flags
from ddpm_rt.errors import InputError

LOOPBACK_NAMES = ("localhost",)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace):
    """Every flag checked before the model loads; returns the Limits."""
    from ddpm_rt.config import check_int, check_real
    from ddpm_rt.extras import require

    # the serve extra, checked before any work (python_multipart: the edits route's forms)
    for module in ("starlette", "uvicorn", "python_multipart"):
        require(module, "serve")
    from ddpm_rt.tools.serve.api import Limits

    check_int("--port", args.port, 0, 65535)
    token = args.token if args.token is not None else os.environ.get("DDPM_RT_TOKEN")
    if token is not None and (len(token) < 16 or not token.isprintable() or " " in token):
        raise InputError("--token must be at least 16 printable characters without spaces")
    args.token = token
    if not _is_loopback(args.host) and token is None and not args.insecure:
        raise InputError(
            f"--host {args.host} is reachable from other machines: give --token (or set "
            "DDPM_RT_TOKEN), or pass --insecure to serve it without one"
        )
    for o in args.cors_origin or []:
        if o != "*" and not o.startswith(("http://", "https://")):
            raise InputError(f"--cors-origin must be an origin like http://host:port, got {o!r}")
    return Limits(
        max_images=check_int("--max-images", args.max_images, 1, 4096),
        max_steps=check_int("--max-steps", args.max_steps, 1, 10_000),
        max_prompt_chars=check_int("--max-prompt-chars", args.max_prompt_chars, 1, 10_000),
        max_body_bytes=check_int("--max-body-bytes", args.max_body_bytes, 1024, 1 << 20),
        max_image_bytes=check_int("--max-image-bytes", args.max_image_bytes, 1024, 64 << 20),
        max_queue=check_int("--max-queue", args.max_queue, 1, 100_000),
        max_batch=check_int("--max-batch", args.max_batch, 1, 4096),
        batch_window_s=check_real("--batch-window-ms", args.batch_window_ms, 0, 10_000) / 1000,
        shutdown_grace_s=check_real("--shutdown-grace", args.shutdown_grace, 0, 3600),
    )


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port or an address this
    machine does not have is one line, before any work."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
    except OSError as e:  # socket.gaierror included
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    limits = check_args(args)
    sock = listen(args.host, args.port)
    import uvicorn

    from ddpm_rt.cli.generate import _digest, _providers, default_model
    from ddpm_rt.generator import Generator
    from ddpm_rt.tools.serve import create_app

    gen = Generator(
        args.model or default_model(),
        backend=args.backend,
        providers=_providers(args),
        text_precision=args.text_precision,
        expected_digest=_digest(args),
        threads=args.threads,
        unet_precision=args.unet_precision,
        decoder_precision=args.decoder_precision,
        engine_cache=args.engine_cache,
    )
    app = create_app(gen, limits, token=args.token, cors_origins=tuple(args.cors_origin or ()))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=args.access_log,
        timeout_graceful_shutdown=limits.shutdown_grace_s + 2,
        lifespan="on",
    )
    server = _server(config, app.state.service.batcher, limits.shutdown_grace_s)
    if not _is_loopback(args.host) and args.token is None:
        print(
            f"warning: serving {args.host} without a token (--insecure): anyone who can "
            "reach this port can use it",
            file=sys.stderr,
        )
    server.run(sockets=[sock])
    if not server.started:  # the app failed to start (its error is logged above)
        raise InputError(f"could not serve on {args.host}:{args.port}")
    return 0


def _server(config, batcher, grace: float):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a signal is the service manager's "stop": the batcher stops
        taking work at once, and the process exits 0 (uvicorn re-raises the signal after a
        graceful shutdown, which would end the process with it)."""

        def __init__(self, config, batcher, grace: float):
            super().__init__(config)
            self.batcher, self.grace = batcher, grace

        def handle_exit(self, sig, frame) -> None:
            self.batcher.close(self.grace)
            if self.should_exit:  # a second signal: stop waiting
                self.force_exit = True
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                for s in self.servers:
                    for sock in s.sockets:
                        host, port = sock.getsockname()[:2]
                        print(
                            f"serving on http://{_url_host(host)}:{port}/",
                            file=sys.stderr,
                            flush=True,
                        )

    return Server(config, batcher, grace)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def add_serve_parser(sub, common) -> None:
    s = sub.add_parser("serve", help="an HTTP API and web page (needs the serve extra)")
    s.add_argument("--model", help="bundle folder (default: the shipped model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    s.add_argument("--token", help="require Authorization: Bearer TOKEN (or $DDPM_RT_TOKEN)")
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without a token (prints a warning)",
    )
    s.add_argument(
        "--cors-origin",
        action="append",
        help="an origin allowed to call the API from a browser (repeatable)",
    )
    s.add_argument("--max-images", type=int, default=16, help="images per request (16)")
    s.add_argument("--max-steps", type=int, default=50, help="steps per request (50)")
    s.add_argument("--max-prompt-chars", type=int, default=1000, help="prompt length (1000)")
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=65536,
        help="a request's fields but its pictures (65536)",
    )
    s.add_argument(
        "--max-image-bytes",
        type=int,
        default=8 << 20,
        help="one picture's file: init_image, mask, the edits route's uploads (8388608)",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting or running; more get 503 + Retry-After (64)",
    )
    s.add_argument("--max-batch", type=int, default=32, help="images per batch (32)")
    s.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="under concurrent load, the least a request waits for others to batch with "
        "(5; up to a tenth of the last batch's time)",
    )
    s.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds to finish running work before cancelling (10)",
    )
    s.add_argument("--access-log", action="store_true", help="log every request")
    add_model_flags(s)
    common(s)
    s.set_defaults(func=cmd_serve)
