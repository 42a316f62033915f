"""Image loading for face recognition: any photograph or array -> (H, W, 3) uint8 RGB.

Files are decoded with Pillow, turned upright by their EXIF orientation, and
checked against :data:`MAX_IMAGE_PIXELS` from the header before decoding; a
large file is decoded reduced by an integer factor (JPEG ``draft``, else
``Image.reduce``). 16-bit and float images are scaled to 8 bits, never
clipped. :mod:`mriface.recognition.align` re-exports :func:`load_image` and
:data:`MAX_IMAGE_PIXELS`; see its docstring for how detection uses the
reduction factor.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import InputFileError, MRIFaceError

__all__ = ["load_image", "MAX_IMAGE_PIXELS"]

#: most pixels an image may have once decoded (after any decode-time reduction): 80 megapixels,
#: about 240 MB as 8-bit RGB and 1 GB as the float tensor MTCNN reads. Checked from the header.
MAX_IMAGE_PIXELS = 80_000_000
#: EXIF tag of the orientation (1 = upright)
_ORIENTATION = 0x0112


def _to_rgb8(im: "object") -> np.ndarray:
    """A PIL image of any mode -> (H, W, 3) uint8 RGB, high bit depths scaled rather than clipped."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        finite = np.isfinite(a)
        lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
        a = np.where(finite, a, 0.0)
        # 16-bit modes are 16-bit data; otherwise judge by the range the values occupy
        if mode.startswith("I;16"):
            a = a / 257.0  # 65535 -> 255, and 257 * v -> v exactly (8-bit data stored in 16 bits)
        elif mode == "F" and lo >= 0 and hi <= 1.0:
            a = a * 255.0  # float in [0, 1]
        elif lo >= 0 and hi <= 255:
            pass  # already the 8-bit range
        elif lo >= 0 and hi <= 65535:
            a = a / 257.0  # 16-bit range held in a 32-bit or float image
        else:  # negative or beyond 16 bits: stretch what is there
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    # an RGB image needs no convert(), which would copy it once more (a 4000x3000 photo is 36 MB)
    return np.array(im if mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def _load(item: object, index: int, decode_side: "int | None",
          max_pixels: int = MAX_IMAGE_PIXELS) -> "tuple[np.ndarray, int]":
    """One image -> ((H, W, 3) uint8 RGB, integer reduction factor applied at decode time)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            with Image.open(path) as im:
                w, h = im.size
                k = max(1, max(w, h) // decode_side) if decode_side else 1
                if k > 1 and im.format == "JPEG":
                    # decode at 1/2, 1/4 or 1/8 in the DCT domain: a fraction of the time and memory
                    im.draft("RGB", (math.ceil(w / k), math.ceil(h / k)))
                kd = max(1, round(w / im.size[0]))
                dw, dh = im.size
                if dw * dh > max_pixels:
                    raise InputFileError(
                        f"image {path} is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels), over mriface's limit "
                        f"of {max_pixels / 1e6:.0f} megapixels decoded: downscale it (or give a JPEG, "
                        "which is decoded reduced)")
                # phones store sideways pictures with a tag; exif_transpose copies even an upright image
                turned = im.getexif().get(_ORIENTATION, 1) in range(2, 9)  # the values exif_transpose acts on
                arr = _to_rgb8(ImageOps.exif_transpose(im) if turned else im)
            k2 = k // kd
            if k2 > 1:  # formats without draft: integer box reduction after decoding
                arr = np.asarray(Image.fromarray(arr).reduce(k2))
            return np.ascontiguousarray(arr), kd * max(1, k2)
        except Image.DecompressionBombError as exc:
            raise InputFileError(
                f"image {path} is too large to decode safely ({exc}); downscale it first"
            ) from exc
        except InputFileError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise InputFileError(
                f"cannot read image {path}: {exc}. Give a JPEG/PNG/TIFF (anything Pillow opens; "
                "8 or 16 bits per channel, or single-channel float)"
            ) from exc
    if isinstance(item, Image.Image):
        return _to_rgb8(item), 1
    arr = np.asarray(item)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MRIFaceError(
            f"image {index} has shape {arr.shape}: give (H, W, 3) RGB, a PIL image or a file path"
        )
    arr = arr[..., :3]
    if arr.dtype == np.uint16:
        arr = np.rint(arr / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise MRIFaceError(f"image {index} has dtype {arr.dtype}: give uint8, uint16 or float in [0, 1]")
        arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr), 1


def load_image(item: object, index: int = 0, *, decode_side: "int | None" = None) -> np.ndarray:
    """One image as an (H, W, 3) uint8 RGB array.

    Parameters
    ----------
    item : path-like, PIL.Image or numpy array
        A path to any image file Pillow reads (turned upright by its EXIF
        orientation tag); a PIL image (any mode); an array (H, W) grey,
        (H, W, 3) RGB or (H, W, 4) RGBA, uint8, uint16 or float in [0, 1].
        16-bit images (``I;16`` greyscale, 16-bit RGB) are scaled to 8 bits
        (v / 257); single-channel float images by their range ([0, 1] x 255,
        else [0, 255], else stretched), never clipped.
    index : int
        Position in the caller's list, for error messages.
    decode_side : int, optional
        Decode a file whose long side is larger reduced by an integer factor
        (JPEG ``draft``, else ``reduce``), keeping the long side at least this.

    Raises
    ------
    InputFileError
        The file is missing, not an image, or would decode to more than
        :data:`MAX_IMAGE_PIXELS` (checked from its header, before decoding).
    MRIFaceError
        The object is not an image.
    """
    return _load(item, index, decode_side)[0]
