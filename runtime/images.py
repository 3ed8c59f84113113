"""Images out: PNG files and grids, via Pillow, written atomically."""

from __future__ import annotations

import io
import json
import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.errors import InputError, first_line

MAX_SCALE = 64
# Pillow refuses to open images over twice its decompression-bomb limit and warns above it;
# a PNG we write must be readable back by Pillow with default settings.
MAX_PNG_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def grid_size(n: int, h: int, w: int, ncols: int | None = None, pad: int = 1) -> tuple[int, int]:
    """(height, width) of :func:`make_grid`'s image for n images of h x w."""
    if n == 1:
        return h, w
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    return nrows * (h + pad) + pad, ncols * (w + pad) + pad


def check_png(n: int, h: int, w: int, scale: int = 1, ncols: int | None = None) -> None:
    """Refuse, before any work, a PNG that Pillow could not read back or that cannot fit."""
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= MAX_SCALE:
        raise InputError(f"scale must be an integer between 1 and {MAX_SCALE}, got {scale!r:.20}")
    gh, gw = grid_size(n, h, w, ncols)
    ph, pw = gh * scale, gw * scale
    if ph * pw > MAX_PNG_PIXELS:
        raise InputError(
            f"the PNG would be {pw}x{ph} pixels ({ph * pw / 1e6:.0f} M), over the limit of "
            f"{MAX_PNG_PIXELS / 1e6:.0f} M pixels; lower --num or --scale"
        )


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 image."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


PROVENANCE_KEY = "ddpm-rt"


def save_png(
    path: str | Path,
    images: np.ndarray,
    scale: int = 1,
    ncols: int | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write one image (H, W, 3) or a batch (N, H, W, 3) -- several become one grid.

    ``provenance`` (the settings that made the images) goes into a PNG text chunk
    ``ddpm-rt`` as JSON; :func:`read_provenance` reads it back."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"output must be a .png file, got {path}")
    n, h, w = (len(images), *images.shape[1:3]) if images.ndim == 4 else (1, *images.shape[:2])
    check_png(n, h, w, scale, ncols)
    if images.ndim == 4:
        images = images[0] if len(images) == 1 else make_grid(images, ncols)
    img = Image.fromarray(images, "RGB")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    info = None
    if provenance is not None:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_itxt(PROVENANCE_KEY, json.dumps(provenance, ensure_ascii=False))
    return atomic_write(path, lambda f: img.save(f, format="PNG", pnginfo=info))


# What read_provenance reads at most: the settings of 1000 10k-character prompts, with room
# for JSON escapes. A chunk claiming more (a header can claim 2 GiB) is refused unread.
MAX_PROVENANCE_BYTES = 16 << 20
_MAX_CHUNKS = 10_000  # chunks before the image data; Pillow writes a handful
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_provenance(path: str | Path) -> dict:
    """The settings recorded in a PNG written by ``ddpm-rt``.

    The file's chunks are walked directly up to the first image data (``IDAT``): no pixel
    is decoded (an animated PNG with a huge canvas and many frames once made this hang:
    Pillow's ``text`` decodes every frame to find late text chunks), and the ``ddpm-rt``
    chunk is read only if its length is within :data:`MAX_PROVENANCE_BYTES`. Pillow writes
    a ``pnginfo``'s chunks before the image data, so that is where ours is."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                raise InputError(f"{path} is not a PNG file")
            text = _provenance_text(f, path)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if text is None:
        raise InputError(f"{path} has no ddpm-rt settings (not written by ddpm-rt)")
    try:
        return json.loads(text)
    except ValueError:
        raise InputError(f"{path}: its ddpm-rt settings are not valid JSON") from None


def _provenance_text(f, path) -> str | None:
    """The ``ddpm-rt`` iTXt (or tEXt) chunk's text, looked for before the first IDAT."""
    key = PROVENANCE_KEY.encode() + b"\0"
    for _ in range(_MAX_CHUNKS):
        head = f.read(8)
        if len(head) < 8:
            return None  # the end of the file
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind in (b"IDAT", b"IEND"):
            return None
        peek = f.read(min(length, len(key))) if kind in (b"iTXt", b"tEXt") else b""
        if peek != key:
            f.seek(length - len(peek) + 4, 1)  # the rest of the chunk and its CRC, unread
            continue
        if length > MAX_PROVENANCE_BYTES:
            raise InputError(
                f"{path}: its ddpm-rt chunk claims {length} bytes, over the limit of "
                f"{MAX_PROVENANCE_BYTES}"
            )
        data = peek + f.read(length - len(peek))
        crc = f.read(4)
        if len(data) != length or crc != zlib.crc32(head[4:] + data).to_bytes(4, "big"):
            raise InputError(f"{path}: its ddpm-rt chunk is truncated or damaged")
        body = data[len(key) :]
        if kind == b"tEXt":
            return body.decode("latin-1")
        return _itxt_text(body, path)
    raise InputError(f"{path}: over {_MAX_CHUNKS} chunks before the image data")


def _itxt_text(body: bytes, path) -> str:
    """iTXt after the keyword: compression flag and method, language\0, keyword\0, text."""
    try:
        compressed, rest = body[0], body[2:]
        text = rest.split(b"\0", 2)[2]
        if compressed:
            inflate = zlib.decompressobj()
            text = inflate.decompress(text, MAX_PROVENANCE_BYTES + 1)
            if len(text) > MAX_PROVENANCE_BYTES:
                raise InputError(f"{path}: its ddpm-rt chunk inflates past the limit")
            if not inflate.eof:
                raise zlib.error("truncated")
        return text.decode("utf-8")
    except (IndexError, zlib.error, UnicodeDecodeError):
        raise InputError(f"{path}: its ddpm-rt chunk is malformed") from None


def save_gif(
    path: str | Path, frames: list[np.ndarray], scale: int = 1, ncols: int | None = None
) -> Path:
    """An animated GIF of grids (one frame per (N, H, W, 3) batch), written atomically."""
    if not frames:
        raise InputError("no frames to write")
    n, h, w = frames[0].shape[:3]
    check_png(n, h, w, scale, ncols)
    imgs = []
    for f in frames:
        grid = f[0] if len(f) == 1 else make_grid(f, ncols)
        img = Image.fromarray(grid, "RGB")
        if scale != 1:
            img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        imgs.append(img)
    return atomic_write(
        path,
        lambda f: imgs[0].save(
            f, format="GIF", save_all=True, append_images=imgs[1:], duration=120, loop=0
        ),
    )


# -- pictures in: image-to-image and inpainting (issue 28) ------------------------------
# Formats read, and the limits on what is read: a file over MAX_INPUT_BYTES or a picture
# over MAX_INPUT_PIXELS (checked from its header, before any pixel is decoded) is refused.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_INPUT_BYTES = 64 << 20
MAX_INPUT_PIXELS = 4096 * 4096
# The resampling filter to the model's pixel size (up or down), for pictures and masks.
RESIZE_FILTER = Image.Resampling.LANCZOS
MASK_THRESHOLD = 128  # a mask pixel at or above this grey level (0-255) is repainted


def _open_picture(src, what: str) -> Image.Image:
    """A path to a PNG, JPEG or WebP file -> its first frame, loaded; or an InputError."""
    path = Path(src)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}", what) from None
    if not path.is_file():
        raise InputError(f"{what} {path} is not a regular file", what)
    return _decode(path, size, f"{what} {path}", what)


