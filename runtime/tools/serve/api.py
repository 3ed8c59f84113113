"""The HTTP API's request shapes: one table of fields drives validation, defaults and the
OpenAPI schema, so the three cannot drift apart.

Everything here runs before a request is queued: a bad field, an out-of-range value or an
oversized prompt is refused with a 4xx body naming the field, and no work starts.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass, field, replace

import numpy as np

from ddpm_rt.config import SETTINGS, GenerateConfig, check_int
from ddpm_rt.errors import InputError
from ddpm_rt.images import check_picture_header
from ddpm_rt.text import check_prompt, parse_blend

# A seed chosen for a request that names none: below 2**53, so a browser's JSON numbers
# (doubles) carry it exactly.
RANDOM_SEED_BOUND = 2**53


@dataclass(frozen=True)
class Limits:
    """What one request and the whole server may ask for; ``ddpm-rt serve`` flags set them."""

    max_images: int = 16  # images per request (prompts x num)
    max_steps: int = 50
    max_prompt_chars: int = 1000
    max_body_bytes: int = 64 * 1024  # a body, not counting its pictures (init_image, mask)
    max_image_bytes: int = 8 << 20  # one picture's file (decoded from base64, or uploaded)
    max_queue: int = 64  # requests waiting or running; more get 503 + Retry-After
    max_batch: int = 32  # images one batch (one U-Net call) may hold
    batch_window_s: float = 0.005  # under concurrent load: how long to wait for company
    shutdown_grace_s: float = 10.0  # on SIGTERM: finish what runs within this, then cancel
    preview_every: int = 2  # streaming requests: x̂0 previews every k steps by default

    @property
    def max_request_bytes(self) -> int:
        """The most a body may hold as it is read: ``max_body_bytes`` and two pictures of
        ``max_image_bytes`` as base64 (4 characters per 3 bytes) with room for a data: URL's
        prefix or a multipart part's headers. Over it, a body is refused unread; under it,
        a body whose fields besides the pictures are over ``max_body_bytes`` is refused once
        parsed."""
        return self.max_body_bytes + len(PICTURES) * (4 * -(-self.max_image_bytes // 3) + 1024)


class RequestError(Exception):
    """A refusal: HTTP status, one-line message, and the field at fault (if one is)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request: the prompts, the sampling settings, and how to answer."""

    prompts: list[str]
    negative_prompt: str | None
    config: GenerateConfig  # num, seed, sampler, steps, eta, guidance, spacing
    seed_was_random: bool
    response_format: str  # "png" | "json"
    preview_every: int = 0
    extra: dict = field(default_factory=dict)
    # image-to-image: the picture file's bytes; inpainting: the mask's bytes, or (H, W) uint8
    # (255 = repaint) converted from another convention (the OpenAI edits route's alpha)
    init_image: bytes | None = None
    mask: bytes | np.ndarray | None = None

    @property
    def images(self) -> int:
        return len(self.prompts) * self.config.num


# The settings this API takes: the request schema's (config.SETTINGS), all but batch_size
# (this server forms its own batches). Their checks and help come from there; this server
# adds only its own limits (Limits) and a seed of its own choosing when none is given.
SETTINGS_HERE = tuple(n for n in SETTINGS if n != "batch_size")
HELP_HERE = {"seed": "noise seed; absent: a random one, returned in the response"}
PICTURES = ("init_image", "mask")  # the fields that carry a picture (base64)
# name -> (JSON type, description): the request's own fields, then the settings.
FIELDS: dict[str, tuple[str, str]] = {
    "prompt": ("string|array", "what to draw ('' = unconditional); a list: one row per prompt"),
    "negative_prompt": ("string", "what to steer away from (needs guidance != 1)"),
    "init_image": (
        "string",
        "image-to-image: a PNG, JPEG or WebP file as base64 (or a data: URL), any size: "
        "resized to the model's; strength says how much of it is redrawn",
    ),
    "mask": (
        "string",
        "inpainting (needs init_image): a picture as base64 (or a data: URL), any size; light "
        "(grey >= 128) = repaint, dark or transparent = keep",
    ),
    **{n: (SETTINGS[n].json_type, HELP_HERE.get(n, SETTINGS[n].help)) for n in SETTINGS_HERE},
    "response_format": ("string", "png (default; several images form a grid) or json"),
    "preview_every": ("integer", "streaming only: an x̂0 preview every k steps (0 = none)"),
}


def _random_seed() -> int:
    return secrets.randbelow(RANDOM_SEED_BOUND)


def _checked(name: str, fn, *args):
    try:
        return fn(name, *args)
    except InputError as e:
        raise RequestError(422, str(e), name) from None


def _prompt(value, name: str, limits: Limits) -> str:
    try:
        check_prompt(value, name)
        parse_blend(value)  # a blend's weights are checked here, where the field is known
    except InputError as e:
        raise RequestError(422, str(e), name) from None
    if len(value) > limits.max_prompt_chars:
        raise RequestError(
            413,
            f"{name} has {len(value)} characters, over this server's limit of "
            f"{limits.max_prompt_chars}",
            name,
        )
    return value


def check_calls(steps: int, resample: int, limits: Limits) -> None:
    """An inpainting's RePaint jumps repeat every step: ``steps x (1 + resample)`` U-Net
    calls per image, held to the same limit as steps (``max_steps``)."""
    calls = steps * (1 + resample)
    if resample and calls > limits.max_steps:
        raise RequestError(
            422,
            f"{steps} steps x (1 + resample {resample}) = {calls} U-Net calls per image is "
            f"over this server's limit of {limits.max_steps}",
            "resample",
        )


def parse_generate(body, limits: Limits, *, stream: bool = False) -> GenerateRequest:
    """A JSON object (already decoded) -> a :class:`GenerateRequest`, or a RequestError."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(
            422,
            f"unknown field {unknown[0]!r:.60} (fields: {', '.join(FIELDS)})",
            str(unknown[0])[:60],
        )
    if "prompt" not in body:
        raise RequestError(422, "prompt is required ('' = unconditional)", "prompt")
    raw = body["prompt"]
    prompts = raw if isinstance(raw, list) else [raw]
    if not prompts:
        raise RequestError(422, "prompt must be a string or a non-empty list of strings", "prompt")
    if len(prompts) > limits.max_images:
        raise RequestError(
            413, f"{len(prompts)} prompts is over this server's limit of {limits.max_images}"
        )
    prompts = [_prompt(p, "prompt", limits) for p in prompts]
    neg = body.get("negative_prompt")
    if neg is not None:
        neg = _prompt(neg, "negative_prompt", limits)
    init, mask = (_picture(body.get(n), n, limits) for n in PICTURES)
    given = {n: body[n] for n in SETTINGS_HERE if body.get(n) is not None}
    seed_was_random = "seed" not in given
    if seed_was_random:
        given["seed"] = _random_seed()
    cfg = GenerateConfig(**given)
    try:
        cfg.validate()  # the schema's checks, each naming its field
        cfg.check_inputs(init is not None, mask is not None)  # mask needs init_image, ...
    except InputError as e:
        raise RequestError(422, str(e), e.field) from None
    # This server's own limits.
    _checked("num", check_int, cfg.num, 1, limits.max_images)
    if cfg.num * len(prompts) > limits.max_images:
        raise RequestError(
            422,
            f"{len(prompts)} prompts x num {cfg.num} is over this server's limit of "
            f"{limits.max_images} images per request",
            "num",
        )
    if cfg.steps is not None:
        _checked("steps", check_int, cfg.steps, 1, limits.max_steps)
        check_calls(cfg.steps, cfg.resample, limits)
    elif cfg.sampler == "ddpm":  # ddpm's default is every timestep: over any sane server limit
        raise RequestError(
            422, f"sampler ddpm needs steps (at most {limits.max_steps} here)", "steps"
        )
    fmt = body.get("response_format", "png")
    if fmt not in ("png", "json"):
        raise RequestError(
            422, f"response_format must be png or json, got {fmt!r:.20}", "response_format"
        )
    every = body.get("preview_every", limits.preview_every if stream else 0)
    every = _checked("preview_every", check_int, every, 0, limits.max_steps)
    cfg = replace(cfg, batch_size=cfg.num * len(prompts))  # one request, one batch
    return GenerateRequest(
        prompts, neg, cfg, seed_was_random, fmt, every, init_image=init, mask=mask
    )


