"""The Python side of libddpm_rt: the functions ddpm_rt.h declares, run by the embedded
interpreter. Every exception becomes a status code and a one-line message; nothing here
may raise into C or print."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np

from ddpm_rt import __version__
from ddpm_rt.config import SETTINGS, GenerateConfig
from ddpm_rt.errors import (
    BackendError,
    BundleError,
    Cancelled,
    InputError,
    NumericalError,
    first_line,
)
from ddpm_rt.images import MAX_INPUT_PIXELS

OK, INVALID, BUNDLE, BACKEND, NUMERICAL, CANCELLED, TOO_SMALL, INTERNAL = range(8)
_CODES = (  # most specific first
    (NumericalError, NUMERICAL),
    (Cancelled, CANCELLED),
    (InputError, INVALID),
    (BundleError, BUNDLE),
    (BackendError, BACKEND),
)


# ddpm_rt_open's options: how the model loads (Generator's keywords), then the request
# settings a handle fixes for its calls -- the request schema's (config.SETTINGS) but those
# ddpm_rt_generate takes as arguments.
LOAD_OPTIONS = (
    "unet_precision",
    "text_precision",
    "decoder_precision",
    "threads",
    "providers",
    "expected_digest",
)
CALL_ARGUMENTS = ("num", "seed", "steps", "guidance", "strength")
SETTING_OPTIONS = tuple(n for n in SETTINGS if n not in CALL_ARGUMENTS)


class _Handle:
    def __init__(self, gen, config: GenerateConfig):
        self.gen = gen
        self.config = config  # the settings every call uses (size None: the bundle's image)
        # refuses a size the bundle does not give
        self.shape = gen.bundle.output_shape(config.size)
        self.error = b""


def bind(ffi) -> None:
    """Define the extern functions on the embedding module's ffi. Long on purpose: one short
    closure per C function, all sharing this ffi and the handle and error tables."""
    # The library prints nothing on the host's streams: the runtime's log lines (a CUDA-graph
    # capture turned off, say) go nowhere unless the host configures Python logging.
    logging.getLogger("ddpm_rt").addHandler(logging.NullHandler())
    handles: dict[int, tuple] = {}  # address -> (cdata keeping the handle alive, _Handle)
    empty = ffi.new("char[]", b"")
    state = {"open_error": empty, "errors": {}}
    version = ffi.new("char[]", __version__.encode())

    def get(h):
        if h == ffi.NULL:
            raise InputError("handle is NULL")
        entry = handles.get(int(ffi.cast("uintptr_t", h)))
        if entry is None:
            raise InputError("not an open handle")
        return entry[1]

    def fail(h, e: BaseException) -> int:
        code = next((c for cls, c in _CODES if isinstance(e, cls)), INTERNAL)
        msg = first_line(e) if code != INTERNAL else f"{type(e).__name__}: {first_line(e)}"
        buf = ffi.new("char[]", msg.encode("utf-8", "replace"))
        if h is None or h == ffi.NULL:
            state["open_error"] = buf
        else:
            state["errors"][int(ffi.cast("uintptr_t", h))] = buf
        return code

    @ffi.def_extern()
    def ddpm_rt_version():
        return version

    @ffi.def_extern(onerror=lambda *a: None)
    def ddpm_rt_open(bundle_dir, options_json, out):
        try:
            if bundle_dir == ffi.NULL or out == ffi.NULL:
                raise InputError("bundle_dir and out must not be NULL")
            from ddpm_rt.generator import Generator

            options = {}
            if options_json != ffi.NULL:
                try:
                    options = json.loads(ffi.string(options_json).decode("utf-8"))
                except ValueError as e:
                    raise InputError(f"options_json is not valid JSON: {first_line(e)}") from None
                allowed = {*LOAD_OPTIONS, *SETTING_OPTIONS}
                if not isinstance(options, dict) or set(options) - allowed:
                    raise InputError(f"options_json may hold only {', '.join(sorted(allowed))}")
            path = ffi.string(bundle_dir).decode("utf-8", "surrogateescape")
            settings = {k: options.pop(k) for k in SETTING_OPTIONS if k in options}
            config = GenerateConfig(**settings)
            config.validate()  # before the model loads
            gen = Generator(path, **options)
            handle = _Handle(gen, config)
            keep = ffi.new_handle(handle)
            cdata = ffi.cast("ddpm_rt_handle *", keep)
            handles[int(ffi.cast("uintptr_t", cdata))] = (keep, handle)
            out[0] = cdata
            state["open_error"] = empty
            return OK
        except BaseException as e:
            return fail(None, e)

    @ffi.def_extern()
    def ddpm_rt_image_shape(h, height, width, channels):
        try:
            c, hh, w = get(h).shape  # the pixels (a latent bundle's decoded), at its size
            state["errors"].pop(int(ffi.cast("uintptr_t", h)), None)
            for ptr, v in ((height, hh), (width, w), (channels, c)):
                if ptr != ffi.NULL:
                    ptr[0] = v
            return OK
        except BaseException as e:
            return fail(h, e)

    def run(
        h,
        prompt,
        num,
        seed,
        steps,
        guidance,
        progress,
        user,
        out_rgb,
        out_capacity,
        written,
        **inputs,
    ):
        """ddpm_rt_generate's body; ``inputs``: the picture, mask and strength of
        ddpm_rt_generate_from_image, checked by the caller."""
        try:
            handle = get(h)
            if prompt == ffi.NULL or out_rgb == ffi.NULL or written == ffi.NULL:
                raise InputError("prompt, out_rgb and written must not be NULL")
            try:
                text = ffi.string(prompt).decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("prompt is not valid UTF-8") from None
            if num < 1:
                raise InputError(f"num must be >= 1, got {num}")
            c, hh, w = handle.shape
            need = num * hh * w * c
            written[0] = 0
            if out_capacity < need:
                written[0] = need
                raise _TooSmall(f"out_capacity {out_capacity} < {need} bytes needed")
            callback = None
            if progress != ffi.NULL:

                def callback(info):
                    return bool(progress(info.step, info.total, user))

            kw = {"num": num, "seed": int(seed), "callback": callback}
            if steps > 0:
                kw["steps"] = steps
            if guidance > 0:
                kw["guidance"] = float(guidance)
            config = handle.config
            if inputs.get("mask") is None:  # "resample" smooths an inpainting's seam only
                config = replace(config, resample=0)
            images = handle.gen.generate(text, config=config, **kw, **inputs)
            images = np.ascontiguousarray(images)
            ffi.memmove(out_rgb, ffi.from_buffer(images), images.nbytes)
            written[0] = images.nbytes
            state["errors"].pop(int(ffi.cast("uintptr_t", h)), None)
            return OK
        except _TooSmall as e:
            fail(h, e)
            return TOO_SMALL
        except BaseException as e:
            return fail(h, e)

    @ffi.def_extern()
    def ddpm_rt_generate(
        h, prompt, num, seed, steps, guidance, progress, user, out_rgb, out_capacity, written
    ):
        return run(h, prompt, num, seed, steps, guidance, progress, user, out_rgb, out_capacity,
                   written)  # fmt: skip

    @ffi.def_extern()
    def ddpm_rt_generate_from_image(
        h, prompt, num, seed, steps, guidance, strength, rgb, width, height, channels, mask,
        progress, user, out_rgb, out_capacity, written,
    ):  # fmt: skip
        try:
            get(h)
            if written != ffi.NULL:
                written[0] = 0
            inputs = _picture_inputs(ffi, rgb, width, height, channels, mask)
            if not strength < 0:  # NaN is refused by the schema's check, as strength
                inputs["strength"] = float(strength)
        except BaseException as e:
            return fail(h, e)
        return run(h, prompt, num, seed, steps, guidance, progress, user, out_rgb, out_capacity,
                   written, **inputs)  # fmt: skip

    @ffi.def_extern()
    def ddpm_rt_last_error(h):
        if h == ffi.NULL:
            return state["open_error"]
        # "" is the one long-lived empty string: a char[] made here would be freed as this
        # returns, handing C a dangling pointer (ASan: heap-use-after-free)
        return state["errors"].get(int(ffi.cast("uintptr_t", h)), empty)

    @ffi.def_extern()
    def ddpm_rt_close(h):
        if h != ffi.NULL:
            key = int(ffi.cast("uintptr_t", h))
            handles.pop(key, None)
            state["errors"].pop(key, None)


class _TooSmall(InputError):
    pass


def _picture_inputs(ffi, rgb, width: int, height: int, channels: int, mask) -> dict:
    """ddpm_rt_generate_from_image's picture (and mask) as the Python API's arrays: (height,
    width, channels) uint8 and (height, width) uint8, copied out of the host's buffers after
    their sizes are checked (nothing is read before)."""
    if rgb == ffi.NULL:
        raise InputError("rgb must not be NULL")
    if channels not in (3, 4):
        raise InputError(f"channels must be 3 (RGB) or 4 (RGBA), got {channels}")
    if width < 1 or height < 1:
        raise InputError(f"width and height must be >= 1, got {width}x{height}")
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(
            f"the picture is {width}x{height} pixels, over the limit of "
            f"{MAX_INPUT_PIXELS / 1e6:.1f} M pixels"
        )
    n = width * height
    picture = np.frombuffer(ffi.buffer(rgb, n * channels), np.uint8).reshape(
        height, width, channels
    )
    out = {"init_image": picture.copy()}
    if mask != ffi.NULL:
        out["mask"] = np.frombuffer(ffi.buffer(mask, n), np.uint8).reshape(height, width).copy()
    return out
