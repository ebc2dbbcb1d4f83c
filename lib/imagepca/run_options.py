"""The pipeline's tuning options on the command line, defined once for ``imagepca run``
and ``imagepca emr run`` (which passes those given on to the cluster's ``imagepca run``).

Their defaults are the parameter dataclasses' own, so the command line and the notebooks
cannot drift apart; the dataclasses validate the values, once, at the edge.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from .config import (
    IMAGE_SIZES,
    ClassifyParams,
    ExtractParams,
    ParameterError,
    ReduceParams,
    field_names,
    option_flag,
)

PARAMS_TYPES = (ExtractParams, ReduceParams, ClassifyParams)


def _k_values(text: str) -> list[int]:
    """``2,10,50`` -> [2, 10, 50] (the range is ClassifyParams' to check)."""
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"comma-separated integers, e.g. 2,10,50; got {text!r}"
        ) from None


# Option name -> argparse keywords. Options of notebook 03 say so in their help.
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
    "test_fraction": {
        "type": float,
        "help": "classifier: share of each label's images held out for testing",
    },
    "seed": {"type": int, "help": "classifier: seed of the train/test split"},
    "k_values": {
        "type": _k_values,
        "metavar": "K,K,...",
        "help": "classifier: k values of the accuracy-versus-k sweep (default 2,5,10,20,50,100 "
        "and the chosen k)",
    },
    "max_iter": {"type": int, "help": "classifier: the logistic regression's iterations"},
    "reg_param": {"type": float, "help": "classifier: its L2 strength"},
    "sweep_max_images": {
        "type": int,
        "help": "classifier: about the most images of the full-feature comparison and the sweep",
    },
    "driver_max_mb": {
        "type": int,
        "help": "classifier: largest float64 training matrix fitted on the driver, in MB "
        "(default 1024; larger: Spark fits it, 0: always Spark)",
    },
}


def _parameter_default(name: str):
    for params in PARAMS_TYPES:
        for parameter in dataclasses.fields(params):
            if parameter.name == name:
                return parameter.default
    raise KeyError(name)


def add_tuning_options(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """Add :data:`TUNING_OPTIONS`; ``defaults=False`` leaves an option not given None, so
    that only what the user chose is passed on (``imagepca emr run``). The classifier's are
    None unless given either way (ClassifyParams has the defaults): given, with
    ``--skip-classify``, they are refused (:func:`refuse_unused_classifier_options`)."""
    classifier = set(field_names(ClassifyParams))
    for name, spec in TUNING_OPTIONS.items():
        if spec.get("action") == "store_true":
            parser.add_argument(option_flag(name), **spec)
            continue
        default = _parameter_default(name)
        help_text = (
            spec["help"] if "default" in spec["help"] else f"{spec['help']} (default {default})"
        )
        kept = defaults and name not in classifier
        parser.add_argument(
            option_flag(name), **{**spec, "help": help_text}, default=default if kept else None
        )


def refuse_unused_classifier_options(args: argparse.Namespace) -> None:
    """``--skip-classify`` with notebook 03's options: they would be ignored without a word."""
    given = tuning_values(args, ClassifyParams)
    if args.skip_classify and given:
        names = ", ".join(option_flag(name) for name in given)
        raise ParameterError(
            f"{names} set notebook 03, which --skip-classify leaves out: drop one or the other"
        )


def execution_timeout_problem(seconds: int | None) -> str | None:
    """What is wrong with ``--execution-timeout``, if anything (both commands refuse it)."""
    if seconds is None or seconds > 0:
        return None
    return (
        f"--execution-timeout {seconds}: give a positive number of seconds one cell may run, "
        "or leave it out for no limit"
    )


def _given(value: object) -> bool:
    """Not None nor False, by identity: 0 (a --max-rejected-fraction of 0) is a value given."""
    return value is not None and value is not False


def tuning_values(args: argparse.Namespace, params: type | None = None) -> dict:
    """The tuning options given (or defaulted) that the ``params`` dataclass takes (None:
    every one)."""
    names = TUNING_OPTIONS if params is None else set(field_names(params)) & set(TUNING_OPTIONS)
    values = {name: getattr(args, name) for name in TUNING_OPTIONS if name in names}
    return {name: value for name, value in values.items() if _given(value)}


def option_arguments(values: dict) -> list[str]:
    """Tuning values as ``imagepca run`` options: ``--fast-decode``, ``--k-values 2,10``."""
    arguments: list[str] = []
    for name, value in values.items():
        if value is True:
            arguments.append(option_flag(name))
        elif isinstance(value, Sequence) and not isinstance(value, str):
            arguments += [option_flag(name), ",".join(str(item) for item in value)]
        else:
            arguments += [option_flag(name), str(value)]
    return arguments