def _picture(value, name: str, limits: Limits):
    """A picture field: base64 (whitespace ignored) or a ``data:...;base64,`` URL -> the
    file's bytes, checked from its header (a PNG, JPEG or WebP within the pixel limit);
    bytes (an upload) are checked the same way; an array (a converted mask) passes."""
    if value is None or isinstance(value, np.ndarray):
        return value
    if isinstance(value, str):
        if value[:5].lower() == "data:":
            head, comma, value = value.partition(",")
            if not comma or not head.lower().endswith(";base64"):
                raise RequestError(
                    422, f"{name}: a data: URL must be base64 (data:image/png;base64,...)", name
                )
        value = "".join(value.split())
        if len(value) > 4 * -(-limits.max_image_bytes // 3):  # its base64 length
            raise RequestError(
                413,
                f"{name} is over this server's limit of {limits.max_image_bytes} bytes per picture",
                name,
            )
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(
                422, f"{name} is not valid base64 (a PNG, JPEG or WebP file's bytes)", name
            ) from None
    elif not isinstance(value, bytes):
        raise RequestError(
            422,
            f"{name} must be a base64 string (a PNG, JPEG or WebP file), got "
            f"{type(value).__name__}",
            name,
        )
    if not value:
        raise RequestError(422, f"{name} is empty", name)
    if len(value) > limits.max_image_bytes:
        raise RequestError(
            413,
            f"{name} is {len(value)} bytes, over this server's limit of "
            f"{limits.max_image_bytes} bytes per picture",
            name,
        )
    try:
        check_picture_header(value, name)
    except InputError as e:
        raise RequestError(422, str(e), name) from None
    return value


def parse_openai(
    body, limits: Limits, sizes: dict[str, int], *, image=None, mask=None
) -> GenerateRequest:
    """The OpenAI images API's request (``POST /v1/images/generations``): ``prompt``, ``n``,
    ``response_format`` (``b64_json`` only: this server keeps no files to link to), ``size``
    (``WxH``: this model's, or a cascade's base picture), ``model``/``user``/``quality``/
    ``style`` accepted and ignored, and this API's own settings (``seed``, ``steps``, ...)
    as extensions. ``image`` (and ``mask``): ``POST /v1/images/edits``' uploads (the
    picture's bytes; the mask as bytes or already converted to ours), its fields as
    :func:`parse_edit_form` made them."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    body = dict(body)
    for ignored in ("model", "user", "quality", "style"):
        body.pop(ignored, None)
    for name in PICTURES:  # a picture comes as a file, to the edits route
        if name in body:
            raise RequestError(
                422, f"unknown field {name!r} (send a picture to /v1/images/edits)", name
            )
    fmt = body.pop("response_format", "b64_json")
    if fmt != "b64_json":
        raise RequestError(
            422, f"response_format must be b64_json here, got {fmt!r:.20}", "response_format"
        )
    size = body.pop("size", None)
    if size is not None:
        if not isinstance(size, str) or size not in sizes:
            raise RequestError(
                422, f"size must be {' or '.join(sizes)} (this model's), got {size!r:.20}", "size"
            )
        body["size"] = sizes[size]
    if "prompt" in body and not isinstance(body["prompt"], str):
        raise RequestError(422, "prompt must be a string", "prompt")
    if "n" in body:
        body["num"] = body.pop("n")
    elif "num" in body:
        raise RequestError(422, "unknown field 'num' (this API calls it n)", "num")
    if "preview_every" in body:
        raise RequestError(422, "unknown field 'preview_every'", "preview_every")
    body["response_format"] = "json"
    if image is not None:
        body["init_image"] = image
    if mask is not None:
        body["mask"] = mask
    try:
        return parse_generate(body, limits)
    except RequestError as e:  # the client sent n (and image): say so
        rename_param(e, OPENAI_NAMES)
        raise


# This server's names -> the OpenAI API's, in its routes' refusals.
OPENAI_NAMES = {"num": "n", "init_image": "image"}


def rename_param(e: RequestError, names: dict[str, str]) -> RequestError:
    """A refusal in the client's words: its ``param`` and the message's mentions renamed."""
    if e.param in names:
        old = e.param
        e.param, e.message = names[old], re.sub(rf"\b{old}\b", names[old], e.message)
    return e


EDIT_INT = ("n",)  # /v1/images/edits: its own integer field (the settings' come from SETTINGS)
FORM_NUMBERS = {"integer": (int, "an integer"), "number": (float, "a number")}


def parse_edit_form(fields: list[tuple[str, str]]) -> dict:
    """``/v1/images/edits``' text fields (multipart/form-data: every value a string) -> the
    JSON body they stand for: numbers parsed as the request schema types them; a field
    given twice, or a number that is not one, is refused naming it."""
    body: dict = {}
    for name, value in fields:
        if name in body:
            raise RequestError(422, f"{name!r:.60} is given twice", name[:60])
        kind = "integer" if name in EDIT_INT else None
        if name in SETTINGS_HERE and name != "size":  # size is "WxH" here
            kind = SETTINGS[name].json_type
        if kind in FORM_NUMBERS:
            parse, what = FORM_NUMBERS[kind]
            try:
                value = parse(value.strip())
            except ValueError:
                raise RequestError(422, f"{name} must be {what}, got {value!r:.20}", name) from None
        body[name] = value
    return body


def setting_schema(name: str, limit: int | None = None) -> dict:
    """The JSON schema of one request setting, from the request schema
    (:data:`ddpm_rt.config.SETTINGS`); ``limit``: this server's lower maximum, if any."""
    setting = SETTINGS[name]
    schema: dict = {"type": setting.json_type}
    if setting.kind == "choice":
        schema["enum"] = list(setting.choices)
    else:
        top = setting.hi if limit is None else min(limit, setting.hi)
        num = int if setting.kind == "int" else float
        schema.update(minimum=num(setting.lo), maximum=num(top))
    return schema


def _generate_schema(limits: Limits) -> dict:
    """``/api/generate``'s body: the request's fields (:data:`FIELDS`) with their bounds."""
    here = {"num": limits.max_images, "steps": limits.max_steps}  # this server's limits
    prompt = {"type": "string", "maxLength": limits.max_prompt_chars}
    own = {
        "prompt": {"oneOf": [prompt, {"type": "array", "items": prompt, "minItems": 1}]},
        "negative_prompt": prompt,
        "response_format": {"type": "string", "enum": ["png", "json"]},
        "preview_every": {"type": "integer", "minimum": 0, "maximum": limits.max_steps},
        **{n: _b64_picture(limits) for n in PICTURES},
    }
    props = {
        name: {**(own.get(name) or setting_schema(name, here.get(name))), "description": desc}
        for name, (_, desc) in FIELDS.items()
    }
    return {
        "type": "object",
        "required": ["prompt"],
        "properties": props,
        "additionalProperties": False,
    }


def _b64_picture(limits: Limits) -> dict:
    return {
        "type": "string",
        "contentEncoding": "base64",
        "maxLength": 4 * -(-limits.max_image_bytes // 3) + 1024,
    }


def _responses() -> tuple[dict, dict]:
    """The images response's schema, and the refusals' responses (one error shape)."""
    error = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                },
            }
        },
    }
    images = {
        "type": "object",
        "properties": {
            "seed": {"type": "integer"},
            "settings": {"type": "object", "description": "the provenance every PNG carries"},
            "images": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "b64_png": {"type": "string"},
                        "index": {"type": "integer"},
                        "prompt": {"type": "string"},
                    },
                },
            },
        },
    }
    refusals = {
        "400": "not JSON, or not an object",
        "401": "missing or wrong bearer token",
        "413": "body, picture, prompt or image count over this server's limits",
        "415": "not the route's Content-Type",
        "501": "a form (/v1/images/edits) on a server without python-multipart",
        "422": "a field is wrong: error.param names it",
        "503": "the queue is full (Retry-After) or the server is stopping",
    }
    err = {
        k: {"description": v, "content": {"application/json": {"schema": error}}}
        for k, v in refusals.items()
    }

    return images, err


