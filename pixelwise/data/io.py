"""Reading and writing images and label maps (atomic writes: :mod:`pixelwise.fs`).

Readers turn every problem with a file (missing, unreadable, truncated, wrong kind of label
file) into a :class:`~pixelwise.errors.DataError` that names the file and says what to do.
Readers load the whole file before returning: a truncated image is an error, never a
half-grey picture.

Writers are atomic: they write to a temporary file in the destination folder and
``os.replace`` it onto the final name, so a reader never sees a half-written file and an
interrupted write leaves the old file (or nothing) in place.
"""
from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pixelwise.data.classes import ClassInfo, palette_bytes
from pixelwise.errors import DataError
from pixelwise.fs import (  # noqa: F401  (re-exported)
    DiskFullError, atomic_directory, atomic_open, atomic_write_bytes, atomic_write_text,
)

__all__ = [
    "DiskFullError",
    "atomic_directory",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "colors_to_label",
    "read_image",
    "read_image_info",
    "read_label",
    "write_image",
    "write_label_png",
]

ImageMode = Literal["RGB", "L"] | None

# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------

_truncation_lock = threading.Lock()
_LABEL_MODES = {"P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N", "PA", "LA"}
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def _tile_rawmode(img: Image.Image) -> str | None:
    """How the file stores its pixels (PIL's raw mode, e.g. ``"RGB;16B"``), if PIL says."""
    try:
        args = img.tile[0].args if img.tile else None
    except (AttributeError, IndexError):
        return None
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else None


