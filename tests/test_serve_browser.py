"""The page in a real browser: Debian's headless Chromium, driven by Playwright (no browser
download), against a real ``ddpm-rt serve`` process on a free loopback port.

Screenshots go to $DDPM_RT_SCREENSHOT_DIR (default: the test's temporary folder)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) is not installed")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright (dev extra) is not installed"
)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)

from PIL import Image  # noqa: E402
from serving import serve_process  # noqa: E402

from ddpm_rt.generator import Generator  # noqa: E402
from ddpm_rt.images import PROVENANCE_KEY  # noqa: E402

from conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 3,
    "is_mobile": True,
    "has_touch": True,
}


@pytest.fixture(scope="module")
def server():
    with serve_process("--threads", "1") as (_proc, url):
        yield url


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as p:
        yield p


def browser(playwright, profile: Path, **context):
    """A fresh Chromium profile (its own --user-data-dir) for each page."""
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS, **context
    )


def decode_src(src: str) -> tuple[np.ndarray, dict]:
    assert src.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
        return np.asarray(img.convert("RGB")), json.loads(img.text[PROVENANCE_KEY])


def shots(tmp_path: Path) -> Path:
    d = Path(os.environ.get("DDPM_RT_SCREENSHOT_DIR", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def generate_on_page(page, url: str, prompt: str, num: int, seed: int) -> list:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"{r.url} {r.failure}"))
    page.goto(url)
    page.locator("#sampler option").first.wait_for(state="attached")
    page.fill("#prompt", prompt)
    page.fill("#num", str(num))
    page.fill("#seed", str(seed))
    page.click("#generate")
    page.locator("#results figure img").nth(num - 1).wait_for(timeout=120_000)
    assert not errors, errors
    return page.query_selector_all("#results figure img")


def check_images(imgs, gen, prompt: str, num: int, seed: int) -> None:
    alone = gen.generate(prompt, num=num, seed=seed)
    for k, img in enumerate(imgs):
        pixels, prov = decode_src(img.get_attribute("src"))
        assert pixels.std() > 10, "a blank image"  # not one flat colour
        np.testing.assert_array_equal(pixels, alone[k])
        assert prov["prompt"] == prompt and prov["seed"] == seed and prov["image_index"] == k
        assert prov["num"] == num and prov["sampler"] == "ddim" and prov["steps"] == 8
        assert prov["bundle_digest"] == gen.bundle.digest
        box = img.bounding_box()
        assert box["width"] >= 64, box  # shown enlarged, not 16 px
        style = img.evaluate("e => getComputedStyle(e).imageRendering")
        assert style == "pixelated"


def test_page_generates_in_a_real_browser(server, playwright, tmp_path):
    gen = Generator(ROOT / "models" / "default", threads=1)
    ctx = browser(playwright, tmp_path / "profile", viewport={"width": 1200, "height": 900})
    try:
        page = ctx.new_page()
        imgs = generate_on_page(page, server, "a red apple", 4, 42)
        check_images(imgs, gen, "a red apple", 4, 42)
        assert page.inner_text("#status").startswith("done")
        assert not page.is_visible("#token-box")  # this server needs no token
        assert "seed 42" in page.inner_text("#results figcaption")
        assert len(page.query_selector_all("#preview img")) == 4  # the previews were shown
        link = page.query_selector("#results figcaption a")
        assert link.get_attribute("download") == "ddpm-rt-42-0.png"
        page.screenshot(path=str(shots(tmp_path) / "serve-desktop.png"), full_page=True)
    finally:
        ctx.close()


def test_page_on_a_phone_sized_screen(server, playwright, tmp_path):
    gen = Generator(ROOT / "models" / "default", threads=1)
    ctx = browser(playwright, tmp_path / "profile", **PHONE)
    try:
        page = ctx.new_page()
        imgs = generate_on_page(page, server, "a blue ball", 2, 7)
        check_images(imgs, gen, "a blue ball", 2, 7)
        # nothing wider than the screen: no sideways scrolling on a phone
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(shots(tmp_path) / "serve-phone.png"), full_page=True)
    finally:
        ctx.close()


def test_cancel_button_stops_the_work(server, playwright, tmp_path):
    ctx = browser(playwright, tmp_path / "profile")
    try:
        page = ctx.new_page()
        page.goto(server)
        page.locator("#sampler option").first.wait_for(state="attached")
        before = httpx.get(f"{server}/api/health").json()
        page.fill("#prompt", "a long one")
        page.fill("#num", "16")
        page.fill("#steps", "50")
        page.click("#generate")
        sync_api.expect(page.locator("#status")).to_have_text(re.compile("^step"))
        page.click("#cancel")
        sync_api.expect(page.locator("#status")).to_have_text("cancelled")
        for _ in range(200):
            h = httpx.get(f"{server}/api/health").json()
            if h["cancelled"] > before["cancelled"] and h["running"] == 0:
                break
            page.wait_for_timeout(50)
        assert h["cancelled"] == before["cancelled"] + 1 and h["done"] == before["done"], h
        assert page.is_enabled("#generate")
    finally:
        ctx.close()


def test_page_asks_for_the_token_when_the_server_needs_one(playwright, tmp_path):
    token = "browser-test-token-0123456789"
    with serve_process("--threads", "1", "--token", token) as (_proc, url):
        ctx = browser(playwright, tmp_path / "profile")
        try:
            page = ctx.new_page()
            page.goto(url)
            sync_api.expect(page.locator("#token-box")).to_be_visible()
            page.fill("#prompt", "a red apple")
            page.click("#generate")
            sync_api.expect(page.locator("#status")).to_contain_text("bearer token")
            page.fill("#token", token)
            page.click("#generate")
            page.locator("#results figure img").first.wait_for(timeout=120_000)
            assert page.inner_text("#status").startswith("done")
        finally:
            ctx.close()


# -- a picture to start from (issue 28) ---------------------------------------------------


def start_picture(gen, tmp_path: Path) -> Path:
    """A picture of another size than the model's (80 x 100), as a PNG file."""
    img = Image.fromarray(gen.generate("a red apple", seed=3)[0]).resize((100, 80))
    path = tmp_path / "start.png"
    img.save(path)
    return path