def _bytes_picture(data, what: str) -> Image.Image:
    """A PNG, JPEG or WebP file's bytes (e.g. an upload) -> its first frame, loaded; the
    same checks as a file's."""
    data = bytes(data)
    return _decode(io.BytesIO(data), len(data), what, what)


def _decode(src, size: int, label: str, what: str) -> Image.Image:
    """The checks and decoding of a path or file object holding ``size`` bytes: the byte
    and pixel limits (the latter from the header, before any pixel is decoded), the first
    frame. ``label`` names it in messages; ``what`` is the field."""
    if size > MAX_INPUT_BYTES:
        raise InputError(f"{label} is over {MAX_INPUT_BYTES >> 20} MiB", what)
    try:
        im = Image.open(src, formats=INPUT_FORMATS)  # the header only, so far
        w, h = im.size
        if w * h > MAX_INPUT_PIXELS:
            raise InputError(
                f"{label} is {w}x{h} pixels, over the limit of "
                f"{MAX_INPUT_PIXELS / 1e6:.1f} M pixels",
                what,
            )
        im.seek(0)  # an animated picture: its first frame
        im.load()
        frame = im.copy()  # (an animated file keeps its handle open: closed here)
        im.close()
    except InputError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise _unreadable(label, e, what) from None
    return frame


def _unreadable(label: str, e: Exception, what: str) -> InputError:
    """The one-line refusal of bytes Pillow cannot read as a PNG, JPEG or WebP picture."""
    if isinstance(e, UnidentifiedImageError):  # its message names a Python object
        return InputError(f"{label} is not a readable PNG, JPEG or WebP picture", what)
    return InputError(f"{label} is not a readable PNG, JPEG or WebP picture: {first_line(e)}", what)


