"""Per source file: keep the original JPEG bytes, re-encode to RGB JPEG, or skip with a reason.

Runs in worker processes, so it imports only PIL and the standard library.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

from PIL import Image, ImageOps, UnidentifiedImageError

KEEP, REENCODE, SKIP = "keep", "reencode", "skip"
REENCODE_QUALITY = 95
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera JPEG with extra frames; the first frame is a plain JPEG
_EXIF_ORIENTATION = 0x0112
# A Huffman-coded JPEG spends at least 2 bits on every 8x8 block of its full-resolution component
# (a DC code and an end-of-block code; a solid grey image measures 2.0). Half of that is the floor:
# a file under it ends its scan early, and decoders fill the rest with grey (PIL, libjpeg-turbo and
# nvJPEG do not complain), so a 20 KB file can claim 12000 x 9000 and cost a 324 MB decode a view.
_MIN_BITS_PER_BLOCK = 1
_ARITHMETIC_SOF = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # arithmetic coding can go below the floor


class Checked(NamedTuple):
    action: str  # keep | reencode | skip
    data: bytes  # the bytes to store (empty when skipped)
    width: int
    height: int
    reason: str  # why it was re-encoded or skipped; "" when kept


def _skip(reason: str) -> Checked:
    return Checked(SKIP, b"", 0, 0, reason)


def check_file(path: str, max_side: int | None = None) -> Checked:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return _skip(f"unreadable ({e.strerror or e})")
    return check_bytes(data, max_side)


def check_bytes(data: bytes, max_side: int | None = None) -> Checked:
    if not data:
        return _skip("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 MP and raises above twice that (skipped below as too large); a
            # warning per large file from every worker would only bury the run's own report
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            width, height = img.size
            if img.format in _JPEG_FORMATS and _too_short(data, width, height):
                return _skip(f"truncated (its JPEG data, {len(data)} bytes, is too short for {width} x {height})")
            reasons = _reencode_reasons(img, max_side)
            if not reasons:
                # DCT-scaled decode still entropy-decodes every block, so truncation and corrupt
                # scans surface, at a fraction of the cost of a full decode.
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
                return Checked(KEEP, data, width, height, "")
            img.load()
            return _reencode(img, reasons, max_side)
    except UnidentifiedImageError:
        return _skip("not an image")
    except Image.DecompressionBombError as e:
        return _skip(f"too large ({e})")
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        message = str(e)
        if "truncated" in message or isinstance(e, EOFError):
            return _skip("truncated")
        return _skip(f"corrupt ({message or type(e).__name__})")


def _too_short(data: bytes, width: int, height: int) -> bool:
    scan_start, arithmetic = _frame_header(data)
    return not arithmetic and (len(data) - scan_start) * 8 < _MIN_BITS_PER_BLOCK * (width / 8) * (height / 8)


def _frame_header(data: bytes) -> tuple[int, bool]:
    """(where the first scan starts, whether the frame is arithmetic-coded), from a walk over the
    marker segments before it: metadata (EXIF, ICC, comments) does not count as image data, and
    bytes inside it are not mistaken for markers. A walk that finds no scan counts the whole file."""
    i, arithmetic = 2, False  # after SOI
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        arithmetic = arithmetic or marker in _ARITHMETIC_SOF
        if marker == 0xDA:  # start of scan
            return i, arithmetic
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return 0, arithmetic


def _reencode_reasons(img: Image.Image, max_side: int | None) -> list[str]:
    reasons = []
    if img.format not in _JPEG_FORMATS:
        reasons.append(f"{(img.format or 'unknown').lower()} image")
    elif img.mode != "RGB":
        reasons.append({"L": "grayscale jpeg", "CMYK": "cmyk jpeg"}.get(img.mode, f"{img.mode} jpeg"))
    elif img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        # Decoders disagree on applying EXIF rotation (DALI does, PIL does not): bake it in so the
        # stored width/height hold for every reader.
        reasons.append("exif orientation")
    if max_side and max(img.size) > max_side:
        reasons.append("resized")
    return reasons


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        high = np.asarray(img, dtype=np.int64) >> 8  # PIL holds 16-bit PNGs as I or I;16
        img = Image.fromarray(np.clip(high, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _reencode(img: Image.Image, reasons: list[str], max_side: int | None) -> Checked:
    if img.format in _JPEG_FORMATS:
        img = ImageOps.exif_transpose(img)
    rgb = _to_rgb(img)
    if max_side and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=REENCODE_QUALITY)
    return Checked(REENCODE, buf.getvalue(), rgb.width, rgb.height, ", ".join(reasons))


def check_chunk(paths: list[str], max_side: int | None) -> list[Checked]:
    """Worker entry point: a chunk amortises the inter-process round trip."""
    return [check_file(p, max_side) for p in paths]
