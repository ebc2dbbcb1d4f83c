"""The MobileNetV2 weights a run uses: found, fetched and checked on the driver.

``"imagenet"`` goes through Keras' own cache; a URI is copied through Hadoop's FileSystem.
Every file is checked whole before the run touches its output, so a truncated download or
another model's weights fail with a message saying what to do, not inside a Spark task.
PySpark is imported only to resolve a URI: ``imagepca emr stage`` and ``emr doctor`` check and
hash the weights without it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .config import KERAS_WEIGHTS_FILE, cache_dir, expand_home

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

KERAS_WEIGHTS_ORIGIN = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
    + KERAS_WEIGHTS_FILE
)


class WeightsError(RuntimeError):
    """The MobileNetV2 weights cannot be found or fetched; the message says how to fix it."""


def resolve_weights(source: str, spark: SparkSession | None = None) -> Path:
    """Return a local ``.h5`` file holding MobileNetV2 no-top weights.

    ``"imagenet"`` goes through Keras' cache (``$KERAS_HOME/models``), downloading only when
    the file is absent, exactly as ``MobileNetV2(weights="imagenet")`` does. The 224-pixel
    weights are used for every input size: the network is fully convolutional.
    A URI (``s3://``, ``hdfs://``, ``file://``) is copied through Hadoop's FileSystem.
    """
    from .storage import Storage, is_local, local_path

    if source == "imagenet":
        from keras.utils import get_file

        try:
            cached = Path(get_file(KERAS_WEIGHTS_FILE, KERAS_WEIGHTS_ORIGIN, cache_subdir="models"))
        except Exception as error:
            keras_home = os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras"))
            raise WeightsError(
                f"MobileNetV2 ImageNet weights are not in the Keras cache and could not be "
                f"downloaded ({type(error).__name__}: {error}). Either copy "
                f"{KERAS_WEIGHTS_FILE} into {keras_home}/models/, or pass the file itself: "
                "weights=/path/to/weights.h5 or an s3:// URI (--weights with imagepca run)."
            ) from None
        check_weights_file(
            cached,
            str(cached),
            hint=f"Delete {cached}: Keras then downloads it again (it never checks a cached file).",
        )
        return cached
    if not is_local(source):
        if spark is None:
            raise WeightsError(f"weights URI {source!r} needs a SparkSession to be read")
        storage = Storage(spark)
        if not storage.exists(source):
            raise WeightsError(
                f"weights file {source!r} does not exist. Stage it there (imagepca emr stage "
                "does), or pass weights=imagenet (--weights imagenet with imagepca run)."
            )
        target = cache_dir() / "weights" / hashlib.sha256(source.encode()).hexdigest()[:16]
        local = target / source.rsplit("/", 1)[-1]
        if not local.exists() or local.stat().st_size != storage.size(source):
            target.mkdir(parents=True, exist_ok=True)
            storage.copy_to_local(source, str(local))
        check_weights_file(local, source)
        return local
    path = Path(expand_home(local_path(source)))
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise WeightsError(
            f"weights file {str(path)!r} {what}. Pass weights=imagenet to use the "
            f"Keras cache, or the path of {KERAS_WEIGHTS_FILE} (--weights with imagepca run)."
        )
    check_weights_file(path, source)
    return path


# The kernels that tell MobileNetV2 (width 1.0) without its top from its other files: the
# first and last convolutions' shapes differ with the width, and the top adds a "Logits" layer.
MOBILENET_V2_KERNELS = {"Conv1": (3, 3, 3, 32), "Conv_1": (1, 1, 320, 1280)}
TOP_LAYER = "Logits"
_CHECKED_WEIGHTS: set[tuple] = set()  # files that passed: path, inode, size, mtime


def check_weights_file(path: Path, source: str, *, hint: str | None = None) -> None:
    """Raise :class:`WeightsError` unless ``path`` is a whole Keras HDF5 file of MobileNetV2
    weights (width 1.0, no top), which ``load_weights`` will take.

    Read in full (0.04 s): a truncated download, another file or another model's weights
    fail here, before the run touches its output, and not when the model is built after the
    output's completion markers have gone. The layers are found as Keras finds them (a whole
    model's file keeps them under ``model_weights``); a Keras 3 ``.weights.h5`` file is only
    read, its layout being Keras 3's own. ``hint`` replaces the advice of the message.
    A file that passed is not read again while unchanged (notebook 01 resolves its weights
    before and while it begins the run).
    """
    import h5py

    status = path.stat()
    unchanged = (str(path), status.st_ino, status.st_size, status.st_mtime_ns)
    if unchanged in _CHECKED_WEIGHTS:
        return

    def read(name: str, item) -> None:
        if isinstance(item, h5py.Dataset):
            item[()]

    problem = None
    try:
        with h5py.File(path, "r") as weights:
            weights.visititems(read)
            if not path.name.endswith(".weights.h5"):
                problem = _not_mobilenet_v2(weights, h5py)
    except Exception as error:
        problem = f"is not a readable HDF5 file ({type(error).__name__}: {error})"
    if problem is None:
        _CHECKED_WEIGHTS.add(unchanged)
        return
    raise WeightsError(
        f"weights file {source!r} {problem}: an interrupted copy or download, or another "
        "model's file. "
        + (
            hint
            or f"Copy {KERAS_WEIGHTS_FILE} again, or pass weights=imagenet (--weights with "
            "imagepca run)."
        )
    )


def _items(group) -> list:
    """``(name, item)`` of everything under an HDF5 group."""
    found = []
    group.visititems(lambda name, item: found.append((name, item)))
    return found


def _not_mobilenet_v2(weights, h5py) -> str | None:
    """What keeps a legacy Keras HDF5 weights file from being MobileNetV2's, or None."""
    if "layer_names" not in weights.attrs and "model_weights" in weights:
        weights = weights["model_weights"]  # a whole model's file, as Keras reads it
    # Keras 2 wrote the names as bytes, Keras 3 as strings.
    layers = {
        name.decode() if isinstance(name, bytes) else str(name)
        for name in weights.attrs.get("layer_names", [])
    }
    if TOP_LAYER in layers:
        return "holds MobileNetV2 with its classification top (the no-top file is needed)"
    for layer, shape in MOBILENET_V2_KERNELS.items():
        if layer not in layers:
            return f"holds no MobileNetV2 weights (no layer {layer})"
        kernels = [
            found.shape
            for name, found in _items(weights[layer])
            if isinstance(found, h5py.Dataset) and name.split("/")[-1].startswith("kernel")
        ]
        if kernels != [shape]:
            return (
                f"holds other MobileNetV2 weights: layer {layer}'s kernel is "
                f"{kernels[0] if kernels else 'missing'}, not {shape} (another width, alpha)"
            )
    return None


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
