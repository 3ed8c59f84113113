"""``ddpm-rt serve``: every endpoint and refusal through Starlette's test client; the
concurrent cases (queue full, disconnects, batching, SIGTERM) against real servers."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")

from PIL import Image  # noqa: E402
from serving import live_app, serve_process  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from ddpm_rt.generator import Generator  # noqa: E402
from ddpm_rt.images import PROVENANCE_KEY  # noqa: E402
from ddpm_rt.tools.serve import Limits, create_app  # noqa: E402

from conftest import ROOT  # noqa: E402

MODEL = ROOT / "models" / "default"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def gen():
    return Generator(MODEL, threads=1)


@pytest.fixture(scope="module")
def client(gen):
    with TestClient(create_app(gen)) as c:
        yield c


def decode(data: bytes) -> tuple[np.ndarray, dict | None]:
    """A PNG's pixels and its ddpm-rt settings chunk."""
    with Image.open(io.BytesIO(data)) as img:
        text = img.text.get(PROVENANCE_KEY)
        return np.asarray(img.convert("RGB")), (json.loads(text) if text else None)


def b64_image(s: str) -> tuple[np.ndarray, dict | None]:
    return decode(base64.b64decode(s))


# -- the endpoints -----------------------------------------------------------------------


def test_health_info_openapi_and_page(client, gen):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["queued"] == 0 and h["auth"] is False
    info = client.get("/api/info").json()
    assert info["bundle_digest"] == gen.bundle.digest
    c, h, w = gen.bundle.image_shape  # the shipped cascade's 64x64
    assert info["image"] == {"channels": c, "height": h, "width": w}
    assert info["sizes"] == list(gen.bundle.sizes)
    assert info["defaults"]["sampler"] == "ddim" and info["defaults"]["steps"]["ddim"] == 8
    assert info["precisions"]["unet"] == gen.unet_precision
    assert "int8" in info["precisions"]["unet_available"]
    assert info["backend"] == "ort" and info["limits"]["max_images"] == 16
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    body = schema["paths"]["/api/generate"]["post"]["requestBody"]
    props = body["content"]["application/json"]["schema"]["properties"]
    assert props["num"]["maximum"] == 16 and "ddpm" in props["sampler"]["enum"]
    assert {"/api/generate/stream", "/v1/images/generations", "/api/info", "/api/health"} <= set(
        schema["paths"]
    )
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


def test_page_loads_nothing_from_elsewhere():
    """The device may be offline: no CDN, no web font, no absolute URL in the page's files."""
    static = ROOT / "runtime" / "tools" / "serve" / "static"
    for f in static.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f
        assert "@import" not in text and "url(" not in text, f


def test_generate_png_is_the_generator_s_image_with_its_settings(client, gen):
    r = client.post("/api/generate", json={"prompt": "a red apple", "num": 1, "seed": 7})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "7"
    pixels, prov = decode(r.content)
    np.testing.assert_array_equal(pixels, gen.generate("a red apple", num=1, seed=7)[0])
    assert prov["prompts"] == ["a red apple"] and prov["seed"] == 7
    assert prov["sampler"] == "ddim" and prov["steps"] == 8 and prov["guidance"] == 2.0
    assert prov["bundle_digest"] == gen.bundle.digest


@pytest.mark.parametrize("size", [None, 16], ids=["image", "base-picture"])
def test_server_and_cli_write_the_same_settings(client, gen, tmp_path, size):
    """One provenance (Generator.provenance of the job): the server's PNG chunk is the CLI's
    for the same request, a cascade's base picture included (no decoder named)."""
    from conftest import run_cli

    body = {"prompt": "a red apple", "num": 2, "seed": 7, "negative_prompt": "green"}
    flags = ["--prompt", "a red apple", "--num", "2", "--seed", "7", "--negative-prompt", "green"]
    if size is not None:
        body["size"], flags = size, [*flags, "--size", str(size)]
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    _, served = decode(r.content)
    run_cli(*flags, "--model", str(MODEL), "--out", str(tmp_path / "a.png"), "--no-progress")
    _, written = decode((tmp_path / "a.png").read_bytes())
    assert served == written
    assert ("decoder" in written) == (size is None and gen.bundle.latent is not None)