def _openai_schema(props: dict, limits: Limits) -> dict:
    """``/v1/images/generations``' body: the OpenAI API's fields and this API's settings."""
    return {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "maxLength": limits.max_prompt_chars},
            "n": {"type": "integer", "minimum": 1, "maximum": limits.max_images},
            "response_format": {"type": "string", "enum": ["b64_json"]},
            "size": {"type": "string"},
            "model": {"type": "string"},
            **{
                k: v
                for k, v in props.items()
                if k not in ("prompt", "num", "response_format", "preview_every", *PICTURES)
            },
        },
    }


# The OpenAI API's mask convention, which /v1/images/edits follows.
EDIT_MASK = (
    "a PNG (or WebP) with an alpha channel, the image's size: its fully transparent pixels "
    "(alpha 0) are the area to edit, as in the OpenAI images API (this server's JSON API "
    "takes the other convention: light = repaint). Without a mask, an image with fully "
    "transparent pixels is edited there; otherwise the whole image is redrawn by strength"
)


def _edit_schema(openai: dict, limits: Limits) -> dict:
    """``/v1/images/edits``' form: the generations route's fields, the image and mask files."""
    binary = {"type": "string", "format": "binary", "maxLength": limits.max_image_bytes}
    props = {
        "image": {
            **binary,
            "description": "the picture to edit: PNG, JPEG or WebP, any size (resized to "
            "the model's)",
        },
        "mask": {**binary, "description": EDIT_MASK},
        **openai["properties"],
    }
    return {"type": "object", "required": ["image", "prompt"], "properties": props}


