"""The pipeline's tuning options on the command line, defined once for ``imagepca run``
and ``imagepca emr run`` (which passes those given on to the cluster's ``imagepca run``).

Their defaults are the parameter dataclasses' own, so the command line and the notebooks
cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses

from .config import IMAGE_SIZES, ExtractParams, ReduceParams

# The pipeline's tuning options: `imagepca run` takes them, and `imagepca emr run` passes
# those given on to the cluster's `imagepca run`. Their defaults are the parameters' own.
TUNING_OPTIONS: dict[str, dict] = {
    "image_size": {"type": int, "choices": IMAGE_SIZES, "help": "model input size"},
    "batch_size": {"type": int, "help": "images per model call"},
    "fast_decode": {"action": "store_true", "help": "Pillow draft mode for large JPEGs"},
    "tasks_per_core": {"type": int, "help": "featurization tasks per core"},
    "max_rejected_fraction": {
        "type": float,
        "help": "fail when a larger share of image files is rejected (default 1.0: never)",
    },
    "reuse_features": {
        "action": "store_true",
        "help": "keep features/ when input and extraction parameters are unchanged (redo PCA only)",
    },
    "max_image_pixels": {
        "type": int,
        "help": "larger images are rejected as decompression bombs (default: Pillow's limit)",
    },
    "projection_points": {"type": int, "help": "most points in projection.png"},
}


def _parameter_default(name: str):
    for params in (ExtractParams, ReduceParams):
        for parameter in dataclasses.fields(params):
            if parameter.name == name:
                return parameter.default
    raise KeyError(name)


def add_tuning_options(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """Add :data:`TUNING_OPTIONS`; ``defaults=False`` leaves an option not given None, so
    that only what the user chose is passed on (``imagepca emr run``)."""
    for name, spec in TUNING_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if spec.get("action") == "store_true":
            parser.add_argument(flag, **spec)
            continue
        default = _parameter_default(name)
        help_text = (
            spec["help"] if "default" in spec["help"] else f"{spec['help']} (default {default})"
        )
        parser.add_argument(
            flag, **{**spec, "help": help_text}, default=default if defaults else None
        )


def tuning_values(args: argparse.Namespace, params: type) -> dict:
    """The tuning options given (or defaulted) that the ``params`` dataclass takes."""
    taken = {parameter.name for parameter in dataclasses.fields(params)}
    given = {name: getattr(args, name) for name in TUNING_OPTIONS if name in taken}
    # By identity: 0 (a --max-rejected-fraction of 0) is a value given, not a flag unset.
    return {
        name: value for name, value in given.items() if value is not None and value is not False
    }
