"""``ddpm-rt serve`` with pictures (issue 28): ``init_image``/``mask`` as base64 in the JSON
API, ``POST /v1/images/edits`` (multipart, the OpenAI API's transparent mask), their
refusals and limits, and batching beside text-to-image."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytest.importorskip("multipart", reason="python-multipart (the serve extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")

from PIL import Image  # noqa: E402
from serving import live_app  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from test_serve import LONG, decode, post_all, wait_health  # noqa: E402

from ddpm_rt.generator import Generator  # noqa: E402
from ddpm_rt.images import load_mask, load_picture  # noqa: E402
from ddpm_rt.tools.serve import Limits, create_app  # noqa: E402

from conftest import ROOT  # noqa: E402

MODEL = ROOT / "models" / "default"


@pytest.fixture(scope="module")
def gen():
    return Generator(MODEL, threads=1)


@pytest.fixture(scope="module")
def client(gen):
    with TestClient(create_app(gen)) as c:
        yield c


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def photo(gen) -> np.ndarray:
    """A 'photo' of another size than the model's (80 x 100): resized by the server."""
    img = gen.generate("a red apple", seed=3)[0]
    return np.asarray(Image.fromarray(img).resize((100, 80), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def left_half() -> np.ndarray:
    m = np.zeros((80, 100), np.uint8)
    m[:, :50] = 255  # white: repaint the left half
    return m


# -- the JSON API ------------------------------------------------------------------------


def test_image_to_image_is_the_generator_s_image(client, gen, photo):
    """A picture as base64 (a PNG) or a data: URL (a JPEG): the PNG answered is
    Generator.generate's image for the same picture file, settings and seed; the
    provenance records the strength and the picture's digest."""
    png = encode(photo)
    body = {"prompt": "a cat", "seed": 4, "strength": 0.6, "init_image": b64(png)}
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    pixels, prov = decode(r.content)
    want = gen.generate("a cat", seed=4, strength=0.6, init_image=photo)[0]
    np.testing.assert_array_equal(pixels, want)
    assert prov["strength"] == 0.6 and len(prov["init_image_sha256"]) == 64
    assert "mask_sha256" not in prov
    jpeg = encode(photo, "JPEG")
    url = "data:image/jpeg;base64," + b64(jpeg)
    r = client.post("/api/generate", json={**body, "init_image": url, "num": 2})
    assert r.status_code == 200, r.text
    decoded = load_picture(jpeg, 80, 100)  # the JPEG's own pixels, not photo's
    want = gen.generate("a cat", seed=4, strength=0.6, num=2, init_image=decoded)
    grid, _ = decode(r.content)
    np.testing.assert_array_equal(grid[1:65, 1:65], want[0])
    np.testing.assert_array_equal(grid[1:65, 66:130], want[1])


def test_inpainting_json_and_stream(client, gen, photo, left_half):
    """A mask (white = repaint) and resample, over JSON and the stream: each image is
    Generator.generate's; the kept half is the picture's."""
    body = {
        "prompt": "a blue ball",
        "seed": 9,
        "num": 2,
        "init_image": b64(encode(photo)),
        "mask": b64(encode(left_half)),
        "strength": 1.0,
        "resample": 1,
        "response_format": "json",
        "steps": 4,
    }
    want = gen.generate(
        "a blue ball",
        seed=9,
        num=2,
        init_image=photo,
        mask=left_half,
        strength=1.0,
        resample=1,
        steps=4,
    )
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["settings"]["resample"] == 1 and len(out["settings"]["mask_sha256"]) == 64
    for k, im in enumerate(out["images"]):
        pixels, prov = decode(base64.b64decode(im["b64_png"]))
        np.testing.assert_array_equal(pixels, want[k])
        assert prov["mask_sha256"] == out["settings"]["mask_sha256"]
    with client.stream("POST", "/api/generate/stream", json=body) as s:
        assert s.status_code == 200
        text = "".join(s.iter_text())
    done = json.loads(text.strip().split("\n\n")[-1].split("data: ", 1)[1])
    for k, im in enumerate(done["images"]):
        np.testing.assert_array_equal(decode(base64.b64decode(im["b64_png"]))[0], want[k])
    keep = ~load_mask(left_half, 64, 64)
    assert np.abs(want[0][keep].astype(int) - load_picture(photo, 64, 64)[keep]).max() <= 1


def test_info_and_openapi_describe_the_pictures(client):
    info = client.get("/api/info").json()
    assert info["limits"]["max_image_bytes"] == 8 << 20
    assert info["inputs"]["strength"] == 0.8 and info["inputs"]["formats"] == [
        "png",
        "jpeg",
        "webp",
    ]
    assert "transparent = repaint" in info["inputs"]["mask"]
    schema = client.get("/openapi.json").json()
    gen_props = schema["paths"]["/api/generate"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]["properties"]
    assert gen_props["init_image"]["contentEncoding"] == "base64"
    assert "light" in gen_props["mask"]["description"]
    assert gen_props["strength"]["maximum"] == 1.0 and gen_props["resample"]["maximum"] == 20
    edit = schema["paths"]["/v1/images/edits"]["post"]
    form = edit["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image", "prompt"]
    assert form["properties"]["image"]["format"] == "binary"
    assert "alpha 0" in form["properties"]["mask"]["description"]
    assert "alpha 0" in edit["description"]
    assert {"strength", "resample", "n", "size", "seed"} <= set(form["properties"])
    openai = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]
    assert "init_image" not in openai["application/json"]["schema"]["properties"]


def _bad_bodies():
    png = b64(encode(np.zeros((8, 8, 3), np.uint8)))
    return [
        ({"prompt": "x", "init_image": "not base64!"}, 422, "init_image", "base64"),
        ({"prompt": "x", "init_image": b64(b"GIF89a...")}, 422, "init_image", "PNG, JPEG"),
        ({"prompt": "x", "init_image": ""}, 422, "init_image", "empty"),
        ({"prompt": "x", "init_image": 5}, 422, "init_image", "base64 string"),
        ({"prompt": "x", "init_image": "data:image/png," + png}, 422, "init_image", "data:"),
        ({"prompt": "x", "init_image": png, "mask": "@@"}, 422, "mask", "base64"),
        ({"prompt": "x", "mask": png}, 422, "mask", "needs an init image"),
        ({"prompt": "x", "strength": 0.5}, 422, "strength", "needs an init image"),
        ({"prompt": "x", "init_image": png, "resample": 2}, 422, "resample", "needs a mask"),
        ({"prompt": "x", "init_image": png, "strength": 1.5}, 422, "strength", "1"),
        ({"prompt": "x", "init_image": png, "mask": png, "resample": 99}, 422, "resample", ""),
    ]


@pytest.mark.parametrize("body,status,param,text", _bad_bodies())
def test_a_bad_picture_field_is_named_before_any_work(client, body, status, param, text):
    before = client.get("/api/health").json()
    for path in ("/api/generate", "/api/generate/stream"):
        r = client.post(path, json=body)
        assert r.status_code == status, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == param and text in err["message"], err
        assert "\n" not in err["message"] and "object at 0x" not in err["message"]
    after = client.get("/api/health").json()
    assert after["done"] == before["done"] and after["batches"] == before["batches"]


def test_a_picture_damaged_after_its_header_is_a_422(client):
    """The header is checked before queueing; pixels that cannot be decoded are found
    when the request is resolved to rows -- still a 422 naming the field, no batch run."""
    png = encode(np.full((32, 32, 3), 7, np.uint8))
    r = client.post("/api/generate", json={"prompt": "x", "init_image": b64(png[:60])})
    assert r.status_code == 422 and r.json()["error"]["param"] == "init_image", r.text
    assert "PNG, JPEG or WebP" in r.json()["error"]["message"]


def test_picture_limits(gen, photo):
    """Each picture within max_image_bytes (413 naming it); the rest of the body within
    max_body_bytes; a body over both together is refused unread."""
    png = encode(photo)
    limits = Limits(max_image_bytes=len(png) - 1, max_body_bytes=2048)
    with TestClient(create_app(gen, limits)) as c:
        r = c.post("/api/generate", json={"prompt": "x", "init_image": b64(png)})
        assert r.status_code == 413 and r.json()["error"]["param"] == "init_image", r.text
        assert f"limit of {len(png) - 1} bytes" in r.json()["error"]["message"]
        small = b64(encode(photo[:8, :8]))
        r = c.post("/api/generate", json={"prompt": "y" * 1000, "init_image": small})
        assert r.status_code == 200, r.text  # the picture does not count against 2048
        body = {"prompt": "x", "negative_prompt": "y" * 3000, "init_image": small}
        r = c.post("/api/generate", json=body)
        assert r.status_code == 413 and "2048 bytes (besides its pictures)" in r.text
        huge = b'{"prompt": "x", "init_image": "' + b"A" * (limits.max_request_bytes + 1)
        r = c.post("/api/generate", content=huge, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and f"{limits.max_request_bytes} bytes" in r.text


def test_the_generations_route_takes_no_picture(client):
    png = b64(encode(np.zeros((8, 8, 3), np.uint8)))
    r = client.post("/v1/images/generations", json={"prompt": "x", "init_image": png})
    assert r.status_code == 422 and r.json()["error"]["param"] == "init_image"
    assert "/v1/images/edits" in r.json()["error"]["message"]


def test_bytes_are_read_as_files_are(tmp_path, photo):
    png = encode(photo)
    (tmp_path / "p.png").write_bytes(png)
    np.testing.assert_array_equal(
        load_picture(png, 64, 64), load_picture(tmp_path / "p.png", 64, 64)
    )
    np.testing.assert_array_equal(
        load_mask(bytearray(png), 16, 16), load_mask(tmp_path / "p.png", 16, 16)
    )


# -- POST /v1/images/edits ----------------------------------------------------------------


def rgba_mask(repaint: np.ndarray) -> bytes:
    """The OpenAI API's mask: fully transparent where the picture is edited."""
    alpha = np.where(repaint > 0, 0, 255).astype(np.uint8)
    rgba = np.dstack([np.full((*repaint.shape, 3), 40, np.uint8), alpha])
    return encode(rgba)


def edit(client, files: dict, **fields):
    data = {k: str(v) for k, v in fields.items()}
    return client.post("/v1/images/edits", files=files, data=data)


def test_edits_route_is_the_generator_s_image(client, gen, photo, left_half):
    """image + prompt: image-to-image; a mask transparent on the left half: the left half
    repainted (our white-on-the-left mask); an image with transparent pixels and no mask:
    those pixels repainted. Each image is Generator.generate's, its settings extensions."""
    png = encode(photo)
    r = edit(client, {"image": ("p.png", png, "image/png")}, prompt="a cat", n=2, seed=4)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    want = gen.generate("a cat", num=2, seed=4, init_image=photo)  # strength 0.8
    for k, d in enumerate(data):
        np.testing.assert_array_equal(decode(base64.b64decode(d["b64_json"]))[0], want[k])
    files = {"image": ("p.png", png, "image/png"), "mask": ("m.png", rgba_mask(left_half))}
    r = edit(client, files, prompt="a dog", seed=5, strength=1, resample=1, steps=4)
    assert r.status_code == 200, r.text
    got, prov = decode(base64.b64decode(r.json()["data"][0]["b64_json"]))
    want = gen.generate(
        "a dog", seed=5, init_image=photo, mask=left_half, strength=1.0, resample=1, steps=4
    )
    np.testing.assert_array_equal(got, want[0])
    assert prov["resample"] == 1 and prov["strength"] == 1.0
    # no mask: the image's own transparent pixels are the area to edit
    rgba = np.dstack([photo, np.where(left_half > 0, 0, 255).astype(np.uint8)])
    files = {"image": ("p.png", encode(rgba), "image/png")}
    r = edit(client, files, prompt="a dog", seed=5, strength=1, steps=4)
    assert r.status_code == 200, r.text
    want = gen.generate("a dog", seed=5, init_image=rgba, mask=left_half, strength=1.0, steps=4)
    np.testing.assert_array_equal(
        decode(base64.b64decode(r.json()["data"][0]["b64_json"]))[0], want[0]
    )


def test_edits_refusals(client, gen, photo):
    png = encode(photo)
    image = {"image": ("p.png", png, "image/png")}
    grey = encode(np.zeros((80, 100), np.uint8))  # our convention: no alpha channel
    small = rgba_mask(np.zeros((8, 8), np.uint8))
    cases = [
        ({}, {"prompt": "x"}, 422, "image", "is required"),
        (image, {}, 422, "prompt", "required"),
        (image, {"prompt": "x", "n": "two"}, 422, "n", "integer"),
        (image, {"prompt": "x", "n": "17"}, 422, "n", "n"),
        (image, {"prompt": "x", "strength": "lots"}, 422, "strength", "number"),
        (image, {"prompt": "x", "strength": "nan"}, 422, "strength", ""),
        (image, {"prompt": "x", "response_format": "url"}, 422, "response_format", "b64_json"),
        (image, {"prompt": "x", "size": "1024x1024"}, 422, "size", "64x64"),
        (image, {"prompt": "x", "colour": "red"}, 422, "colour", "unknown"),
        (image, {"prompt": "x", "resample": "1"}, 422, "resample", "needs a mask"),
        ({"image": ("p.txt", b"hello", "text/plain")}, {"prompt": "x"}, 422, "image", "PNG"),
        ({**image, "mask": ("m.png", grey)}, {"prompt": "x"}, 422, "mask", "alpha channel"),
        ({**image, "mask": ("m.png", small)}, {"prompt": "x"}, 422, "mask", "same size"),
        ({**image, "mask": ("m.png", b"junk")}, {"prompt": "x"}, 422, "mask", "PNG"),
        ({"mask": ("m.png", small)}, {"prompt": "x"}, 422, "image", "required"),
        ({"prompt": ("p.txt", b"x")}, {}, 422, "prompt", "text, not a file"),
    ]
    before = client.get("/api/health").json()
    for files, fields, status, param, text in cases:
        r = client.post("/v1/images/edits", files=files or None, data=fields)
        assert r.status_code == status, (fields, r.text)
        err = r.json()["error"]
        assert err["param"] == param and text in err["message"], (fields, err)
        assert "\n" not in err["message"]
    # the image as a text field, not a file
    r = client.post("/v1/images/edits", data={"prompt": "x", "image": b64(png)})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"
    # two images
    two = [("image", ("a.png", png)), ("image", ("b.png", png))]
    r = client.post("/v1/images/edits", files=two, data={"prompt": "x"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"
    # JSON is not this route's body
    r = client.post("/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
    after = client.get("/api/health").json()
    assert after["done"] == before["done"] and after["batches"] == before["batches"]


def test_edits_upload_limits(gen, photo):
    png = encode(photo)
    with TestClient(create_app(gen, Limits(max_image_bytes=len(png) - 1))) as c:
        r = c.post("/v1/images/edits", files={"image": ("p.png", png)}, data={"prompt": "x"})
        assert r.status_code == 413 and r.json()["error"]["param"] == "image", r.text
    with TestClient(create_app(gen, Limits(max_image_bytes=100, max_body_bytes=1024))) as c:
        limit = c.app.state.service.limits.max_request_bytes
        big = encode(np.random.default_rng(0).integers(0, 255, (80, 100, 3), np.uint8))
        assert len(big) > limit
        r = c.post("/v1/images/edits", files={"image": ("p.png", big)}, data={"prompt": "x"})
        assert r.status_code == 413 and f"limit of {limit} bytes" in r.text
        r = c.post(
            "/v1/images/edits", files={"image": ("p.png", b"x")}, data={"prompt": "y" * 2000}
        )
        assert r.status_code == 413 and "1KB" in r.text  # a text part over 1024 bytes


# -- batching ----------------------------------------------------------------------------


def test_text_and_picture_requests_batch_by_their_starting_step(gen, photo, left_half):
    """Concurrent requests: text-to-image, two image-to-image at one strength (one batch),
    one at another strength, an inpainting: each is the same bytes as alone; the pictures'
    requests batch only with their own starting step and inpainting."""
    png, mask = b64(encode(photo)), b64(encode(left_half))
    bodies = [
        {"prompt": "a cat", "seed": 11},
        {"prompt": "a cat", "seed": 11, "init_image": png, "strength": 0.5},
        {"prompt": "a dog", "seed": 12, "init_image": png, "strength": 0.5, "num": 2},
        {"prompt": "a cat", "seed": 11, "init_image": png, "strength": 0.75},
        {"prompt": "a cat", "seed": 11, "init_image": png, "strength": 0.5, "mask": mask},
    ]
    pictures = {"init_image": photo, "mask": left_half}
    with live_app(gen, Limits(batch_window_s=1.0)) as (url, _):
        blocker = __import__("threading").Thread(target=post_all, args=(url, [LONG]))
        blocker.start()
        wait_health(url, lambda h: h["running"] == 1)
        rs = post_all(url, bodies)
        blocker.join()
        health = httpx.get(f"{url}/api/health").json()
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    # the two at strength 0.5 without a mask together (1 + 2); the rest each alone
    assert health["batches"] == {"1": 3, "3": 1, "16": 1}, health
    for body, r in zip(bodies, rs, strict=True):
        kw = {k: pictures.get(k, v) for k, v in body.items() if k != "prompt"}
        alone = gen.generate(body["prompt"], batch_size=1, **kw)
        grid, _ = decode(r.content)
        if len(alone) == 1:
            np.testing.assert_array_equal(grid, alone[0])
        else:
            for k, img in enumerate(alone):
                np.testing.assert_array_equal(grid[1:65, 1 + 65 * k : 65 + 65 * k], img)


def test_a_picture_s_json_escapes_do_not_count_against_the_body_limit(gen):
    """Some JSON writers escape every "/" of a base64 picture as "\\/": the body limit
    counts the fields besides the pictures, not the pictures' escapes."""
    noise = np.random.default_rng(1).integers(0, 255, (80, 100, 3), np.uint8)
    text = b64(encode(noise))
    escaped = json.dumps({"prompt": "x", "init_image": text}).replace("/", "\\/")
    assert len(escaped) - len(text) > 256
    with TestClient(create_app(gen, Limits(max_body_bytes=256))) as c:
        r = c.post("/api/generate", content=escaped, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text


def test_edits_takes_the_sdk_s_list_name_and_says_when_forms_cannot_be_read(
    client, gen, photo, monkeypatch
):
    """``image[]`` (how the OpenAI SDK names a list of images) is ``image``; a server
    without python-multipart answers the route with one line saying what to install."""
    from starlette import formparsers

    png = encode(photo)
    r = client.post("/v1/images/edits", files={"image[]": ("p.png", png)}, data={"prompt": "x"})
    assert r.status_code == 200, r.text
    monkeypatch.setattr(formparsers, "multipart", None)
    r = client.post("/v1/images/edits", files={"image": ("p.png", png)}, data={"prompt": "x"})
    assert r.status_code == 501 and "python-multipart" in r.json()["error"]["message"]