def openapi_schema(title: str, version: str, limits: Limits) -> dict:
    """The OpenAPI 3.1 document served at ``/openapi.json`` (its length is the paths' table,
    a literal)."""
    generate = _generate_schema(limits)
    props = generate["properties"]
    images, err = _responses()
    openai = _openai_schema(props, limits)
    edit = _edit_schema(openai, limits)

    def body_of(schema):
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Text-to-image, image-to-image and inpainting over one shared model. Same "
                "seed, same image: a request's images are byte-identical whether it runs alone "
                "or batched with others. A body is at most "
                f"{limits.max_body_bytes} bytes besides its pictures; each picture at most "
                f"{limits.max_image_bytes} bytes (as a file)."
            ),
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
        "paths": {
            "/api/generate": {
                "post": {
                    "summary": "generate images: a PNG (grid; settings in its ddpm-rt text chunk) "
                    "or JSON (response_format json)",
                    "requestBody": body_of(generate),
                    "responses": {
                        "200": {
                            "description": "the images",
                            "content": {"image/png": {}, "application/json": {"schema": images}},
                        },
                        **err,
                    },
                }
            },
            "/api/generate/stream": {
                "post": {
                    "summary": "the same request as server-sent events: progress (with x̂0 "
                    "previews every preview_every steps), then done (as the JSON response) or "
                    "error. Closing the connection cancels the request.",
                    "requestBody": body_of(generate),
                    "responses": {
                        "200": {"description": "events", "content": {"text/event-stream": {}}},
                        **err,
                    },
                }
            },
            "/v1/images/generations": {
                "post": {
                    "summary": "the OpenAI images API's shape (b64_json)",
                    "requestBody": body_of(openai),
                    "responses": {"200": {"description": "data[].b64_json"}, **err},
                }
            },
            "/v1/images/edits": {
                "post": {
                    "summary": "the OpenAI images API's edits (b64_json): image-to-image, and "
                    "inpainting with a mask whose transparent pixels are the area to edit",
                    "description": EDIT_MASK,
                    "requestBody": {
                        "required": True,
                        "content": {"multipart/form-data": {"schema": edit}},
                    },
                    "responses": {"200": {"description": "data[].b64_json"}, **err},
                }
            },
            "/api/info": {
                "get": {
                    "summary": "the model: digest, image shape, defaults, "
                    "precisions, backend; this server's limits"
                }
            },
            "/api/health": {
                "get": {"summary": "liveness, queue depth, batch sizes formed (no token needed)"}
            },
        },
    }
