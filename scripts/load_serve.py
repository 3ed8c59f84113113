"""Load test for ``ddpm-rt serve`` (issue 20): a real server process on a free loopback port,
a fixed request set, a time limit.

Phases: warm-up at the largest batch (ONNX Runtime's arena grows once), then the same M
single-image requests from 1, 4 and 16 concurrent clients (images/s, p50/p95 latency, the
batch sizes the server formed), clients that close their socket mid-request, and a burst
past the queue's bound (503 + Retry-After, nothing else). Every image is checked against
the same request made to a ``Generator`` in this process (no lost or mixed-up images); the
server's RSS after the run is compared with after the warm-up. In the same run: the U-Net's
own throughput gain from batch 2 rows to the batch the server formed, and
``Generator.generate``'s latency for the single-client request.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/load_serve.py --json runs/load_serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from ddpm_rt.generator import Generator
from ddpm_rt.images import PROVENANCE_KEY
from ddpm_rt.tools.bench_probe import time_it

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16)
ME = psutil.Process()
PROMPTS = [
    "a red apple",
    "a blue ball",
    "a happy dog",
    "a green tree",
    "a yellow star",
    "a small cat",
    "a sad face",
    "a red car",
]


def start_server(args) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [
        sys.executable,
        "-m",
        "ddpm_rt.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--threads",
        str(args.threads),
        "--max-queue",
        str(args.max_queue),
    ]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    log: list[str] = []
    for line in proc.stderr:
        log.append(line)
        if m := re.match(r"serving on (http://\S+?)/?$", line.strip()):
            threading.Thread(target=log.extend, args=(proc.stderr,), daemon=True).start()
            return proc, m.group(1), log
    raise SystemExit(f"error: the server did not start:\n{''.join(log)}")


def requests_set(m: int, seed0: int) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": seed0 + i, "num": 1} for i in range(m)]


class Run:
    """Results of one phase: per request, its latency and what came back."""

    def __init__(self, name: str):
        self.name, self.lat, self.status = name, [], Counter()
        self.images: list[tuple[int, np.ndarray, dict]] = []  # (request, pixels, settings)
        self.raw: list[tuple[int, bytes]] = []  # (request, PNG) until decoded
        self.refusals: list[str] = []
        self.wall = 0.0
        self.cpu = 0.0  # the server's CPU seconds (user + system) during the phase
        self.busy = 0.0  # seconds its worker spent running batches
        self.client_cpu = 0.0  # this process's CPU seconds (the clients)
        self.batches: Counter = Counter()


async def client_loop(url: str, bodies: list[tuple[int, dict]], run: Run, deadline) -> None:
    """One client: its requests one after another on its own connection. The answers are
    kept as bytes and checked after the phase (the clients stay light while it runs)."""
    async with httpx.AsyncClient(timeout=120) as c:
        for k, body in bodies:
            if time.monotonic() > deadline:
                run.status["not sent (time limit)"] += 1
                continue
            t0 = time.perf_counter()
            r = await c.post(f"{url}/api/generate", json=body)
            run.lat.append(time.perf_counter() - t0)
            run.status[r.status_code] += 1
            if r.status_code == 200 and r.headers["content-type"] == "image/png":
                run.raw.append((k, r.content))
            else:
                run.refusals.append(f"{r.status_code} {r.text[:200]}")


def decode(run: Run) -> None:
    for k, data in run.raw:
        with Image.open(io.BytesIO(data)) as img:
            pixels, prov = np.asarray(img.convert("RGB")), img.text[PROVENANCE_KEY]
        run.images.append((k, pixels, json.loads(prov)))
    run.raw = []


def health(url: str) -> dict:
    return httpx.get(f"{url}/api/health", timeout=30).json()


def cpu_seconds(proc: psutil.Process | None) -> float:
    return 0.0 if proc is None else sum(proc.cpu_times()[:2])


def phase(url, name, bodies, clients: int, deadline, run=None, server=None) -> Run:
    """Send ``bodies`` from ``clients`` concurrent clients; adds to ``run`` if given."""
    run = run or Run(name)
    h0 = health(url)
    before = Counter({int(k): v for k, v in h0["batches"].items()})
    cpu0, me0 = cpu_seconds(server), cpu_seconds(ME)
    shares = [[(k, b) for k, b in enumerate(bodies) if k % clients == c] for c in range(clients)]

    async def clients_at_once():
        await asyncio.gather(*(client_loop(url, s, run, deadline) for s in shares))

    t0 = time.perf_counter()
    asyncio.run(clients_at_once())
    run.wall += time.perf_counter() - t0
    run.cpu += cpu_seconds(server) - cpu0
    run.client_cpu += cpu_seconds(ME) - me0
    h1 = health(url)
    after = Counter({int(k): v for k, v in h1["batches"].items()})
    run.batches += after - before
    run.busy += h1["busy_s"] - h0["busy_s"]
    decode(run)
    return run


def disconnect_phase(url: str, n: int, clients: int, deadline: float) -> dict:
    """``n`` requests whose clients close the socket after 0-40 ms, while ``clients`` others
    run normally: no 5xx for the others, the server stays up, the abandoned work stops."""
    host, port = url.removeprefix("http://").split(":")
    before = health(url)

    def abandon(i: int) -> None:
        body = json.dumps(
            {"prompt": "a red apple", "num": 4, "seed": 10_000 + i, "steps": 30}
        ).encode()
        s = socket.create_connection((host, int(port)))
        s.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep((i % 5) * 0.01)
        s.close()

    normal = requests_set(clients * 2, 20_000)
    with ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(abandon, i) for i in range(n)]
        run = phase(url, "16 + disconnects", normal, clients, deadline)
        for f in futs:
            f.result()
    t0 = time.monotonic()
    while (h := health(url))["running"] or h["queued"]:
        if time.monotonic() - t0 > 60:
            break
        time.sleep(0.05)
    return {
        "run": run,
        "cancelled": h["cancelled"] - before["cancelled"],
        "done_extra": h["done"] - before["done"] - len(run.images),
    }


def burst_phase(url: str, n: int, deadline: float) -> Run:
    """``n`` requests at once, more than the queue holds: each an image or a 503."""
    return phase(url, f"burst of {n}", requests_set(n, 30_000), n, deadline)


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if len(xs) else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="bundle (default: the shipped model)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads, both sides")
    p.add_argument("--requests", type=int, default=64, help="requests per level and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of 1, 4, 16 clients")
    p.add_argument("--latency-requests", type=int, default=40, help="served vs direct pairs")
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    deadline = time.monotonic() + args.time_limit
    gen = Generator(args.model or ROOT / "models" / "default", threads=args.threads)
    proc, url, log = start_server(args)
    server = psutil.Process(proc.pid)
    out: dict = {"threads": args.threads, "requests": args.requests}
    try:
        # warm-up at the largest batch the server forms (--max-batch, 32: the burst reaches
        # it), twice: ONNX Runtime's arena grows to the largest batch once
        for _ in range(2):
            phase(url, "warm-up", requests_set(32, 90_000), 32, deadline)
        rss0 = server.memory_info().rss
        bodies = requests_set(args.requests, 1)
        # the levels interleaved, round after round: a shared machine's noise falls on all
        runs = [Run(f"{c} client{'s' * (c > 1)}") for c in LEVELS]
        for _ in range(args.rounds):
            for c, run in zip(LEVELS, runs, strict=True):
                phase(url, run.name, bodies, c, deadline, run, server)
        # one client alone, each request followed by the same one through Generator.generate
        # in this process (the server idle meanwhile): the server's latency side by side
        served, direct = [], []
        with httpx.Client(timeout=120) as client:
            for b in requests_set(args.latency_requests, 40_000):
                t0 = time.perf_counter()
                r = client.post(f"{url}/api/generate", json=b)
                served.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                t0 = time.perf_counter()
                gen.generate(b["prompt"], num=1, seed=b["seed"])
                direct.append(time.perf_counter() - t0)
        disc = disconnect_phase(url, 16, 16, deadline)
        burst = burst_phase(url, args.max_queue + 32, deadline)
        time.sleep(0.5)
        rss1 = server.memory_info().rss
        proc.terminate()
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # every image: the request's own, byte for byte (served alone in this process)
    refs = {k: gen.generate(b["prompt"], num=1, seed=b["seed"])[0] for k, b in enumerate(bodies)}
    wrong = 0
    for run in runs:
        for k, pixels, prov in run.images:
            ok = prov["seed"] == bodies[k]["seed"] and prov["prompts"] == [bodies[k]["prompt"]]
            wrong += not (ok and np.array_equal(pixels, refs[k]))
    lost = sum(args.rounds * args.requests - len(r.images) for r in runs)
    # the U-Net's own gain from one guided image (2 rows) to the batch the server formed
    # the batch size that carried the most of the 16 clients' images
    formed = max(runs[2].batches, key=lambda b: b * runs[2].batches[b])
    c, h, w = gen.bundle.image_shape
    ctx = gen.context("a red apple")
    rng = np.random.default_rng(0)

    def unet_step(b: int):
        x = rng.standard_normal((b, c, h, w), dtype=np.float32)
        cc = np.repeat(ctx[None], b, axis=0)
        return lambda: gen.eps(x, 250, cc, guidance=2.0)

    # interleaved blocks, so that the machine's load falls on both sizes alike
    one, many = unet_step(1), unet_step(formed)
    t_one, t_many, cpu_one, cpu_many = [], [], 0.0, 0.0
    for _ in range(5):
        c0 = time.process_time()
        t_one.extend(time_it(one, 20, warmup=1))
        c1 = time.process_time()
        t_many.extend(time_it(many, 20, warmup=1))
        cpu_one, cpu_many = cpu_one + c1 - c0, cpu_many + time.process_time() - c1
    unet_one = 1 / float(np.median(t_one))
    unet_formed = formed / float(np.median(t_many))
    unet_gain = unet_formed / unet_one
    # the same in CPU seconds (ONNX Runtime on one thread: this process's CPU is the U-Net's)
    unet_cpu_gain = (cpu_one / 1) / (cpu_many / formed)
    ips = {r.name: len(r.images) / r.wall for r in runs}
    serve_gain = ips["16 clients"] / ips["1 client"]
    cpu_gain = (runs[0].cpu / len(runs[0].images)) / (runs[2].cpu / len(runs[2].images))
    all_status = Counter()
    for r in [*runs, disc["run"], burst]:
        all_status.update(r.status)
    # 503 + Retry-After is the queue's refusal (asked for by the burst); any other 5xx is not
    five = sum(v for k, v in all_status.items() if isinstance(k, int) and k >= 500 and k != 503)
    five += all_status[503] - burst.status[503]
    burst_bad = [s for s in burst.refusals if not s.startswith("503")]
    rows = []
    for r in runs:
        rows.append(
            f"| {r.name} | {len(r.images)} | {r.wall:.2f} | {len(r.images) / r.wall:.1f} "
            f"| {pct(r.lat, 50):.0f} | {pct(r.lat, 95):.0f} | {1e3 * r.cpu / len(r.images):.0f} "
            f"| {1e3 * r.client_cpu / len(r.images):.0f} | {100 * r.busy / r.wall:.0f} % "
            f"| {dict(sorted(r.batches.items()))} |"
        )
    report = [
        f"server: ddpm-rt serve --threads {args.threads} (loopback); per row {args.rounds} rounds "
        f"x {args.requests} single-image requests (DDIM 8 steps, guidance 2, distinct seeds), "
        "the rows interleaved round by round",
        "",
        "| clients | images | wall s | images/s | p50 ms | p95 ms | server CPU ms/image "
        "| client CPU ms/image | worker busy | batches (images: count) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *rows,
        "",
        f"one client, {len(served)} requests each followed by the same through "
        f"Generator.generate in-process: served p50 {pct(served, 50):.0f} / p95 "
        f"{pct(served, 95):.0f} ms, generate p50 {pct(direct, 50):.0f} / p95 "
        f"{pct(direct, 95):.0f} ms",
        f"U-Net alone (guided, {args.threads} thread): {unet_one:.0f} images/s at 1 image "
        f"(2 rows), {unet_formed:.0f} at {formed} images ({2 * formed} rows): gain "
        f"{unet_gain:.2f}x",
        f"disconnects: 16 clients closed their socket mid-request; {disc['cancelled']} "
        f"requests cancelled, the other {len(disc['run'].images)} served "
        f"({dict(disc['run'].status)})",
        f"burst of {args.max_queue + 32}: {dict(burst.status)} "
        f"(anything but an image or a 503: {len(burst_bad)})",
        f"status codes over the run: {dict(all_status)}; 5xx: {five}",
        f"images lost: {lost}, wrong or mixed up: {wrong}",
        f"server RSS after warm-up {rss0 / 2**20:.1f} MiB, after the run {rss1 / 2**20:.1f} MiB "
        f"({100 * (rss1 / rss0 - 1):+.1f} %); exit status after SIGTERM: {rc}",
        "",
        "targets:",
        f"- 16 clients vs one at a time: {serve_gain:.2f}x (target >= 1.1x): "
        f"{'met' if serve_gain >= 1.1 else 'MISSED'}",
        f"- vs the U-Net's own gain {unet_gain:.2f}x: {serve_gain / unet_gain:.2f} of it "
        f"(target >= 0.9): {'met' if serve_gain >= 0.9 * unet_gain else 'MISSED'}",
        f"- p95 one client {pct(served, 95):.0f} ms vs generate {pct(direct, 95):.0f} ms: "
        f"{pct(served, 95) / pct(direct, 95):.2f}x (target <= 1.2x): "
        f"{'met' if pct(served, 95) <= 1.2 * pct(direct, 95) else 'MISSED'}",
        f"- (in CPU time, not a target: the server's CPU per image at 16 clients vs one at a "
        f"time {cpu_gain:.2f}x, the U-Net's CPU per image at {formed} vs 1 {unet_cpu_gain:.2f}x:"
        f" {cpu_gain / unet_cpu_gain:.2f} of it)",
        f"- 5xx {five}, lost {lost}, mixed up {wrong}, RSS {100 * (rss1 / rss0 - 1):+.1f} % "
        f"(target 0, 0, 0, within 10 %): "
        f"{'met' if not (five or lost or wrong) and abs(rss1 / rss0 - 1) <= 0.1 else 'MISSED'}",
    ]
    tracebacks = sum("Traceback" in line for line in log)
    report.append(f"server log: {len(log)} lines, {tracebacks} tracebacks")
    print("\n".join(report))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    **out,
                    "report": report,
                    "images_per_s": ips,
                    "serve_gain": serve_gain,
                    "unet_gain": unet_gain,
                    "cpu_gain": cpu_gain,
                    "unet_cpu_gain": unet_cpu_gain,
                    "formed": formed,
                    "p95_ms": {r.name: pct(r.lat, 95) for r in runs},
                    "p50_ms": {r.name: pct(r.lat, 50) for r in runs},
                    "direct_p95_ms": pct(direct, 95),
                    "served_p95_ms": pct(served, 95),
                    "cpu_ms_per_image": {r.name: 1e3 * r.cpu / len(r.images) for r in runs},
                    "rss": [rss0, rss1],
                    "status": {str(k): v for k, v in all_status.items()},
                    "lost": lost,
                    "wrong": wrong,
                },
                indent=2,
            )
        )
    return 0 if not (five or lost or wrong or burst_bad or tracebacks) and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
