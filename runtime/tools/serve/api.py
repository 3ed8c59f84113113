"""The HTTP API's request shapes: one table of fields drives validation, defaults and the
OpenAPI schema, so the three cannot drift apart.

Everything here runs before a request is queued: a bad field, an out-of-range value or an
oversized prompt is refused with a 4xx body naming the field, and no work starts.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field, replace

from ddpm_rt.config import SETTINGS, GenerateConfig, check_int
from ddpm_rt.errors import InputError
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
    max_body_bytes: int = 64 * 1024
    max_queue: int = 64  # requests waiting or running; more get 503 + Retry-After
    max_batch: int = 32  # images one batch (one U-Net call) may hold
    batch_window_s: float = 0.005  # under concurrent load: how long to wait for company
    shutdown_grace_s: float = 10.0  # on SIGTERM: finish what runs within this, then cancel
    preview_every: int = 2  # streaming requests: x̂0 previews every k steps by default


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

    @property
    def images(self) -> int:
        return len(self.prompts) * self.config.num


# The settings this API takes: the request schema's (config.SETTINGS), all but batch_size
# (this server forms its own batches). Their checks and help come from there; this server
# adds only its own limits (Limits) and a seed of its own choosing when none is given.
SETTINGS_HERE = tuple(n for n in SETTINGS if n != "batch_size")
HELP_HERE = {"seed": "noise seed; absent: a random one, returned in the response"}
# name -> (JSON type, description): the request's own fields, then the settings.
FIELDS: dict[str, tuple[str, str]] = {
    "prompt": ("string|array", "what to draw ('' = unconditional); a list: one row per prompt"),
    "negative_prompt": ("string", "what to steer away from (needs guidance != 1)"),
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
    given = {n: body[n] for n in SETTINGS_HERE if body.get(n) is not None}
    seed_was_random = "seed" not in given
    if seed_was_random:
        given["seed"] = _random_seed()
    cfg = GenerateConfig(**given)
    try:
        cfg.validate()  # the schema's checks, each naming its field
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
    return GenerateRequest(prompts, neg, cfg, seed_was_random, fmt, every)


def parse_openai(body, limits: Limits, sizes: dict[str, int]) -> GenerateRequest:
    """The OpenAI images API's request (``POST /v1/images/generations``): ``prompt``, ``n``,
    ``response_format`` (``b64_json`` only: this server keeps no files to link to), ``size``
    (``WxH``: this model's, or a cascade's base picture), ``model``/``user``/``quality``/
    ``style`` accepted and ignored, and this API's own settings (``seed``, ``steps``, ...)
    as extensions."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    body = dict(body)
    for ignored in ("model", "user", "quality", "style"):
        body.pop(ignored, None)
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
    try:
        return parse_generate(body, limits)
    except RequestError as e:  # the client sent n: say n
        if e.param == "num":
            e.param, e.message = "n", re.sub(r"\bnum\b", "n", e.message)
        raise


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
        "413": "body, prompt or image count over this server's limits",
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
                if k not in ("prompt", "num", "response_format", "preview_every")
            },
        },
    }


def openapi_schema(title: str, version: str, limits: Limits) -> dict:
    """The OpenAPI 3.1 document served at ``/openapi.json`` (its length is the paths' table,
    a literal)."""
    generate = _generate_schema(limits)
    props = generate["properties"]
    images, err = _responses()
    openai = _openai_schema(props, limits)

    def body_of(schema):
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Text-to-image generation over one shared model. Same seed, same image: a "
                "request's images are byte-identical whether it runs alone or batched with others."
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
