"""The ASGI app: the HTTP API, the page, and the refusals, over one :class:`Batcher`.

Endpoints (docs/serving.md; the OpenAPI document at ``/openapi.json``): ``POST
/api/generate`` (PNG or JSON), ``POST /api/generate/stream`` (server-sent events with x̂0
previews), ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (the OpenAI images
API's shapes), ``GET /api/info``, ``GET /api/health``, and the page at ``/``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette import formparsers
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.responses import JSONResponse as _StarletteJSON
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ddpm_rt import __version__
from ddpm_rt.config import DEFAULT_STRENGTH, MAX_RESAMPLE, GenerateConfig
from ddpm_rt.core.samplers import DEFAULT_DDIM_ETA, DEFAULT_STEPS, SAMPLERS, SPACINGS
from ddpm_rt.errors import Cancelled, InputError, first_line
from ddpm_rt.images import (
    INPUT_FORMATS,
    MASK_THRESHOLD,
    MAX_INPUT_PIXELS,
    PROVENANCE_KEY,
    check_picture_header,
    make_grid,
    transparent_mask,
)
from ddpm_rt.tools.serve.api import (
    OPENAI_NAMES,
    PICTURES,
    GenerateRequest,
    Limits,
    RequestError,
    openapi_schema,
    parse_edit_form,
    parse_generate,
    parse_openai,
    rename_param,
)
from ddpm_rt.tools.serve.batcher import Batcher, QueueFull, Stopping, Ticket

STATIC = Path(__file__).resolve().parent / "static"
# The page loads nothing from elsewhere (the device may be offline) and runs no inline script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
JSON_TYPE = "application/json"
PUBLIC = ("/", "/api/health", "/openapi.json")  # no token needed; nothing here runs the model


class JSONResponse(_StarletteJSON):
    """Every JSON body as ASCII (non-ASCII as \\uXXXX escapes): a request can carry strings
    UTF-8 cannot encode (a lone surrogate, e.g. a field named "\\ud800", which Python's json
    reads into a str), and an error that echoes one must still be a 422, not a 500."""

    def render(self, content) -> bytes:
        text = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        return text.encode()


def error_response(status: int, message: str, param: str | None = None, headers=None):
    """Every refusal has one body shape (the OpenAI API's): error.message names the problem,
    error.param the field at fault."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def png_bytes(images: np.ndarray, provenance: dict | None = None, ncols: int | None = None):
    """One image (H, W, 3) or several as a grid, as PNG bytes with the ``ddpm-rt`` text
    chunk (the same one the CLI writes; ``ddpm-rt info FILE.png`` reads it)."""
    if images.ndim == 4:
        images = images[0] if len(images) == 1 else make_grid(images, ncols)
    info = None
    if provenance is not None:
        info = PngInfo()
        info.add_itxt(PROVENANCE_KEY, json.dumps(provenance, ensure_ascii=False))
    buf = io.BytesIO()
    Image.fromarray(images, "RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def openai_mask(image: bytes, mask: bytes | None):
    """``/v1/images/edits``' mask in the OpenAI API's convention (fully transparent = the
    area to edit) -> ours, (H, W) uint8 with 255 = repaint; without a mask, the image's own
    fully transparent pixels, if it has any (else None: the whole image, by strength)."""
    try:
        iw, ih = check_picture_header(image, "image")
        if mask is None:
            alpha = transparent_mask(image, "image")
            return alpha if alpha is not None and alpha.any() else None
        mw, mh = check_picture_header(mask, "mask")
        if (mw, mh) != (iw, ih):
            raise RequestError(
                422,
                f"mask is {mw}x{mh} pixels, image {iw}x{ih}: they must be the same size",
                "mask",
            )
        ours = transparent_mask(mask, "mask")
    except InputError as e:
        raise RequestError(422, first_line(e), e.field) from None
    if ours is None:
        raise RequestError(
            422,
            "mask must have an alpha channel: on this route (as in OpenAI's API) its fully "
            "transparent pixels are the area to edit",
            "mask",
        )
    return ours


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Service:
    """What the endpoints share: the generator's facts, the limits, the batcher."""

    def __init__(self, generator, limits: Limits, token: str | None):
        self.gen = generator
        self.limits = limits
        self.token = token
        self.batcher = Batcher(generator, limits)
        b = generator.bundle
        shapes = [b.output_shape(s) for s in b.sizes]
        self.sizes = {f"{w}x{h}": h for _, h, w in shapes}  # the OpenAI route's "WxH"
        # Decoding a picture or parsing a big body before a request is queued: at most two
        # at a time, so that a burst of uploads cannot hold many decoded pictures at once.
        # (a thread semaphore: bound to no event loop)
        self._decoding = threading.BoundedSemaphore(2)

    def _bounded(self, fn, *args):
        with self._decoding:
            return fn(*args)

    async def _off_loop(self, fn, *args):
        """``fn(*args)`` in a worker thread, at most two at a time (:attr:`_decoding`)."""
        return await run_in_threadpool(self._bounded, fn, *args)

    # -- requests -----------------------------------------------------------------------
    async def read_body(self, request: Request, kind: str) -> bytes:
        """The body, refused before it is read when its Content-Type is not ``kind`` or it
        is over :attr:`Limits.max_request_bytes` (by its Content-Length, or as it arrives)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != kind:  # JSON: also, a cross-site form cannot post here
            what = "JSON (Content-Type: application/json)" if kind == JSON_TYPE else kind
            raise RequestError(415, f"the body must be {what}")
        body = bytearray()
        async for chunk in self.limited_stream(request):
            body += chunk
        return bytes(body)

    async def limited_stream(self, request: Request):
        """The body's chunks, cut off with a 413 past :attr:`Limits.max_request_bytes`."""
        limit = self.limits.max_request_bytes
        too_big = f"the body is over this server's limit of {limit} bytes"
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise RequestError(413, too_big)
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise RequestError(413, too_big)
            yield chunk

    async def read_json(self, request: Request):
        """The body as JSON: at most ``max_body_bytes`` besides its pictures (``init_image``,
        ``mask``), refused unread when over :attr:`Limits.max_request_bytes`."""
        body = await self.read_body(request, JSON_TYPE)
        limit = self.limits.max_body_bytes
        too_big = f"the body is over this server's limit of {limit} bytes (besides its pictures)"
        try:  # a big body (pictures) is parsed off the event loop: other clients go on
            value = (
                json.loads(body) if len(body) <= limit else await self._off_loop(json.loads, body)
            )
        except (ValueError, RecursionError) as e:
            if len(body) > limit:  # whatever it is, it is too big
                raise RequestError(413, too_big) from None
            raise RequestError(400, f"the body is not valid JSON: {first_line(e)}") from None
        if len(body) > limit and isinstance(value, dict):
            # the rest as JSON (a picture's raw length would count escapes such as "\/")
            rest = {k: v for k, v in value.items() if k not in PICTURES}
            text = json.dumps(rest, ensure_ascii=False, separators=(",", ":"))
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise RequestError(413, too_big)
        elif len(body) > limit:
            raise RequestError(413, too_big)
        return value

    async def read_edit(self, request: Request) -> GenerateRequest:
        """``/v1/images/edits``' multipart/form-data body -> a request: ``image`` and ``mask``
        files (each within ``max_image_bytes``), the other fields text; the mask's
        transparent pixels (the OpenAI API's convention) turned into ours. (Long: each part
        of the form is read and bounded in turn.)"""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/x-www-form-urlencoded":  # a form without a file
            raise RequestError(
                422, "image is required: send it as a file (multipart/form-data)", "image"
            )
        if ctype != "multipart/form-data":
            raise RequestError(415, "the body must be multipart/form-data (a file named image)")
        if formparsers.multipart is None:
            raise RequestError(
                501,
                "this server cannot read forms: install python-multipart (the serve extra: "
                "pip install 'ddpm-rt[serve]')",
            )
        parser = MultiPartParser(
            request.headers,
            self.limited_stream(request),
            max_files=len(PICTURES),
            max_fields=64,
            max_part_size=self.limits.max_body_bytes,
        )
        try:
            form = await parser.parse()
        except MultiPartException as e:  # over max_part_size or max_files, or malformed
            big = "maximum" in str(e).lower()
            raise RequestError(
                413 if big else 400,
                f"the form is {'over this server limits' if big else 'not valid'}: {first_line(e)}",
            ) from None
        try:
            fields, files = [], {}
            for name, value in form.multi_items():
                if name in ("image[]", "mask[]"):  # the OpenAI SDK's name for a list
                    name = name[:-2]
                if name not in ("image", "mask"):
                    if not isinstance(value, str):
                        raise RequestError(422, f"{name!r:.60} must be text, not a file", name)
                    fields.append((name, value))
                    continue
                if isinstance(value, str):
                    raise RequestError(422, f"{name} must be a file (multipart/form-data)", name)
                if name in files:
                    raise RequestError(422, f"one {name} per request", name)
                data = await value.read(self.limits.max_image_bytes + 1)
                if len(data) > self.limits.max_image_bytes:
                    raise RequestError(
                        413,
                        f"{name} is over this server's limit of {self.limits.max_image_bytes} "
                        "bytes per picture",
                        name,
                    )
                files[name] = data
        finally:
            await form.close()
        if "image" not in files:
            raise RequestError(422, "image is required (a PNG, JPEG or WebP file)", "image")
        body = parse_edit_form(fields)
        image = files["image"]
        mask = await self._off_loop(openai_mask, image, files.get("mask"))
        return parse_openai(body, self.limits, self.sizes, image=image, mask=mask)

    def provenance(self, ticket: Ticket) -> dict:
        """The settings that made a request's images: the CLI's PNG chunk, as the run
        resolved them (:meth:`Generator.provenance`)."""
        return self.gen.provenance(ticket.job)

    def image_list(self, ticket: Ticket) -> list[dict]:
        """Each image as its own PNG whose chunk also says which (prompt, image index) it is:
        image i of a prompt is image i of ``ddpm-rt --prompt P --seed S --num i+1``."""
        r, out = ticket.request, []
        settings = self.provenance(ticket)
        for k, img in enumerate(ticket.images):
            j, i = divmod(k, r.config.num)
            prov = {**settings, "prompt": r.prompts[j], "image_index": i}
            out.append(
                {
                    "index": k,
                    "prompt": r.prompts[j],
                    "image_index": i,
                    "b64_png": b64(png_bytes(img, prov)),
                }
            )
        return out

    def result_json(self, ticket: Ticket) -> dict:
        r = ticket.request
        return {
            "seed": r.config.seed,
            "seed_was_random": r.seed_was_random,
            "settings": self.provenance(ticket),
            "batch_images": ticket.batch_images,
            "images": self.image_list(ticket),
        }

    async def run(self, request: Request, r: GenerateRequest) -> Ticket:
        """Queue a request and wait for it; the client going away cancels it."""
        ticket = await self.batcher.submit(r)
        work = asyncio.ensure_future(ticket.wait())
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            ticket.cancel()
            work.cancel()
            raise ClientDisconnect()
        return work.result()

    def failure(self, ticket: Ticket):
        """The response for a ticket that ended without images, or None."""
        e = ticket.error
        if e is None:
            return None
        if isinstance(e, Cancelled):
            if self.batcher.status()["status"] == "stopping":
                return error_response(503, "the server is stopping; the request was cancelled")
            return error_response(499, f"cancelled: {first_line(e)}")
        if isinstance(e, InputError):
            return error_response(422, first_line(e))
        return error_response(500, f"{type(e).__name__}: {first_line(e)}")

    def info(self) -> dict:
        b = self.gen.bundle
        c, h, w = b.image_shape
        # the model's own settings: the running U-Net's (a distilled one has its own)
        d = GenerateConfig().with_defaults(b.recommended_for(self.gen.unet_variant))
        steps = {s: DEFAULT_STEPS.get(s) for s in SAMPLERS}
        steps[d.sampler] = d.steps or steps[d.sampler]
        text = b.conditioning.get("text") or {}
        return {
            "bundle_digest": b.digest,
            "image": {"channels": c, "height": h, "width": w},
            "latent": None
            if b.latent is None
            else dict(zip(("channels", "height", "width"), b.sample_shape, strict=True)),
            "sizes": list(b.sizes),
            "conditioning": b.conditioning["kind"],
            "labels": b.label_names or None,
            "defaults": {
                "sampler": d.sampler,
                "guidance": d.guidance,
                "num": d.num,
                "eta": DEFAULT_DDIM_ETA if d.eta is None else d.eta,
                "spacing": d.spacing or "time",
                "steps": steps,
            },
            "inputs": {  # image-to-image and inpainting: init_image, mask, strength, resample
                "formats": [f.lower() for f in INPUT_FORMATS],
                "strength": DEFAULT_STRENGTH,
                "max_resample": MAX_RESAMPLE,
                "mask": f"light (grey >= {MASK_THRESHOLD}) = repaint, dark or transparent = "
                "keep; /v1/images/edits: fully transparent = repaint (the OpenAI API's)",
            },
            "samplers": list(SAMPLERS),
            "spacings": list(SPACINGS),
            "precisions": {
                "unet": self.gen.unet_precision,
                "unet_available": list(b.unet_precisions),
                "text": self.gen.text_precision,
                "text_available": list(text.get("graphs", {})),
                "decoder": self.gen.decoder_precision,
                "decoder_available": list(b.decoder_precisions),
                # a distilled U-Net (issue 29): what it was distilled for; a guidance-
                # distilled one refuses a negative prompt
                "unet_distilled": self.gen.distilled,
            },
            "backend": self.gen.backend.name,
            "limits": {
                "max_images": self.limits.max_images,
                "max_steps": self.limits.max_steps,
                "max_prompt_chars": self.limits.max_prompt_chars,
                "max_body_bytes": self.limits.max_body_bytes,
                "max_image_bytes": self.limits.max_image_bytes,
                "max_image_pixels": MAX_INPUT_PIXELS,
                "max_queue": self.limits.max_queue,
                "max_batch": self.limits.max_batch,
            },
            "auth": self.token is not None,
            "ddpm_rt": __version__,
        }


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def refusal(e: Exception):
    """The answer to a request refused before it ran (bad input, a full queue, stopping)."""
    if isinstance(e, RequestError):
        return error_response(e.status, e.message, e.param)
    if isinstance(e, QueueFull):
        return error_response(503, str(e), headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, Stopping):
        return error_response(503, "the server is stopping", headers={"Retry-After": "5"})
    if isinstance(e, InputError):  # the generator's own check (e.g. a label bundle's names)
        return error_response(422, first_line(e), e.field)
    raise e


def _generate_endpoints(svc: Service):
    """``POST /api/generate``, ``POST /v1/images/generations`` and ``POST /v1/images/edits``:
    parse, queue, wait, answer."""

    async def answer(request: Request, parse, respond, names: dict | None = None):
        """Parse, queue, wait; then ``respond(ticket)``, or the refusal or failure.
        ``parse(request)`` reads and checks the body; ``names``: fields the route calls
        otherwise (its refusals say the route's names)."""
        try:
            ticket = await svc.run(request, await parse(request))
        except InputError as e:  # the generator's own check, e.g. a picture's pixels
            return refusal(rename_param(RequestError(422, first_line(e), e.field), names or {}))
        except RequestError as e:
            return refusal(rename_param(e, names or {}))
        except (QueueFull, Stopping) as e:
            return refusal(e)
        except ClientDisconnect:
            return Response(status_code=499)
        bad = svc.failure(ticket)
        return respond(ticket) if bad is None else bad

    def as_png_or_json(ticket: Ticket):
        r = ticket.request
        if r.response_format == "json":
            return JSONResponse(
                svc.result_json(ticket), headers={"Server-Timing": ticket.server_timing()}
            )
        ncols = r.config.num if len(r.prompts) > 1 else None  # one grid row per prompt
        png = png_bytes(ticket.images, svc.provenance(ticket), ncols)
        headers = {"X-Seed": str(r.config.seed), "Server-Timing": ticket.server_timing()}
        return Response(png, media_type="image/png", headers=headers)

    def as_openai(ticket: Ticket):
        data = [
            {"b64_json": im["b64_png"], "revised_prompt": im["prompt"]}
            for im in svc.image_list(ticket)
        ]
        seed = ticket.request.config.seed
        return JSONResponse({"created": int(time.time()), "data": data, "seed": seed})

    async def generate(request: Request):
        async def parse(request):
            return parse_generate(await svc.read_json(request), svc.limits)

        return await answer(request, parse, as_png_or_json)

    async def openai(request: Request):
        async def parse(request):
            return parse_openai(await svc.read_json(request), svc.limits, svc.sizes)

        return await answer(request, parse, as_openai, {"num": "n"})

    async def edits(request: Request):
        return await answer(request, svc.read_edit, as_openai, OPENAI_NAMES)

    return generate, openai, edits


def _stream_endpoint(svc: Service):
    """``POST /api/generate/stream``: server-sent events, a progress event a step."""

    async def stream(request: Request):
        events: asyncio.Queue = asyncio.Queue()
        try:
            r = parse_generate(await svc.read_json(request), svc.limits, stream=True)
            ticket = await svc.batcher.submit(r, on_step=events.put_nowait)
        except (RequestError, QueueFull, Stopping, InputError) as e:
            return refusal(e)

        async def body():
            work = asyncio.ensure_future(ticket.wait())
            get = None  # the wait for the next step event, while one is pending
            try:
                yield sse("queued", {"seed": r.config.seed, "images": r.images})
                # every step's event is queued before the work's end is signalled (both go
                # through call_soon_threadsafe, in order): drain them all, then finish
                while not (work.done() and events.empty()):
                    if events.empty():
                        get = asyncio.ensure_future(events.get())
                        await asyncio.wait({get, work}, return_when=asyncio.FIRST_COMPLETED)
                        if not get.done():
                            get.cancel()
                            continue
                        info = get.result()
                    else:
                        info = events.get_nowait()
                    msg = {"step": info.step, "total": info.total}
                    if info.preview is not None:
                        msg["first_image"] = info.first_image
                        msg["previews"] = [b64(png_bytes(p)) for p in info.preview]
                    yield sse("progress", msg)
                await work
                bad = svc.failure(ticket)
                if bad is not None:
                    yield sse("error", {**json.loads(bad.body), "status": bad.status_code})
                else:
                    yield sse("done", svc.result_json(ticket))
            finally:  # the client went away (or the server stops): stop the work
                if not work.done():
                    ticket.cancel()
                    work.cancel()
                if get is not None and not get.done():
                    get.cancel()  # else asyncio logs "Task was destroyed but it is pending!"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    return stream


def _info_endpoints(svc: Service):
    """The page, ``/api/info``, ``/api/health`` and ``/openapi.json``."""

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    async def info(request: Request):
        return JSONResponse(svc.info())

    async def health(request: Request):
        return JSONResponse({**svc.batcher.status(), "auth": svc.token is not None})

    async def openapi_json(request: Request):
        return JSONResponse(openapi_schema("ddpm-rt serve", __version__, svc.limits))

    return page, info, health, openapi_json


def _middleware(token: str | None, cors_origins: tuple[str, ...]) -> list[Middleware]:
    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    if token is not None:
        middleware.append(Middleware(BearerAuth, token=token))
    return middleware


def create_app(
    generator,
    limits: Limits | None = None,
    *,
    token: str | None = None,
    cors_origins: tuple[str, ...] = (),
) -> Starlette:
    """The server over one shared generator. ``token``: every endpoint that runs the model
    needs ``Authorization: Bearer TOKEN``. ``cors_origins``: other origins allowed to call
    the API from a browser (none by default)."""
    svc = Service(generator, limits or Limits(), token)
    generate, openai, edits = _generate_endpoints(svc)
    stream = _stream_endpoint(svc)
    page, info, health, openapi_json = _info_endpoints(svc)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        svc.batcher.close(svc.limits.shutdown_grace_s)
        await run_in_threadpool(svc.batcher.join, svc.limits.shutdown_grace_s + 5)

    middleware = _middleware(token, cors_origins)
    routes = [
        Route("/", page),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/generate/stream", stream, methods=["POST"]),
        Route("/v1/images/generations", openai, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/api/info", info),
        Route("/api/health", health),
        Route("/openapi.json", openapi_json),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def http_error(request: Request, exc: HTTPException):
        # 404, 405 and the like in the same body shape as every other refusal
        return error_response(exc.status_code, exc.detail, headers=exc.headers)

    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.state.service = svc
    return app


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer TOKEN`` on everything but the page, its
    files, health and the schema (which run no model and reveal nothing private)."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC or path.startswith("/static/"):
            return await self.app(scope, receive, send)
        if scope.get("method") == "OPTIONS":  # a CORS preflight carries no credentials
            return await self.app(scope, receive, send)
        given = b""
        for k, v in scope.get("headers", []):
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                given = v[7:].strip()
        if not hmac.compare_digest(given, self.token):
            response = error_response(
                401,
                "a bearer token is required (Authorization: Bearer TOKEN)",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