def drop_file(page, path: Path) -> None:
    """Drag-and-drop of a file onto the drop zone, as a browser dispatches it."""
    page.evaluate(
        """([b64, name]) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], name, { type: "image/png" }));
          const drop = document.getElementById("drop");
          const init = { dataTransfer: dt, bubbles: true, cancelable: true };
          for (const type of ["dragenter", "dragover", "drop"])
            drop.dispatchEvent(new DragEvent(type, init));
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name],
    )


def sent_body(page, click: str) -> dict:
    """Click, and return the JSON body the page sent to the stream endpoint."""
    with page.expect_request(lambda r: r.url.endswith("/api/generate/stream")) as req:
        page.click(click)
    return json.loads(req.value.post_data)


def data_url_bytes(url: str) -> bytes:
    head, data = url.split(",", 1)
    assert head.endswith(";base64"), head
    return base64.b64decode(data)


def picture_flow(page, url: str, gen, tmp_path: Path, *, drop: bool, shot: str) -> None:
    """Drop (or pick) a picture, set the strength, paint a stroke across the middle, generate:
    the page sends the file's bytes, the strength and a white-on-black mask, and shows
    Generator.generate's image for them. Then a click on the result makes it the next
    picture (the mask cleared): the next request starts from that PNG."""
    from ddpm_rt.images import load_mask

    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.locator("#sampler option").first.wait_for(state="attached")
    page.fill("#prompt", "a blue ball")
    page.fill("#num", "1")
    page.fill("#seed", "21")
    assert not page.is_visible("#strength")  # only with a picture
    path = start_picture(gen, tmp_path)
    if drop:
        drop_file(page, path)
    else:
        page.set_input_files("#picture", str(path))
    sync_api.expect(page.locator("#strength")).to_be_visible()
    page.fill("#strength", "0.6")
    sync_api.expect(page.locator("#strength-out")).to_have_text("0.6")
    box = page.locator("#mask").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 2, y, steps=12)
    page.mouse.up()
    page.screenshot(path=str(shots(tmp_path) / shot), full_page=True)  # the mask painted
    body = sent_body(page, "#generate")
    assert body["strength"] == 0.6
    assert data_url_bytes(body["init_image"]) == path.read_bytes()  # the file, as it is
    mask = data_url_bytes(body["mask"])
    repaint = load_mask(mask, 64, 64)
    assert repaint[32].all() and not repaint[:8].any() and not repaint[-8:].any()
    page.locator("#results figure img").first.wait_for(timeout=120_000)
    first = page.query_selector("#results figure img")
    pixels, prov = decode_src(first.get_attribute("src"))
    want = gen.generate("a blue ball", seed=21, strength=0.6, init_image=path, mask=mask)
    np.testing.assert_array_equal(pixels, want[0])
    assert prov["strength"] == 0.6 and "mask_sha256" in prov
    # the result as the next picture: a click on it
    first.click()
    assert page.get_attribute("#picture-img", "src") == first.get_attribute("src")
    page.fill("#strength", "0.3")
    body = sent_body(page, "#generate")
    assert body["init_image"] == first.get_attribute("src") and "mask" not in body
    page.locator("#results figure img").nth(1).wait_for(timeout=120_000)
    newest = page.query_selector("#results figure img")  # results are newest first
    want = gen.generate("a blue ball", seed=21, strength=0.3, init_image=pixels)
    np.testing.assert_array_equal(decode_src(newest.get_attribute("src"))[0], want[0])
    page.click("#remove-picture")
    assert not page.is_visible("#strength") and "init_image" not in sent_body(page, "#generate")
    page.locator("#results figure img").nth(2).wait_for(timeout=120_000)
    assert not errors, errors


def test_page_starts_from_a_dropped_picture_and_a_painted_mask(server, playwright, tmp_path):
    gen = Generator(ROOT / "models" / "default", threads=1)
    ctx = browser(playwright, tmp_path / "profile", viewport={"width": 1200, "height": 900})
    try:
        page = ctx.new_page()
        picture_flow(page, server, gen, tmp_path, drop=True, shot="serve-img2img-desktop.png")
    finally:
        ctx.close()


def test_page_starts_from_a_picked_picture_on_a_phone(server, playwright, tmp_path):
    gen = Generator(ROOT / "models" / "default", threads=1)
    ctx = browser(playwright, tmp_path / "profile", **PHONE)
    try:
        page = ctx.new_page()
        picture_flow(page, server, gen, tmp_path, drop=False, shot="serve-img2img-phone.png")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        ctx.close()
