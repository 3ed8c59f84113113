"""Helpers for the serving tests: a real server, in this process (uvicorn in a thread, over a
Generator the test already holds) or as a ``ddpm-rt serve`` process on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time

import uvicorn

from ddpm_rt.tools.serve import Limits, create_app


@contextlib.contextmanager
def live_app(gen, limits: Limits | None = None, **kw):
    """(base URL, app) of a real uvicorn server on a free loopback port, in a thread."""
    app = create_app(gen, limits, **kw)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def serve_process(*args: str, timeout: float = 60):
    """A ``ddpm-rt serve --port 0`` process; yields (Popen, base URL) once it listens."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_rt.cli", "serve", "--port", "0", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = wait_for_url(proc, timeout)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def wait_for_url(proc: subprocess.Popen, timeout: float) -> str:
    lines = []
    timer = threading.Timer(timeout, proc.kill)  # a hung start ends the readline below
    timer.start()
    try:
        for line in proc.stderr:
            lines.append(line)
            m = re.match(r"serving on (http://\S+?)/?$", line.strip())
            if m:
                # keep draining stderr (a full pipe would block the server) into proc.log
                proc.log = lines
                threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True).start()
                return m.group(1)
    finally:
        timer.cancel()
    raise AssertionError(f"ddpm-rt serve did not start ({proc.poll()}):\n{''.join(lines)}")
