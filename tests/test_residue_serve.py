"""Issue 25's serving residue, each case failing before its fix: an error path that cannot
encode what the client sent, fields named as the server calls them rather than as the
client sent them, and a warning per abandoned stream."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")

from starlette.testclient import TestClient  # noqa: E402

from ddpm_rt.generator import Generator  # noqa: E402
from ddpm_rt.tools.serve import create_app  # noqa: E402

from conftest import ROOT  # noqa: E402

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Generator(ROOT / "models" / "default", threads=1))) as c:
        yield c


PATHS = ["/api/generate", "/v1/images/generations", "/api/generate/stream"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "body",
    [
        b'{"\\ud800": 1, "prompt": "a cat"}',  # a lone surrogate as a field's name
        b'{"prompt": "a cat", "sampler": "\\udfff"}',  # ... and as a value
        b'{"prompt": "a cat", "negative_prompt": ["\\ud800x:2"]}',
    ],
)
def test_an_error_echoing_a_lone_surrogate_is_still_a_json_422(client, path, body):
    """Python's json reads a lone surrogate (\\ud800) into a str that UTF-8 cannot encode:
    the 422 was built, then rendering it failed -- a plain-text 500 and a traceback per
    request. Every error body is now ASCII JSON (\\uXXXX escapes)."""
    r = client.post(path, content=body, headers=JSON)
    assert r.status_code == 422, (r.status_code, r.text[:200])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


@pytest.mark.parametrize("n", [0, -1, "two", 10_000, 2.5])
def test_openai_errors_name_the_field_the_client_sent(client, n):
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "n": n})
    assert r.status_code in (413, 422), r.text
    err = r.json()["error"]
    assert err["param"] == "n", err
    assert "num" not in err["message"], err


@pytest.mark.parametrize(
    "neg", [" | a cat", "a dog:9999999 | a cat:1", "a dog:-1|a cat", "a dog:0|a cat:0"]
)
def test_a_bad_blend_weight_names_the_field_it_is_in(client, neg):
    """Blends were parsed by the generator, after queueing: the 422 had ``param: null``."""
    r = client.post("/api/generate", json={"prompt": "a cat", "negative_prompt": neg})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "negative_prompt", r.json()
    r = client.post("/api/generate", json={"prompt": ["a cat", neg]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "prompt", r.json()


def test_an_abandoned_stream_leaves_no_pending_task(client, caplog):
    """Each stream a client abandoned mid-run logged "Task was destroyed but it is pending!"
    (the wait for its next step event was never cancelled): three streams dropped after
    their first progress event, then the garbage collector and asyncio's log."""
    import gc
    import logging
    import time

    long = {"prompt": "a long one", "num": 16, "steps": 50, "seed": 1}  # seconds here
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(3):
            with client.stream("POST", "/api/generate/stream", json=long) as s:
                lines = s.iter_lines()
                while "progress" not in next(lines):
                    pass
        deadline = time.monotonic() + 30  # until the server has dropped that work
        while client.get("/api/health").json()["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        gc.collect()
    assert "Task was destroyed" not in caplog.text, caplog.text[-1000:]
