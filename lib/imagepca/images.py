"""Finding image files, reading them with Spark, and decoding them on the executors.

The listing is taken separately from the ``binaryFile`` scan because the scan silently
drops zero-byte files (and, with ``ignoreCorruptFiles``, files that vanish or cannot be
read): comparing the two accounts for every image file found.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from .storage import Storage, normalize_uri

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class InputError(ValueError):
    """The input location cannot be used; the message names it and says what to do."""


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


def _reader(spark: SparkSession):
    return (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", extension_glob())
        # A file that disappears or cannot be read is skipped by the scan and then
        # reported as rejected by the listing comparison, instead of failing the job.
        .option("ignoreCorruptFiles", "true")
        .option("ignoreMissingFiles", "true")
    )


@dataclass(frozen=True)
class ImageListing:
    """Every image file under the input, spelled as Spark's ``path`` column spells it.

    ``relation`` is the ``binaryFile`` DataFrame the listing was taken from: scanning it
    reads exactly these files, without listing the input a second time.
    """

    root: str
    files: tuple[str, ...]
    relation: DataFrame | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for path in self.files:
            label = label_of(path)
            counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))

    def sample(self, per_label: int, max_labels: int = 12) -> list[str]:
        """A few files of each of the first labels, for a quick look at the input."""
        chosen: dict[str, list[str]] = {}
        for path in sorted(self.files):
            group = chosen.setdefault(label_of(path), [])
            if len(group) < per_label:
                group.append(path)
        return [p for label in sorted(chosen)[:max_labels] for p in chosen[label]]


def list_images(spark: SparkSession, input_uri: str) -> ImageListing:
    """List the image files under ``input_uri`` (recursively, by extension, any case).

    Raises
    ------
    InputError
        When the location does not exist or holds no image file.
    """
    try:
        relation = _reader(spark).load(input_uri)
        files = relation.inputFiles()
    except AnalysisException as error:
        raise InputError(
            f"input location {input_uri!r} cannot be read: {str(error).splitlines()[0]}. "
            "Pass a folder (or s3:// prefix) that holds one sub-folder of images per class."
        ) from None
    if not files:
        raise InputError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {input_uri!r}. "
            "Expected one sub-folder per class, e.g. INPUT/apple/1.jpg, INPUT/banana/2.jpg."
        )
    return ImageListing(
        root=input_uri,
        files=tuple(sorted(normalize_uri(f) for f in files)),
        relation=relation,
    )


def label_of(path: str) -> str:
    """Class label of an image: the name of its parent folder."""
    return path.rstrip("/").rsplit("/", 2)[-2]


MIN_IMAGES_PER_LABEL = 2  # a classifier needs one image to train on and one to test on


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


def read_images(spark: SparkSession, listing: ImageListing) -> DataFrame:
    """The listed image files as rows of ``path``, ``label``, ``content`` (bytes), lazily.

    Files added after the listing are not read; listed files that vanish or are empty are
    skipped by the scan, and the caller accounts for them by comparing with the listing.
    """
    relation = listing.relation
    if relation is None:  # a listing built by hand: list again
        relation = _reader(spark).load(listing.root)
    return relation.select("path", label_column(F.col("path")).alias("label"), "content")


def scan_settings(n_files: int, cores: int, tasks_per_core: int) -> dict[str, str]:
    """Spark file-scan settings that split ``n_files`` into even tasks by file count.

    Spark packs files into scan tasks by bytes plus a per-file "open cost". Featurizing
    costs about the same for every image whatever its size, so an open cost far above any
    image's size makes Spark pack by count: about ``cores * tasks_per_core`` tasks, instead
    of hundreds of tiny ones for small JPEGs or too few for large ones.
    """
    tasks = max(1, min(n_files, cores * tasks_per_core))
    open_cost = 1 << 30
    return {
        "spark.sql.files.openCostInBytes": str(open_cost),
        "spark.sql.files.maxPartitionBytes": str(-(-n_files // tasks) * (open_cost + (1 << 20))),
        "spark.sql.files.minPartitionNum": str(tasks),
    }


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
    ``empty file``, ``decompression bomb``, ``not an image`` and ``corrupt image``.
    """
    if not data:
        raise ImageDecodeError("empty file: 0 bytes")
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
                    f"max_image_pixels={max_pixels}"
                )
            if fast_decode and image.format == "JPEG":
                image.draft("RGB", (size, size))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode == "L":
                # Resampling works band by band: resizing the one gray band and then
                # copying it to R, G and B gives the same pixels as resizing RGB, at a third.
                resized = image.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
            else:
                resized = _to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(resized, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"decompression bomb: {error}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            "not an image: unknown format, or content that does not match the extension"
        ) from None
    except Exception as error:  # Pillow raises many types for broken data
        raise ImageDecodeError(f"corrupt image: {type(error).__name__}: {error}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grayscale: scale to 8 bits by the format's range, not by the content.
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I") else 255.0
        if image.mode == "F" and values.size and values.max() <= 1.0:
            scale = 255.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_samples(
    spark: SparkSession, listing: ImageListing, *, per_label: int = 3, size: int = 224
) -> list[tuple[str, np.ndarray]]:
    """Decode a few images per label on the driver, for a first look at the input."""
    storage = Storage(spark)
    samples = []
    for path in listing.sample(per_label):
        try:
            samples.append((label_of(path), decode_image(storage.read_bytes(path), size)))
        except ImageDecodeError:
            continue  # shown in the rejected report instead
    return samples