def _open_fully(path: str | Path, what: str) -> Image.Image:
    """Open and decode the first frame of an image file completely, or raise DataError.

    Truncated files are always an error, even when someone set PIL's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` (which would fill the missing part with grey).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise DataError(path, f"{what} path is not a file")
        raise DataError(path, f"{what} file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot read {what} file: {e.strerror or e}") from None
    try:
        with _truncation_lock:
            saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            try:
                img = Image.open(io.BytesIO(data))
                rawmode = _tile_rawmode(img)
                img.load()
                if rawmode:
                    img.info["pixelwise_rawmode"] = rawmode  # e.g. "RGB;16B": 16 bits per channel in the file
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = saved
    except UnidentifiedImageError:
        raise DataError(path, f"{what} file is not a readable image (unknown or corrupt format)",
                        "re-export it as PNG or JPEG") from None
    except Image.DecompressionBombError as e:
        raise DataError(path, f"{what} is too large to decode safely: {e}",
                        "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        problem = str(e) or type(e).__name__
        if "truncated" in problem.lower():
            raise DataError(path, f"{what} file is truncated: it ends before its pixel data does",
                            "the file is incomplete: copy or download it again") from None
        raise DataError(path, f"{what} file is corrupt or unreadable ({problem})",
                        "re-export it as PNG or JPEG") from None
    return img


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map the value range [min, max] of a high-bit-depth image linearly onto 0..255."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, np.nan)
    lo, hi = np.nanmin(a) if finite.any() else 0.0, np.nanmax(a) if finite.any() else 0.0
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    out = (np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


_MODE_NAMES = {"1": "1-bit", "L": "grayscale", "LA": "grayscale + alpha", "P": "palette", "PA": "palette + alpha",
               "RGBA": "RGBA", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV", "RGBX": "RGBX",
               "RGBa": "RGBA (premultiplied)", "La": "grayscale + alpha (premultiplied)"}


def _conversion_note(img: Image.Image, mode: ImageMode) -> str | None:
    """What reading ``img`` in ``mode`` changes, in words (None: nothing worth telling)."""
    src = img.mode
    if src in _HIGH_BIT_MODES:
        bits = "32-bit float" if src == "F" else ("32-bit" if src == "I" else "16-bit")
        note = f"{bits} grayscale image ({src}): scaled to 8 bits by its value range (min -> 0, max -> 255)"
        return note + (", repeated over 3 channels" if mode == "RGB" else "")
    deep = ";16" in img.info.get("pixelwise_rawmode", "")
    if deep and src in ("RGB", "RGBA"):  # PIL keeps the high byte of each 16-bit value
        note = f"16-bit {src} image: reduced to 8 bits per channel (the high byte of each value)"
        return note + (", the alpha channel dropped" if src == "RGBA" and mode == "RGB" else
                       ", converted to grayscale (luma)" if mode == "L" else "")
    if mode is None or src == mode:
        return None
    alpha = src in ("RGBA", "LA", "PA", "RGBa", "La") or (src == "P" and "transparency" in img.info)
    name = _MODE_NAMES.get(src, src)
    if mode == "RGB":
        if src in ("1", "L"):
            return f"{name} image: repeated over 3 channels (RGB)"
        if src in ("LA", "La"):
            return f"{name} image: alpha dropped, gray repeated over 3 channels (RGB)"
        if alpha:
            return f"{name} image: the alpha channel (transparency) is dropped"
        if src == "P":
            return None  # palette colours are the image's colours: nothing is lost
        return f"{name} image: converted to RGB"
    if src in ("1", "LA", "La"):
        return f"{name} image: read as 8-bit grayscale" if src != "1" else None
    return f"{name} image: converted to grayscale (luma)"


def read_image_info(path: str | Path, mode: ImageMode = "RGB") -> tuple[np.ndarray, str | None]:
    """:func:`read_image` plus a note saying what the conversion to ``mode`` changed:
    16-bit/32-bit values scaled to 8 bits, alpha dropped, grayscale repeated over three
    channels, colour turned to luma (None when the file was read as stored). ``pixelwise
    data check`` reports the notes as warnings: such images are accepted, not refused."""
    if mode not in ("RGB", "L", None):
        raise ValueError(f"mode must be 'RGB', 'L' or None, got {mode!r}")
    img = _open_fully(path, "image")
    note = _conversion_note(img, mode)
    try:
        if img.mode in _HIGH_BIT_MODES:
            gray = _scale_to_uint8(np.asarray(img))
            if mode == "RGB":
                return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)), note
            return gray[:, :, None], note
        if mode is None:
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif img.mode == "PA":
                img = img.convert("RGBA")
            elif img.mode not in ("L", "LA", "RGB", "RGBA"):
                img = img.convert("RGB")
        elif img.mode != mode:
            if mode == "L" and img.mode not in ("1", "LA"):
                img = img.convert("RGB")  # palette, CMYK, YCbCr, RGBA: through RGB to luma
            img = img.convert(mode)
        a = np.array(img, dtype=np.uint8)  # a writable copy
    except (OSError, ValueError, TypeError) as e:  # a mode PIL cannot convert, odd sample formats
        raise DataError(path, f"image of mode {img.mode} cannot be converted to {mode or 'an array'} ({e})",
                        "re-export it as 8-bit RGB or grayscale PNG") from None
    return (a[:, :, None] if a.ndim == 2 else a), note


def read_image(path: str | Path, mode: ImageMode = "RGB") -> np.ndarray:
    """Read an image as a uint8 array of shape (H, W, C).

    Args:
        path: any format PIL reads (PNG, JPEG, TIFF, BMP, ...); the first frame is used.
            The stored pixel grid is returned as is (EXIF orientation is not applied, so
            label maps drawn on the stored grid stay aligned).
        mode: ``"RGB"`` (C=3), ``"L"`` (C=1, grayscale) or ``None`` (keep the file's channels:
            1 gray, 2 gray+alpha, 3 RGB, 4 RGBA; palette images become RGB or RGBA).
            16-bit and 32-bit images are scaled to 8 bits by their value range
            (min -> 0, max -> 255). RGBA drops alpha for ``"RGB"``; grayscale is repeated
            over three channels for ``"RGB"``; colour becomes luma for ``"L"``
            (:func:`read_image_info` also says which of these happened).

    Raises:
        DataError: the file is missing, unreadable, truncated or corrupt, or its mode cannot
            be converted.
    """
    return read_image_info(path, mode)[0]


def read_label(path: str | Path) -> np.ndarray:
    """Read a label map (class ids or instance ids) as an int64 array (H, W).

    Accepted: palette ("P") PNGs, whose pixel values are the indices (the colours are only
    for display, as in VOC), and single-channel 8/16-bit index images ("L", "I;16").
    Lossy JPEG files and RGB(A) colour-coded masks are refused with a DataError that says how
    to convert them (:func:`colors_to_label` maps colours to indices).

    Raises:
        DataError: missing, unreadable or truncated file, a JPEG, or a colour image.
    """
    path = Path(path)
    img = _open_fully(path, "label")
    if img.format in ("JPEG", "MPO"):
        raise DataError(path, "label map is a JPEG: lossy compression changes the class ids at edges",
                        "save labels as palette or grayscale PNG files")
    if img.mode == "F":
        raise DataError(path, "label map holds floating-point values, not integer class ids",
                        "save labels as palette or grayscale (8/16-bit) PNG files of class ids")
    if img.mode not in _LABEL_MODES:
        raise DataError(
            path,
            f"label map is a {img.mode} colour image but a palette/index PNG is expected "
            "(pixel value = class id)",
            "pass the colour table: --colors FILE (JSON {\"name\": [r, g, b]} or CVAT labelmap.txt), or convert once: "
            "pixelwise data convert DIR --to voc --colors FILE (in Python: pixelwise.data.io.colors_to_label)",
        )
    if img.mode in ("PA", "LA"):
        img = img.getchannel(0)
    return np.asarray(img).astype(np.int64)


def colors_to_label(rgb: np.ndarray, colors: Sequence[Sequence[int]], ignore_index: int = 255,
                    ignore_color: Sequence[int] | None = (224, 224, 192)) -> np.ndarray:
    """Convert a colour-coded mask (H, W, 3) to class ids (H, W) int64.

    Pixel colour ``colors[i]`` becomes ``i``; ``ignore_color`` and every colour not in the
    list become ``ignore_index``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) colour array, got shape {rgb.shape}")
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    out = np.full(code.shape, ignore_index, np.int64)
    for i, (r, g, b) in enumerate(colors):
        out[code == ((r << 16) | (g << 8) | b)] = i
    if ignore_color is not None:
        r, g, b = ignore_color
        out[code == ((r << 16) | (g << 8) | b)] = ignore_index
    return out


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------


