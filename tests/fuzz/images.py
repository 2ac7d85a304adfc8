"""Image files as strangers send them, made with Pillow (or by hand where Pillow would not write them)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from hypothesis import strategies as st

KINDS = ["png-L", "png-RGB", "png-RGBA", "png-LA", "png-P", "png-1", "png-I;16", "jpeg-RGB", "jpeg-L", "jpeg-CMYK",
         "gif-animated", "bmp-RGB", "tiff-F", "tiff-I;16", "webp-RGB", "ppm-RGB"]
NATURAL = {"png": ".png", "jpeg": ".jpg", "gif": ".gif", "bmp": ".bmp", "tiff": ".tif", "webp": ".webp", "ppm": ".ppm"}


def encode(kind: str, width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    fmt, mode = kind.split("-", 1)
    buffer = io.BytesIO()
    if mode == "animated":
        frames = [Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).convert("P") for _ in range(3)]
        frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
        return buffer.getvalue()
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.random((height, width), dtype=np.float32))
    else:
        channels = {"L": 1, "1": 1, "P": 1, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}[mode]
        array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        base = Image.fromarray(array[..., 0]) if channels == 1 else (
            Image.fromarray(array[..., :3]).convert("RGB"))
        image = base.convert(mode) if mode != "RGB" else base
        if mode == "RGBA" or mode == "LA":
            image = Image.fromarray(array, mode="RGBA" if mode == "RGBA" else "LA")
    image.save(buffer, {"jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP",
                        "ppm": "PPM"}[fmt])
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, color: int = 0, rows: int = 1) -> bytes:
    """A PNG whose header declares width x height (8-bit, colour type ``color``) with only ``rows`` rows of
    pixel data: a few hundred bytes that a decoder would expand to width x height pixels (a decompression bomb)."""
    channels = {0: 1, 2: 3, 6: 4}[color]
    raw = (b"\0" + b"\0" * width * channels) * rows
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    """(file name, bytes): an image of any kind and size, maybe damaged, maybe under a name that lies."""
    kind = draw(st.sampled_from(KINDS))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    data = encode(kind, width, height, draw(st.integers(0, 3)))
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "junk", "declared"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        data = bytes(data)
    elif damage == "junk":
        data = draw(st.binary(max_size=256))
    elif damage == "declared":  # a header that declares a large image the file does not hold
        data = png_declaring(draw(st.integers(1, 30000)), draw(st.integers(1, 30000)), draw(st.sampled_from([0, 2, 6])))
    suffix = draw(st.sampled_from([NATURAL[kind.split("-")[0]]] * 3 + [".png", ".jpg", ".JPEG", ".gif", ".txt"]))
    return kind.replace(";", "") + suffix, data
