"""What an image file is (extensions, label) and how it becomes a model input: decoding
on the executors. Where the files come from is :mod:`imagepca.inputs`.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps
from py4j.protocol import Py4JJavaError
from pyspark.errors import IllegalArgumentException
from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F

from .storage import Storage, error_summary

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class InputError(ValueError):
    """The input location cannot be used; the message names it and says what to do."""


def hidden_note(n_hidden: int, first: str | None) -> str:
    return (
        f"{n_hidden} image files skipped: their names, or a parent folder's, start with '_'"
        + (f" (the first: {first})" if first else "")  # unnamed by outputs before 1 December
        + ", which Spark's listing ignores; rename them, or list them in a manifest (--manifest)"
    )


def broken_links_note(n_links: int, first: str) -> str:
    return (
        f"{n_links} image files skipped: links to nothing (the first: {first}), which "
        "Spark's listing leaves out; restore their targets or remove the links"
    )


def not_utf8_note(n_files: int, first: str) -> str:
    return (
        f"{n_files} image files skipped: their names (or a parent folder's) are not UTF-8 "
        f"(the first: {first}), which Spark's listing cannot read; rename them to UTF-8, "
        "e.g. convmv -f latin1 -t utf8 -r --notest FOLDER"
    )


def not_images_note(n_rows: int, example: str | None) -> str:
    return (
        f"{n_rows} manifest rows skipped: their URIs are empty or do not end in an image "
        f"extension ({f'e.g. {example}' if example else 'rows without one'}); images are "
        "chosen by extension "
        f"({', '.join(IMAGE_EXTENSIONS)})"
    )


SKIPPED_PATHS_KEPT = 20  # paths of files a listing dropped that metrics.json names


def skipped_fields(
    hidden: tuple[str, ...],
    broken_links: tuple[str, ...],
    not_images: tuple,
    not_utf8: tuple[str, ...],
    several_folders: dict[str, list[str]] | None = None,
) -> dict:
    """What metrics.json says of the image files a listing dropped, and of the labels whose
    images sit in several folders (see :class:`imagepca.listing.ImageListing`)."""
    several_folders = several_folders or {}
    return {
        "n_hidden_skipped": len(hidden),
        "hidden_skipped": list(hidden[:SKIPPED_PATHS_KEPT]),
        "n_broken_links_skipped": len(broken_links),
        "broken_links_skipped": list(broken_links[:SKIPPED_PATHS_KEPT]),
        "n_not_utf8_skipped": len(not_utf8),
        "not_utf8_skipped": list(not_utf8[:SKIPPED_PATHS_KEPT]),
        "not_image_rows_skipped": list(not_images),
        "n_labels_from_several_folders": len(several_folders),
        "labels_from_several_folders": dict(list(several_folders.items())[:SKIPPED_PATHS_KEPT]),
    }


NOTHING_SKIPPED = skipped_fields((), (), (0, None), ())  # an output from before these fields


def skipped_notes(skipped: dict) -> list[str]:
    """What the fields on files a listing dropped (:meth:`imagepca.listing.ImageListing.skipped`,
    also in ``metrics.json``) tell the user, one note each."""
    notes = []
    for kind, note in (
        ("hidden", hidden_note),
        ("broken_links", broken_links_note),
        ("not_utf8", not_utf8_note),
    ):
        if skipped.get(f"n_{kind}_skipped"):  # counted, and the first named
            first = (skipped.get(f"{kind}_skipped") or [None])[0]
            notes.append(note(skipped[f"n_{kind}_skipped"], first))
    n_rows, example = skipped.get("not_image_rows_skipped", (0, None))
    if n_rows:
        notes.append(not_images_note(n_rows, example))
    several = skipped.get("labels_from_several_folders") or {}
    if several:
        label, (first, other) = next(iter(several.items()))
        count = skipped.get("n_labels_from_several_folders", len(several))
        notes.append(
            f"{count} label{'s' if count > 1 else ''} gather{'' if count > 1 else 's'} the "
            f"images of several folders, e.g. {label!r} those of {first} and {other}: a label "
            "is its images' folder's name; if they are different classes, rename the folders"
        )
    return notes


class ImageDecodeError(ValueError):
    """An image file cannot become a model input; ``str(error)`` is the reason recorded."""


def extension_glob(extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> str:
    """A case-insensitive Hadoop glob such as ``*.{[jJ][pP][gG],[pP][nN][gG]}``.

    Hadoop globs have no case-insensitive flag, and filtering during listing keeps
    non-image files from ever being read.
    """
    alternatives = [
        "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in ext.lstrip("."))
        for ext in extensions
    ]
    return "*.{" + ",".join(alternatives) + "}"


def label_of(path: str) -> str:
    """Class label of an image: the name of its parent folder."""
    return path.rstrip("/").rsplit("/", 2)[-2]


MIN_IMAGES_PER_LABEL = 2  # a classifier needs one image to train on and one to test on

# The most file bytes one Arrow batch of a folder's scan carries to a Python worker: it is
# that worker's memory, and Arrow's binary column holds at most 2 GiB (256 photos of 10 MB
# in one batch fail the job with OversizedAllocationException).
CONTENT_BATCH_BYTES = 256 << 20


def content_batch_rows(listing, most: int) -> int:
    """Files per Arrow batch of the featurization, whose task holds a batch's bytes at once
    (``listing`` is an :class:`imagepca.listing.ImageListing`): ``most``, or fewer where
    ``most`` of its largest files would carry more than :data:`CONTENT_BATCH_BYTES`. Then no
    batch does, unless one file alone is larger. Files a manifest gives no size are not
    counted in."""
    largest = listing.largest_file
    if largest is None or largest * most <= CONTENT_BATCH_BYTES:
        return most  # no job: the common case
    sized = listing.files.where(F.col("size").isNotNull()).select("size")
    sizes = sized.orderBy(F.desc("size")).limit(most).collect()
    total = 0
    for rows, (size,) in enumerate(sizes):
        total += size
        if total > CONTENT_BATCH_BYTES:
            return max(1, rows)
    return most


def small_labels(label_counts: dict[str, int]) -> dict[str, int]:
    """Labels with too few images to appear in both the training and the test set."""
    return {label: n for label, n in label_counts.items() if n < MIN_IMAGES_PER_LABEL}


def classifiable(label_counts: dict[str, int]) -> str | None:
    """Why no classifier can be trained on these labels, or None when one can."""
    kept = [label for label in label_counts if label not in small_labels(label_counts)]
    if len(kept) >= 2:
        return None
    return (
        f"a classifier needs at least 2 labels with >= {MIN_IMAGES_PER_LABEL} images each; "
        f"found {len(kept)} ({_some(label_counts)}). "
        "Images are labelled by their parent folder: put each class in a folder of its own"
    )


def _some(label_counts: dict[str, int], shown: int = 5) -> str:
    items = [f"{label}: {n}" for label, n in list(label_counts.items())[:shown]]
    more = len(label_counts) - shown
    return ", ".join(items) + (f" and {more} more labels" if more > 0 else "")


def label_column(path: Column) -> Column:
    """:func:`label_of` as a Spark column expression (no Python round trip)."""
    return F.element_at(F.split(path, "/"), -2)


def name_column(path: Column) -> Column:
    """The file's name. With its label, it names an image wherever its data set sits, so
    seeded choices hash the two, not the path: a local copy and its S3 twin choose alike."""
    return F.element_at(F.split(path, "/"), -1)


# -- decoding (runs in the executors' Python workers) -----------------------------------


def decode_image(
    data: bytes | None,
    size: int,
    *,
    fast_decode: bool = False,
    max_pixels: int = 89_478_485,
) -> np.ndarray:
    """Decode any Pillow-readable image into an RGB ``size x size`` uint8 array.

    Grayscale, CMYK, palette and 16-bit images become RGB, transparency is flattened on
    white (the background of Fruits-360 images), EXIF orientation is applied, animated
    images give their first frame. The image is resized without keeping its aspect ratio,
    as Keras' ``load_img(target_size=...)`` does.

    Raises
    ------
    ImageDecodeError
        With the reason the file cannot be used, as ``"<kind>: <detail>"``; the kinds are
    ``empty file``, ``decompression bomb``, ``not an image`` and ``corrupt image`` (the
    file's bytes), and ``unreadable`` (the worker ran out of memory: another try may pass).
    """
    if not data:
        raise ImageDecodeError("empty file: 0 bytes")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow's own check (at open) must not be stricter than ours (below); it is never
        # lowered, so a small limit here does not leak into later uses of Pillow.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                pixels = f"{width}x{height} = {width * height}"
                raise ImageDecodeError(_too_many_pixels(pixels, max_pixels))
            if fast_decode and image.format == "JPEG":
                image.draft("RGB", (size, size))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode == "L" and "transparency" not in image.info:
                # Resampling works band by band: resizing the one gray band and then
                # copying it to R, G and B gives the same pixels as resizing RGB, at a third.
                resized = image.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
            else:
                resized = _to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(resized, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's text names its own limit, which is twice max_pixels past that.
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise ImageDecodeError(
            _too_many_pixels(pixels[1] if pixels else "more", max_pixels)
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            "not an image: unknown format, or content that does not match the extension"
        ) from None
    except MemoryError:
        raise ImageDecodeError("unreadable: the worker ran out of memory decoding it") from None
    except Exception as error:  # Pillow raises many types for broken data
        raise ImageDecodeError(f"corrupt image: {type(error).__name__}: {error}") from None


def _too_many_pixels(pixels: str, max_pixels: int) -> str:
    return (
        f"decompression bomb: {pixels} pixels exceeds max_image_pixels={max_pixels} (notebook "
        "01's parameter, imagepca run's --max-image-pixels)"
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grayscale to 8 bits by the format's range, not by the content: 16 bits
        # for I;16. Modes I (32-bit integers; Pillow's 16-bit PNGs too) and F (floats) say
        # none: the smallest of the usual ones that holds the values (I: 0-255, 0-65535; F:
        # 0-1, 0-255), else the image's own maximum. 0-255 values were black as I, white as F.
        values = np.asarray(image, dtype=np.float64)
        largest = float(values.max()) if values.size else 0.0
        ranges = {"I": (255.0, 65535.0), "F": (1.0, 255.0)}.get(image.mode, (65535.0,))
        top = next((r for r in ranges if largest <= r), largest)
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), "L")
    # A palette's, or a gray or RGB image's single transparent colour (PNG's tRNS), too.
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_samples(
    spark: SparkSession, listing, *, per_label: int = 3, size: int = 224
) -> list[tuple[str, np.ndarray]]:
    """Decode a few images per label on the driver, for a first look at the input.

    ``listing`` is an :class:`imagepca.listing.ImageListing`.
    """
    storage = Storage(spark)
    samples, unread = [], []
    for label, path in listing.sample(per_label):
        try:
            data = storage.read_bytes(path)
        # Gone, no access, or a URI Hadoop cannot parse (a manifest's C:\photos\1.jpg).
        except (OSError, Py4JJavaError, IllegalArgumentException) as error:
            unread.append(f"{path}: {': '.join(error_summary(error))}")
            continue
        try:
            samples.append((label, decode_image(data, size)))
        except ImageDecodeError:
            continue  # shown in the rejected report instead
    if unread:
        warnings.warn(
            f"{len(unread)} sample image(s) could not be read, featurization will reject them "
            f"as missing or unreadable; the first: {unread[0]}",
            stacklevel=2,
        )
    return samples