def _pil_format(path: Path) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {path.suffix!r} (use .png or .jpg)")
    return fmt


def _save_atomic(img: Image.Image, path: Path, fsync: bool, **params: object) -> Path:
    buf = io.BytesIO()
    img.save(buf, format=_pil_format(path), **params)
    return atomic_write_bytes(path, buf.getvalue(), fsync=fsync)


def write_label_png(path: str | Path, label: np.ndarray,
                    palette: bytes | Sequence[ClassInfo] | None = None, *, fsync: bool = True) -> Path:
    """Write a label map (H, W) with values 0..255 as a palette ("P") PNG, atomically.

    Args:
        label: integer array (or tensor) of class or instance ids; 255 = ignore.
        palette: 768 palette bytes, a class list (see :func:`~pixelwise.data.classes.palette_bytes`),
            or None for the VOC palette.

    Raises:
        DataError: values outside 0..255 (they do not fit a palette PNG).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: label maps must be written as .png")
    a = np.asarray(label)
    if a.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D (H, W), got shape {a.shape}")
    if a.dtype.kind not in "biu":
        raise ValueError(f"{path}: label map must hold integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise DataError(path, f"label values {int(a.min())}..{int(a.max())} do not fit a palette PNG (0..255)",
                        "use at most 255 ids per map, or write a 16-bit PNG")
    if palette is None or not isinstance(palette, (bytes, bytearray)):
        palette = palette_bytes(palette)  # type: ignore[arg-type]
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))  # mode "L" ...
    img.putpalette(bytes(palette))  # ... becomes "P"
    return _save_atomic(img, path, fsync)


def write_image(path: str | Path, array: np.ndarray, *, quality: int = 95, fsync: bool = True) -> Path:
    """Write an image atomically; the format follows the extension (.png lossless, .jpg ...).

    Args:
        array: uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); float arrays are taken as
            values in [0, 1] and scaled to 0..255.
        quality: JPEG quality.
    """
    path = Path(path)
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"{path}: expected an (H, W[, 1|3|4]) image array, got shape {np.shape(array)}")
    if a.dtype.kind == "f":
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{path}: integer image values must be 0..255")
        a = a.astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(a))
    fmt = _pil_format(path)
    params: dict[str, object] = {}
    if fmt == "JPEG":
        if img.mode == "RGBA":
            img = img.convert("RGB")
        params["quality"] = quality
    return _save_atomic(img, path, fsync, **params)
