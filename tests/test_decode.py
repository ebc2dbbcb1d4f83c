"""Decoding: every image variant becomes RGB size x size; broken files get a reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from imagepca.images import ImageDecodeError, decode_image

SIZE = 64


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def halves(mode: str = "RGB", size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: orientation shows in the decoded array."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image.convert(mode)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(halves(), "JPEG", quality=95, exif=exif)


def png_16bit_gray() -> bytes:
    values = np.tile(np.linspace(0, 65535, 32, dtype=np.uint16), (16, 1))
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((0, 200, 0), (200, 0, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (10, 0, 20, 20))
    return encode(image, "PNG", transparency=0)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


VALID = {
    "rgb jpeg": lambda: encode(halves(), "JPEG"),
    "grayscale jpeg": lambda: encode(halves("L"), "JPEG"),
    "cmyk jpeg": lambda: encode(halves("CMYK"), "JPEG"),
    "rgba png": lambda: encode(halves("RGBA"), "PNG"),
    "gray+alpha png": lambda: encode(halves("LA"), "PNG"),
    "palette png with transparency": palette_with_transparency,
    "16-bit grayscale png": png_16bit_gray,
    "exif-rotated jpeg": exif_rotated_jpeg,
    "animated gif": animated_gif,
    "1x1 png": lambda: encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
    "very wide jpeg": lambda: encode(halves(size=(4000, 8)), "JPEG"),
    "bmp": lambda: encode(halves(), "BMP"),
    "webp": lambda: encode(halves(), "WEBP"),
    "tiff": lambda: encode(halves(), "TIFF"),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_every_variant_becomes_rgb_at_model_size(name):
    pixels = decode_image(VALID[name](), SIZE)
    assert pixels.shape == (SIZE, SIZE, 3)
    assert pixels.dtype == np.uint8


def test_orientation_and_colours_survive():
    plain = decode_image(encode(halves(), "PNG"), SIZE).astype(int)
    assert plain[:, : SIZE // 4, 0].mean() > 200 and plain[:, : SIZE // 4, 2].mean() < 50
    assert plain[:, -SIZE // 4 :, 2].mean() > 200

    # EXIF orientation 6: displayed rotated 90 degrees clockwise, so red ends up on top.
    rotated = decode_image(exif_rotated_jpeg(), SIZE).astype(int)
    assert rotated[: SIZE // 4, :, 0].mean() > 180 and rotated[: SIZE // 4, :, 2].mean() < 80
    assert rotated[-SIZE // 4 :, :, 2].mean() > 180 and rotated[-SIZE // 4 :, :, 0].mean() < 80


def test_transparency_is_flattened_on_white():
    pixels = decode_image(palette_with_transparency(), SIZE).astype(int)
    assert (pixels[:, : SIZE // 4] >= 250).all()  # transparent half -> white
    assert pixels[:, -SIZE // 4 :, 0].mean() > 240 and pixels[:, -SIZE // 4 :, 1].mean() < 15


@pytest.mark.parametrize(("mode", "transparent"), [("RGB", (200, 0, 0)), ("L", 200)])
def test_a_single_transparent_colour_is_flattened_on_white_too(mode, transparent):
    """PNG's tRNS in a gray or RGB image: the same picture as a palette's transparency."""
    image = Image.new(mode, (40, 20), transparent)
    image.paste(Image.new(mode, (20, 20), 0 if mode == "L" else (0, 0, 255)), (20, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=transparent)
    pixels = decode_image(buffer.getvalue(), SIZE).astype(int)
    assert (pixels[:, : SIZE // 4] >= 250).all()  # the transparent colour -> white
    assert pixels[:, -SIZE // 4 :].mean() < 90  # the opaque half keeps its colour


def test_sixteen_bit_range_is_scaled_not_clipped():
    pixels = decode_image(png_16bit_gray(), SIZE)
    assert pixels[:, 0].mean() < 20 and pixels[:, -1].mean() > 235
    assert (pixels[..., 0] == pixels[..., 2]).all()  # gray stays gray


@pytest.mark.parametrize(
    "mode, top",
    [("F", 1.0), ("F", 255.0), ("F", 4000.0), ("I", 255), ("I", 65535), ("I", 1_000_000)],
)
def test_32_bit_grayscale_is_scaled_by_the_range_its_values_fill(mode, top):
    """Modes I and F (32-bit TIFFs) say no range: a 0-255 gradient was black as I (read as
    16-bit) and white as F (read as 0-1)."""
    values = np.tile(np.linspace(0, top, 32), (16, 1)).astype(
        np.float32 if mode == "F" else np.int32
    )
    image = Image.fromarray(values, mode)
    assert image.mode == mode
    pixels = decode_image(encode(image, "TIFF"), SIZE).astype(float)
    # The gradient, from black to white, whatever the range.
    assert pixels[:, :4].mean() < 20 and pixels[:, -4:].mean() > 235
    assert 100 < pixels.mean() < 155


def test_animated_image_gives_first_frame():
    pixels = decode_image(animated_gif(), SIZE).astype(int)
    assert pixels[..., 1].mean() > 150 and pixels[..., 0].mean() < 60


def test_fast_decode_keeps_size_and_content():
    photo = encode(halves(size=(1600, 1200)), "JPEG", quality=90)
    exact = decode_image(photo, SIZE).astype(float)
    fast = decode_image(photo, SIZE, fast_decode=True).astype(float)
    assert fast.shape == exact.shape
    assert np.abs(fast - exact).mean() < 3


BROKEN = {
    "empty file": (lambda: b"", "empty file"),
    "truncated jpeg": (lambda: encode(halves(size=(200, 200)), "JPEG")[:400], "corrupt image"),
    "truncated png": (lambda: encode(halves(size=(200, 200)), "PNG")[:120], "corrupt image"),
    "text named .jpg": (lambda: b"this is not an image\n" * 10, "not an image"),
    "pdf bytes": (lambda: b"%PDF-1.4\n1 0 obj << >> endobj\n", "not an image"),
    "decompression bomb": (lambda: png_header_only(30_000, 30_000), "decompression bomb"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_are_rejected_with_a_reason(name):
    make, kind = BROKEN[name]
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(make(), SIZE)
    reason = str(caught.value)
    assert reason.split(":")[0] == kind, reason
    assert len(reason) > len(kind) + 2  # a detail follows the kind


def test_running_out_of_memory_is_not_a_verdict_on_the_file(monkeypatch):
    """An incremental run keeps a file rejected for its bytes without reading it again;
    a worker short of memory says nothing about them: "unreadable", tried again."""

    def short_of_memory(image):
        raise MemoryError

    png = encode(halves(), "PNG")
    monkeypatch.setattr(Image.Image, "load", short_of_memory)
    with pytest.raises(ImageDecodeError, match="^unreadable: the worker ran out of memory"):
        decode_image(png, SIZE)


def test_pixel_limit_is_a_parameter():
    image = encode(Image.new("RGB", (300, 300), "white"), "PNG")
    assert decode_image(image, SIZE, max_pixels=300 * 300).shape == (SIZE, SIZE, 3)
    with pytest.raises(ImageDecodeError, match="decompression bomb: .*90000 pixels"):
        decode_image(image, SIZE, max_pixels=300 * 300 - 1)


# 900M pixels: past twice the first two limits (Pillow raises), less than twice the third
# (Pillow warns).
@pytest.mark.parametrize("max_pixels", [1_000, 89_478_485, 500_000_000])
def test_a_decompression_bomb_names_the_limit_that_was_set(max_pixels):
    """Pillow's own text names twice the limit past that: the reason names the setting."""
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(png_header_only(30_000, 30_000), SIZE, max_pixels=max_pixels)
    assert str(caught.value) == (
        f"decompression bomb: 900000000 pixels exceeds max_image_pixels={max_pixels} "
        "(notebook 01's parameter, imagepca run's --max-image-pixels)"
    )


def test_a_small_limit_does_not_leak_into_pillow():
    """The limit is the caller's: a later ``Image.open`` elsewhere (a notebook's own code)
    keeps Pillow's limit as it was."""
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(encode(Image.new("RGB", (64, 64)), "PNG"), SIZE, max_pixels=1_000)
    assert before == Image.MAX_IMAGE_PIXELS
    Image.open(io.BytesIO(encode(Image.new("RGB", (64, 64)), "PNG"))).load()