def check_picture_header(data: bytes, what: str) -> tuple[int, int]:
    """A picture's bytes checked from their header alone (cheap: no pixel is decoded):
    a PNG, JPEG or WebP within the byte and pixel limits -> (width, height); else an
    InputError naming ``what``. A server checks an upload with it before queueing it."""
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"{what} is over {MAX_INPUT_BYTES >> 20} MiB", what)
    try:
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise _unreadable(what, e, what) from None
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(
            f"{what} is {w}x{h} pixels, over the limit of {MAX_INPUT_PIXELS / 1e6:.1f} M pixels",
            what,
        )
    return w, h


def transparent_mask(src, what: str = "mask") -> np.ndarray | None:
    """The OpenAI images API's mask convention -> ours: a picture's fully transparent pixels
    (alpha 0) are the area to repaint. Returns an (H, W) uint8 mask, 255 = repaint (as
    :func:`load_mask` reads it), or None when the picture has no alpha channel."""
    if isinstance(src, (bytes, bytearray, memoryview)):  # no alpha: known from the header
        try:
            with Image.open(io.BytesIO(src), formats=INPUT_FORMATS) as im:
                if not _has_alpha(im):
                    return None
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            pass  # _picture says what is wrong with it
    im = _picture(src, what)
    if not _has_alpha(im):
        return None
    alpha = np.asarray(im.convert("RGBA"))[..., 3]
    return np.where(alpha == 0, np.uint8(255), np.uint8(0))


def _array_picture(src, what: str) -> Image.Image:
    """A NumPy array (H, W), (H, W, 1|3|4): uint8, or floats in [0, 1] -> a Pillow image."""
    arr = np.asarray(src)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or 0 in arr.shape:
        raise InputError(
            f"{what} must be an (H, W), (H, W, 3) or (H, W, 4) array, got {arr.shape}", what
        )
    if arr.shape[0] * arr.shape[1] > MAX_INPUT_PIXELS:
        raise InputError(f"{what} has {arr.shape[0]}x{arr.shape[1]} pixels, over the limit", what)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputError(f"{what} holds NaN or Inf", what)
        if arr.min() < 0 or arr.max() > 1:
            raise InputError(f"{what}: a float array's values must lie in [0, 1]", what)
        arr = np.rint(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8 and arr.dtype != np.bool_:
        raise InputError(f"{what} must be uint8, bool or float in [0, 1], got {arr.dtype}", what)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * np.uint8(255)
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))  # L, RGB or RGBA


def _picture(src, what: str) -> Image.Image:
    if isinstance(src, (str, Path)):
        return _open_picture(src, what)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _bytes_picture(src, what)
    if isinstance(src, np.ndarray):
        return _array_picture(src, what)
    raise InputError(
        f"{what} must be a file path or a NumPy array (or a picture file's bytes), got "
        f"{type(src).__name__}",
        what,
    )


def _has_alpha(im: Image.Image) -> bool:
    """An alpha channel, or a palette's or colour key's transparency (a tRNS chunk)."""
    return im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info


def _upright(im: Image.Image) -> Image.Image:
    """The picture as it is meant to be seen: its EXIF orientation applied (a phone's JPEG),
    and 16- or 32-bit greyscale scaled to 8 bits (Pillow's convert would clip it)."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        grey = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    return im


def _resized(im: Image.Image, h: int, w: int) -> Image.Image:
    return im if im.size == (w, h) else im.resize((w, h), RESIZE_FILTER)


def load_picture(src, h: int, w: int, what: str = "init_image") -> np.ndarray:
    """A picture to start from -> (h, w, 3) uint8: its first frame, transparency composited on
    white (the training data's background), resized to h x w with :data:`RESIZE_FILTER`."""
    im = _upright(_picture(src, what))
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(_resized(im.convert("RGB"), h, w), dtype=np.uint8)


def load_mask(src, h: int, w: int, what: str = "mask") -> np.ndarray:
    """A mask -> (h, w) bool, True where the picture is repainted: any picture converted to
    one grey channel (transparency counts as black: kept), resized to h x w like the
    picture, then grey >= :data:`MASK_THRESHOLD` (of 255) is repainted."""
    im = _upright(_picture(src, what))
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    grey = np.asarray(_resized(im.convert("L"), h, w))
    return grey >= MASK_THRESHOLD