def test_generate_json_each_image_and_a_random_seed_returned(client, gen):
    body = {
        "prompt": ["a red apple", "a blue ball"],
        "num": 2,
        "response_format": "json",
        "sampler": "dpm++2m",
        "steps": 5,
        "guidance": 3.0,
        "negative_prompt": "a dog",
    }
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    seed = out["seed"]
    assert out["seed_was_random"] and isinstance(seed, int)
    alone = gen.generate(
        ["a red apple", "a blue ball"],
        num=2,
        seed=seed,
        sampler="dpm++2m",
        steps=5,
        guidance=3.0,
        negative_prompt="a dog",
    )
    assert len(out["images"]) == 4
    for k, im in enumerate(out["images"]):
        pixels, prov = b64_image(im["b64_png"])
        np.testing.assert_array_equal(pixels, alone[k])
        assert prov["seed"] == seed and prov["prompt"] == body["prompt"][k // 2]
        assert prov["image_index"] == k % 2 and prov["negative_prompt"] == "a dog"
        assert prov["sampler"] == "dpm++2m" and prov["steps"] == 5


def test_openai_images_api_shape(client, gen):
    r = client.post(
        "/v1/images/generations",
        json={
            "prompt": "a yellow star",
            "n": 2,
            "response_format": "b64_json",
            "model": "anything",
            "size": "{0}x{0}".format(gen.bundle.image_shape[1]),
            "seed": 3,
        },
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert isinstance(r.json()["created"], int) and len(data) == 2
    alone = gen.generate("a yellow star", num=2, seed=3)
    for k, d in enumerate(data):
        np.testing.assert_array_equal(b64_image(d["b64_json"])[0], alone[k])
    bad = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "response_format"
    bad = client.post("/v1/images/generations", json={"prompt": "x", "size": "1024x1024"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "size"


def test_stream_sends_progress_previews_and_the_image(client, gen):
    body = {"prompt": "a green tree", "seed": 5, "steps": 6, "preview_every": 2, "num": 2}
    with client.stream("POST", "/api/generate/stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    kinds = [e for e, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done"
    progress = [d for e, d in events if e == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5, 6]
    with_preview = [p["step"] for p in progress if "previews" in p]
    assert with_preview == [2, 4, 6]
    assert len(progress[1]["previews"]) == 2
    done = events[-1][1]
    alone = gen.generate("a green tree", num=2, seed=5, steps=6)
    for k, im in enumerate(done["images"]):
        np.testing.assert_array_equal(b64_image(im["b64_png"])[0], alone[k])
    # the last preview is x̂0 at the last step: close to (not equal to) the final image
    last = b64_image(progress[-1]["previews"][0])[0].astype(int)
    assert np.abs(last - alone[0].astype(int)).mean() < 40


# -- refusals ----------------------------------------------------------------------------

BAD_FIELDS = [
    ({"prompt": "x", "colour": 1}, 422, "colour"),
    ({"num": 1}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": []}, 422, "prompt"),
    ({"prompt": "x", "num": 0}, 422, "num"),
    ({"prompt": "x", "num": 17}, 422, "num"),
    ({"prompt": "x", "num": 2.5}, 422, "num"),
    ({"prompt": "x", "num": True}, 422, "num"),
    ({"prompt": ["a", "b", "c"], "num": 6}, 422, "num"),
    ({"prompt": "x", "steps": 51}, 422, "steps"),
    ({"prompt": "x", "sampler": "euler"}, 422, "sampler"),
    ({"prompt": "x", "sampler": "ddpm"}, 422, "steps"),
    ({"prompt": "x", "guidance": 51}, 422, "guidance"),
    ({"prompt": "x", "guidance": "2"}, 422, "guidance"),
    ({"prompt": "x", "eta": 1.5}, 422, "eta"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "seed": 2**64}, 422, "seed"),
    ({"prompt": "x", "spacing": "karras"}, 422, "spacing"),
    ({"prompt": "x", "negative_prompt": "y", "guidance": 1}, 422, "negative_prompt"),
    ({"prompt": "x", "response_format": "webp"}, 422, "response_format"),
    ({"prompt": "x" * 1001}, 413, "prompt"),
    ({"prompt": "x", "negative_prompt": "y" * 1001}, 413, "negative_prompt"),
]


@pytest.mark.parametrize("body,status,param", BAD_FIELDS)
def test_a_bad_field_is_named(client, body, status, param):
    before = client.get("/api/health").json()
    for path in ("/api/generate", "/api/generate/stream"):
        r = client.post(path, json=body)
        assert r.status_code == status, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and "\n" not in err["message"]
    after = client.get("/api/health").json()
    assert after["done"] == before["done"] and after["batches"] == before["batches"]  # no work


def test_a_default_step_count_over_the_limit_is_refused(gen):
    """Steps a request leaves out come from the model (8 for its DDIM); a server limited to
    5 refuses them, naming the field, before any work."""
    with TestClient(create_app(gen, Limits(max_steps=5))) as c:
        r = c.post("/api/generate", json={"prompt": "x"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "steps"
        assert "default of 8 steps" in r.json()["error"]["message"]
        assert c.get("/api/health").json()["batches"] == {}
        assert c.post("/api/generate", json={"prompt": "x", "steps": 5}).status_code == 200


def test_nan_and_not_json_and_wrong_type_are_refused(client):
    r = client.post("/api/generate", content=b'{"prompt": "x", "guidance": NaN}', headers=JSON)
    assert r.status_code == 422 and r.json()["error"]["param"] == "guidance"
    r = client.post("/api/generate", content=b'{"prompt": ', headers=JSON)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/api/generate", content=b"[1, 2]", headers=JSON)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    # a form post (what another web site could make a browser send) is not JSON
    r = client.post("/api/generate", data={"prompt": "x"})
    assert r.status_code == 415


def test_wrong_method_and_unknown_path_answer_in_the_error_shape(client):
    r = client.get("/api/generate")
    assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"


def test_huge_body_is_refused_before_it_is_read(client):
    """Over max_request_bytes (room for two pictures): refused by its Content-Length, or as
    it arrives; over max_body_bytes besides its pictures: refused once parsed."""
    limit = client.app.state.service.limits.max_request_bytes
    r = client.post("/api/generate", content=b" " * (limit + 1), headers=JSON)
    assert r.status_code == 413 and f"limit of {limit} bytes" in r.json()["error"]["message"]
    big = json.dumps({"prompt": "x", "negative_prompt": "y" * 70_000}).encode()
    r = client.post("/api/generate", content=big, headers=JSON)
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/api/generate", content=chunks(), headers=JSON)
    assert r.status_code == 413


def test_token_required_when_set(gen):
    token = "s3cret-token-0123456789"
    with TestClient(create_app(gen, token=token)) as c:
        for path, body in (
            ("/api/generate", {"prompt": "x"}),
            ("/v1/images/generations", {"prompt": "x"}),
        ):
            r = c.post(path, json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = c.post(path, json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/health").json()["auth"] is True  # public: the page asks it
        assert c.get("/").status_code == 200
        ok = c.post(
            "/api/generate",
            json={"prompt": "x", "seed": 1},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_no_cors_unless_asked(gen):
    pre = {
        "Origin": "http://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with TestClient(create_app(gen)) as c:
        r = c.options("/api/generate", headers=pre)
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(gen, cors_origins=("http://app.example",))) as c:
        r = c.options("/api/generate", headers={**pre, "Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"


# -- against a real server: concurrency, disconnects, batching ---------------------------

LONG = {"prompt": "a long one", "num": 16, "steps": 50, "seed": 1}  # seconds on this CPU


def wait_health(url: str, pred, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(f"{url}/api/health").json()
        if pred(h):
            return h
        assert time.monotonic() < deadline, h
        time.sleep(0.05)


def test_queue_full_is_503_with_retry_after_and_a_closed_stream_cancels(gen):
    with live_app(gen, Limits(max_queue=1)) as (url, _), httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{url}/api/generate/stream", json=LONG) as s:
            lines = s.iter_lines()
            while not next(lines).startswith("event: progress"):
                pass
            r = c.post(f"{url}/api/generate", json={"prompt": "x"})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert "queue is full" in r.json()["error"]["message"]
        # the stream is closed mid-run: the work stops at its next step
        h = wait_health(url, lambda h: h["cancelled"] == 1 and h["running"] == 0, 20)
        assert h["done"] == 0
        assert c.post(f"{url}/api/generate", json={"prompt": "x"}).status_code == 200


def test_retry_after_when_every_admitted_request_is_still_being_resolved(gen):
    """A burst can fill the queue before any request is queued (all still in prepare):
    the refusal is still a 503 with a Retry-After (it was a 500: max() of nothing)."""
    from ddpm_rt.tools.serve.batcher import Batcher, QueueFull

    b = Batcher(gen, Limits(max_queue=2))
    b._preparing = 2  # two admitted requests between admission and the queue
    with pytest.raises(QueueFull) as e:
        b._admit()
    assert e.value.retry_after >= 1
    b.close(0)
    assert b.join(10)


def test_a_client_that_disconnects_cancels_its_work(gen):
    with live_app(gen) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(LONG).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_health(url, lambda h: h["running"] == 1)
        t0 = time.monotonic()
        sock.close()
        h = wait_health(url, lambda h: h["cancelled"] == 1 and h["running"] == 0, 20)
        assert h["done"] == 0 and time.monotonic() - t0 < 10  # not the whole run


def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body at once (one thread each), in order of the list."""
    out: list = [None] * len(bodies)

    def one(k):
        out[k] = httpx.post(f"{url}/api/generate", json=bodies[k], timeout=120)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_batched_requests_are_byte_identical_to_each_alone(gen):
    """Requests with one sampler/steps/eta/spacing that arrive together run as one batch;
    each image equals the same request served alone (its own noise stream), whatever its
    guidance, negative prompt or image count. Another sampler waits for its own batch."""
    bodies = [
        {"prompt": "a red apple", "num": 3, "seed": 11},
        {"prompt": "a blue ball", "num": 1, "seed": 12, "guidance": 1.0},
        {
            "prompt": ["a cat", "a dog"],
            "num": 2,
            "seed": 11,
            "guidance": 3.0,
            "negative_prompt": "a tree",
        },
        {"prompt": "", "num": 1, "seed": 13},
        {"prompt": "a red apple", "num": 1, "seed": 11, "steps": 4},  # another batch
    ]
    # a long request holds the worker while the five queue up (as under load); the window
    # is long enough that a slow thread still joins them
    limits = Limits(batch_window_s=1.0)
    with live_app(gen, limits) as (url, _):
        blocker = threading.Thread(target=post_all, args=(url, [LONG]))
        blocker.start()
        wait_health(url, lambda h: h["running"] == 1)
        rs = post_all(url, bodies)
        blocker.join()
        health = httpx.get(f"{url}/api/health").json()
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    # 3 + 1 + 4 + 1 images together; the other sampler's one alone; the blocker's 16
    assert health["batches"] == {"1": 1, "9": 1, "16": 1}, health
    for body, r in zip(bodies, rs, strict=True):
        kw = {k: v for k, v in body.items() if k != "prompt"}
        alone = gen.generate(body["prompt"], batch_size=1, **kw)
        grid, _ = decode(r.content)
        if len(alone) == 1:
            np.testing.assert_array_equal(grid, alone[0])
        else:
            for k, img in enumerate(alone):  # the grid's cells (1 px gaps)
                ncols = (
                    body["num"]
                    if isinstance(body["prompt"], list)
                    else int(np.ceil(np.sqrt(len(alone))))
                )
                row, col = divmod(k, ncols)
                s = img.shape[0]
                y, x = 1 + row * (s + 1), 1 + col * (s + 1)
                np.testing.assert_array_equal(grid[y : y + s, x : x + s], img)


def test_a_cancelled_request_ends_alone_and_its_batch_finishes(gen):
    """Two requests in one batch; one client goes away mid-run. The other is served, and
    its image is what it gives alone."""
    other = {"prompt": "a blue ball", "num": 2, "seed": 4, "steps": 40}
    with live_app(gen, Limits(batch_window_s=1.0)) as (url, _), httpx.Client(timeout=60) as c:
        blocker = threading.Thread(target=post_all, args=(url, [LONG]))
        blocker.start()
        wait_health(url, lambda h: h["running"] == 1)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=post_all(url, [other])[0]))
        with c.stream("POST", f"{url}/api/generate/stream", json={**LONG, "steps": 40}) as s:
            t.start()
            wait_health(url, lambda h: h["queued"] == 2)
            lines = s.iter_lines()
            while not next(lines).startswith("event: progress"):
                pass
        t.join()
        blocker.join()
        h = httpx.get(f"{url}/api/health").json()
    assert h["cancelled"] == 1 and h["batches"] == {"16": 1, "18": 1}, h
    r = result["r"]
    assert r.status_code == 200, r.text
    grid, _ = decode(r.content)
    alone = gen.generate("a blue ball", num=2, seed=4, steps=40)
    s = alone.shape[1]
    for k in range(2):
        x = 1 + (s + 1) * k
        np.testing.assert_array_equal(grid[1 : s + 1, x : x + s], alone[k])


# -- the command ------------------------------------------------------------------------


def test_sigterm_finishes_or_cancels_within_the_grace_and_exits_0():
    with serve_process("--shutdown-grace", "1", "--threads", "1") as (proc, url):
        with httpx.Client(timeout=60) as c:
            ok = c.post(f"{url}/api/generate", json={"prompt": "x", "seed": 1})
            assert ok.status_code == 200
            result = {}

            def long_request():
                result["r"] = c.post(f"{url}/api/generate", json={**LONG, "steps": 50})

            t = threading.Thread(target=long_request)
            t.start()
            wait_health(url, lambda h: h["running"] == 1)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            took = time.monotonic() - t0
            t.join(30)
    r = result["r"]
    assert r.status_code == 503 and "stopping" in r.json()["error"]["message"]
    assert took < 1 + 2 + 5, took  # the grace, uvicorn's margin, and a loaded machine
    assert "Traceback" not in "".join(proc.log)


def test_serve_refuses_a_public_address_without_a_token():
    p = subprocess.run(
        [sys.executable, "-m", "ddpm_rt.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert p.stderr.startswith("error: --host 0.0.0.0 is reachable from other machines")
    assert len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run(
        [sys.executable, "-m", "ddpm_rt.cli", "serve", "--token", "short"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1 and "at least 16" in p.stderr


def local_address() -> str | None:
    """A non-loopback IPv4 address of this machine, or None (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_another_address_needs_a_token_or_insecure_with_a_warning():
    ip = local_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with serve_process("--host", ip, "--insecure", "--threads", "1") as (proc, url):
        assert url.startswith(f"http://{ip}:")
        assert httpx.get(f"{url}/api/health").json()["auth"] is False
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    log = "".join(proc.log)
    assert "warning: serving" in log and "without a token (--insecure)" in log
    token = "another-address-token-0123"
    with serve_process("--host", ip, "--token", token, "--threads", "1") as (proc, url):
        assert httpx.post(f"{url}/api/generate", json={"prompt": "x"}).status_code == 401
        ok = httpx.post(
            f"{url}/api/generate",
            json={"prompt": "x"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert ok.status_code == 200


def test_without_the_serve_extra_the_command_says_how_to_get_it():
    code = (
        "import sys; sys.modules['uvicorn'] = None\n"  # as if it were not installed
        "from ddpm_rt.cli import main; sys.exit(main(['serve']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "error: this command needs uvicorn (pip install 'ddpm-rt[serve]')"
    ]


def test_a_taken_port_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(
            [sys.executable, "-m", "ddpm_rt.cli", "serve", "--port", str(port),
             "--model", str(tmp_path / "no-such-bundle")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    # the port is refused first: the (missing) bundle is never looked at
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


@pytest.mark.slow
def test_static_files_are_in_the_wheel(tmp_path):
    """The page is package data: build the wheel (pip, isolated build) from a clean copy of
    the source (a checkout's stale build/ folder would hide a missing package-data entry)
    and look inside."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    skip = shutil.ignore_patterns("build", ".venv", ".git", "*.egg-info", "runs", ".ci", "dist")
    shutil.copytree(ROOT, src, ignore=skip)
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    (wheel,) = Path(tmp_path).glob("ddpm_rt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("index.html", "app.js", "style.css"):
        assert f"ddpm_rt/tools/serve/static/{f}" in names
    assert "ddpm_rt/tools/serve/app.py" in names and "ddpm_rt/cli/serve.py" in names


def nan_for_label_0(d: int = 4) -> bytes:
    """A U-Net whose noise is NaN for rows conditioned on label 0 ("thing 0"), finite
    (0.1 x) for every other row: a request for thing 0 fails, its neighbours must not."""
    from craft import C, H, W, _const, _model, _vi
    from onnx import TensorProto, helper

    nodes = [
        _const("k", np.float32(0.1)),
        _const("starts", np.array([0], np.int64)),
        _const("ends", np.array([1], np.int64)),
        _const("axes", np.array([1], np.int64)),
        _const("half", np.float32(0.5)),
        _const("nan", np.float32(np.nan)),
        _const("axes23", np.array([2, 3], np.int64)),
        _const("zero", np.float32(0.0)),
        helper.make_node("Mul", ["x", "k"], ["y0"]),
        helper.make_node("Mul", ["t", "zero"], ["t0"]),  # t stays an input
        helper.make_node("Unsqueeze", ["t0", "axes23"], ["t0b"]),
        helper.make_node("Add", ["y0", "t0b"], ["y"]),
        helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["c0"]),
        helper.make_node("Greater", ["c0", "half"], ["bad"]),
        helper.make_node("Unsqueeze", ["bad", "axes23"], ["badb"]),
        helper.make_node("Where", ["badb", "nan", "y"], ["eps"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unet",
        [
            _vi("x", TensorProto.FLOAT, ["batch", C, H, W]),
            _vi("t", TensorProto.FLOAT, ["batch", 1]),
            _vi("c", TensorProto.FLOAT, ["batch", d]),
        ],
        [_vi("eps", TensorProto.FLOAT, ["batch", C, H, W])],
    )
    return _model(graph)


def test_a_numerical_error_ends_only_its_own_request(tmp_path):
    from craft import write_bundle

    bundle = write_bundle(tmp_path / "b", unet=nan_for_label_0(), labels=4)
    small = Generator(bundle, threads=1)
    good = {"prompt": "thing 1", "num": 2, "seed": 3, "steps": 5}
    bad = {"prompt": "thing 0", "num": 1, "seed": 3, "steps": 5}
    limits = Limits(batch_window_s=1.0, max_images=3000, max_batch=3000)
    with live_app(small, limits) as (url, _):
        # a big request holds the worker (a second or so) while the two below queue up
        blocker = threading.Thread(
            target=post_all, args=(url, [{**good, "num": 3000, "steps": 20}])
        )
        blocker.start()
        wait_health(url, lambda h: h["running"] == 1)
        r_good, r_bad = post_all(url, [good, bad])
        blocker.join()
        health = httpx.get(f"{url}/api/health").json()
        # the generator's own check, before the queue: a label this model does not know
        unknown = httpx.post(f"{url}/api/generate", json={"prompt": "thing 9"})
        assert unknown.status_code == 422
        assert unknown.json()["error"]["message"].startswith("unknown prompt 'thing 9'")
    assert r_bad.status_code == 500
    msg = r_bad.json()["error"]["message"]
    assert msg.startswith("NumericalError: predicted noise at step 1/5") and "NaN" in msg
    assert r_good.status_code == 200, r_good.text
    alone = small.generate("thing 1", num=2, seed=3, steps=5)
    grid, _ = decode(r_good.content)
    for k in range(2):
        np.testing.assert_array_equal(grid[1 : 1 + 8, 1 + k * 9 : 1 + k * 9 + 8], alone[k])
    assert health["failed"] == 1 and health["batches"].get("3") == 1, health


def test_a_latent_bundle_serves_its_decoded_images(latent_trained):
    """The server on a latent bundle (issue 19): images and stream previews are the decoder's
    pixels, byte-equal to the Generator's; /api/info names the latent and the decoder."""
    lgen = Generator(latent_trained["bundle"], threads=1)
    with TestClient(create_app(lgen)) as c:
        info = c.get("/api/info").json()
        assert info["image"] == {"channels": 3, "height": 32, "width": 32}
        assert info["latent"] == {"channels": 4, "height": 8, "width": 8}
        assert info["precisions"]["decoder"] == "fp32"
        r = c.post("/api/generate", json={"prompt": "a small red circle", "seed": 2, "steps": 4})
        pixels, prov = decode(r.content)
        assert pixels.shape == (32, 32, 3)
        assert (prov["decoder"], prov["decoder_precision"]) == ("decoder", "fp32")
        np.testing.assert_array_equal(
            pixels, lgen.generate("a small red circle", num=1, seed=2, steps=4)[0]
        )
        body = {"prompt": "a big blue square", "seed": 1, "steps": 4, "preview_every": 2}
        with c.stream("POST", "/api/generate/stream", json=body) as s:
            text = "".join(s.iter_text())
    previews = [
        json.loads(block.split("data: ", 1)[1])["previews"][0]
        for block in text.strip().split("\n\n")
        if block.startswith("event: progress") and '"previews"' in block
    ]
    assert len(previews) == 2 and all(b64_image(p)[0].shape == (32, 32, 3) for p in previews)
