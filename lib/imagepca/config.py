"""Run parameters, validated once where they enter: the CLI and the notebooks' parameter cells.

Everything downstream takes these dataclasses and trusts them, so the checks live here
and nowhere else. Messages say what was wrong and what is accepted.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .local_folders import followed_links, within

ENGINES = ("tflite", "keras")
DEFAULT_ENGINE = "tflite"
IMAGE_SIZES = (96, 128, 160, 192, 224)
FEATURE_DIM = 1280  # MobileNetV2 (alpha 1.0) without its top, after global average pooling.
# The file name Keras' MobileNetV2(weights="imagenet", include_top=False) caches and staging
# uploads; every input size uses these 224-pixel weights.
KERAS_WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def cache_dir() -> Path:
    """Where this machine's one-time work is kept (``$IMAGEPCA_CACHE``): converted models,
    fetched weights, the local JVM's class archive."""
    root = os.environ.get("IMAGEPCA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "imagepca"
    )
    return Path(root)


# Session settings the pipeline relies on: given to a session get_spark builds, to the Livy
# sessions `imagepca run --kernel pysparkkernel` asks for, and in emr_config.json's
# spark-defaults to every session on the cluster (JupyterHub's PySpark kernel included).
SPARK_SETTINGS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.compression.codec": "zstd",
    "spark.python.worker.reuse": "true",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.session.timeZone": "UTC",
    # Running tasks report their progress (records read) with each heartbeat: every 3 s,
    # so the featurization progress line moves between task ends on a cluster.
    "spark.executor.heartbeatInterval": "3s",
}


def max_components(n_images: int, n_features: int = FEATURE_DIM) -> int:
    """The principal components with variance that ``n_images`` give: centred, they span at
    most n - 1 directions (a component past them has 1e-17 of the variance: rounding)."""
    return min(n_images - 1, n_features)


DEFAULT_VARIANCE = 0.95  # share of the variance the chosen k reaches, unless k is given


class ParameterError(ValueError):
    """A run parameter is invalid; the message names it and says what is accepted.

    A message on one parameter starts with its name, ``parameter``, which the command line
    gives as its option's (:meth:`option_message`)."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(f"{parameter} {message}" if parameter else message)
        self.parameter = parameter
        self.requirement = message

    def option_message(self) -> str:
        """The message as the command line gives it: ``--batch-size`` for ``batch_size``."""
        if self.parameter is None:
            return str(self)
        return f"{option_flag(self.parameter)} {self.requirement}"


def option_flag(name: str) -> str:
    """A parameter's command-line option: ``--batch-size`` for ``batch_size``."""
    return "--" + name.replace("_", "-")


# The masters Spark 3.5 accepts (SparkContext.createTaskScheduler and its cluster managers).
SPARK_MASTER = re.compile(
    r"local|local\[([1-9]\d*|\*)(\s*,\s*\d+)?\]"
    r"|local-cluster\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]"
    r"|yarn|(spark|k8s|mesos)://.+"
)


def check_master(master: str | None) -> None:
    """Refuse a Spark master that Spark would reject only after launching its JVM, with a
    Java error that hides the cause (None: the default, ``local[*]``)."""
    if master is not None and not SPARK_MASTER.fullmatch(master):
        raise ParameterError(
            f"{master!r} is not a Spark master: use local[*], local[N], local[N,R] (R "
            "attempts per task), local-cluster[W,C,MB], yarn, spark://HOST:PORT or k8s://URL",
            "master",
        )


def _require(condition: bool, parameter: str, requirement: str) -> None:
    if not condition:
        raise ParameterError(requirement, parameter)


URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # a URI's scheme: s3:, file:, hdfs:
GLOB_CHARACTERS = "{}[]*?"  # what Hadoop's readers expand in a path (and a "\\" escapes)


def expand_home(location: object) -> object:
    """A path's leading ``~`` expanded: Spark, Hadoop and papermill take ``~/photos`` (a
    notebook's string, a shell's ``--output=~/x``) as a folder named ``~``, here."""
    if isinstance(location, str) and (location == "~" or location.startswith("~/")):
        return os.path.expanduser(location)
    return location  # not ~user/: a folder named so is as likely


def _check_location(name: str, value: object) -> None:
    _require(
        isinstance(value, str) and value.strip() == value and value != "",
        name,
        f"must be a non-empty local path or URI (file://, s3://, hdfs://), got {value!r}",
    )
    # Hadoop's globbing, which every read goes through, makes each name of a local path
    # with [ ] { } * ? into a path of its own: one with a ':' then parses as a URI and fails.
    remote = URI_SCHEME.match(value) and not value.lower().startswith("file:")  # hdfs:/x
    local = "" if remote else value.removeprefix("file:")
    _require(
        ":" not in local or not any(char in local for char in GLOB_CHARACTERS),
        name,
        f"{value!r}: Hadoop cannot read a local path with ':' and one of [ ] {{ }} * ? in "
        "it; rename the folder, or reach it through a link without them (ln -s)",
    )


@dataclass(frozen=True, kw_only=True)
class ExtractParams:
    """Parameters of feature extraction (notebook 01).

    Parameters
    ----------
    input : str or None
        Folder or URI holding one sub-folder per class (label = parent folder name).
    manifest : str or None
        Instead of ``input``: a CSV or Parquet file of image URIs (column ``path``, optional
        ``label``, ``size``, ``modified``), or an S3 Inventory ``manifest.json``. Nothing is
        listed; the executors read each URI.
    output : str
        Output folder or URI; features land in ``OUTPUT/features``.
    weights : str
        ``"imagenet"`` (Keras cache, downloaded only when absent) or a path / URI of an
        ``.h5`` MobileNetV2 no-top weights file.
    engine : str
        ``"tflite"`` (default: fastest, same features as Keras within 1e-4) or ``"keras"``.
    image_size : int
        Model input side in pixels; features at sizes other than 224 are not comparable
        with 224 features.
    batch_size : int
        Images per model call inside a Spark task.
    max_records_per_batch : int
        Arrow batch size (``spark.sql.execution.arrow.maxRecordsPerBatch``): the rows a
        Python worker holds at once, so it bounds worker memory. Fewer where the largest
        files listed would carry more than :data:`imagepca.images.CONTENT_BATCH_BYTES` in a
        batch (a manifest's files without a size are not counted in).
    fast_decode : bool
        Let Pillow downscale large JPEGs in the DCT domain (``Image.draft``): several
        times faster decoding, features change slightly (cosine ~0.999).
    tasks_per_core : int
        Spark tasks per core used for featurization, so the load stays even.
    max_rejected_fraction : float
        Fail the run when more than this share of image files is rejected (1.0 = never).
    reuse_features : bool
        Keep existing ``features/`` when they were made from the same input and
        extraction parameters, so only the PCA is redone.
    incremental : bool
        Featurize only the files that are new or changed (path, size, modification time)
        since the features already in ``output`` (same weights, engine, image size and
        decoding), append them as a new batch, drop the features of files that are gone.
    max_image_pixels : int
        Larger images are rejected as decompression bombs.
    """

    input: str | None = None
    manifest: str | None = None
    output: str
    weights: str = "imagenet"
    engine: str = DEFAULT_ENGINE
    image_size: int = 224
    batch_size: int = 32
    max_records_per_batch: int = 256
    fast_decode: bool = False
    tasks_per_core: int = 4
    max_rejected_fraction: float = 1.0
    reuse_features: bool = False
    incremental: bool = False
    max_image_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        for name in ("input", "manifest", "output"):
            object.__setattr__(self, name, expand_home(getattr(self, name)))
        if (self.input is None) == (self.manifest is None):
            raise ParameterError(
                "give exactly one of input (a folder of images) and manifest (a list of image "
                f"URIs); got input={self.input!r}, manifest={self.manifest!r}"
            )
        _check_location("manifest" if self.input is None else "input", self.source)
        _check_location("output", self.output)
        output = location_key(self.output)
        _require(
            "://" in output or not os.path.exists(output) or os.path.isdir(output),
            "output",
            f"{self.output!r} is a file: give a folder (created if missing)",
        )
        if self.input is not None:
            source = location_key(self.input)
            _require(
                "://" in source or not os.path.isfile(source),
                "input",
                f"{self.input!r} is a file: give the folder that holds one sub-folder "
                "of images per class, or pass a CSV/Parquet list of image URIs as manifest "
                "(--manifest)",
            )
            _require(
                source != output,
                "output",
                "must differ from input: the output folder is replaced on every run",
            )
            _require(
                not within(output, source),
                "output",
                "must not be inside input: the next run would read the run's own "
                f"plots as images; choose an output outside {self.input!r}",
            )
            links, loops = followed_links(source)
            if loops:
                link, target = loops[0]
                raise ParameterError(
                    f"input has a link that loops: {link!r} links to {target!r}, which the "
                    "listing passes through to reach it; Spark would follow it again and again "
                    "(every image below it read 41 times, to the system's limit of 40 links). "
                    "Remove the link"
                )
            for link, target in links:
                _require(
                    not (within(output, target) or within(target, output)),
                    "output",
                    f"must not be inside input: {link!r} links to {target!r}, through "
                    f"which Spark's listing of the input reaches output {self.output!r}: the "
                    "next run would read the run's own plots as images; choose another output, "
                    "or remove the link",
                )
        _check_location("weights", self.weights)
        _require(
            self.engine in ENGINES,
            "engine",
            f"must be one of {', '.join(ENGINES)}, got {self.engine!r}",
        )
        _require(
            _is_int(self.image_size) and self.image_size in IMAGE_SIZES,
            "image_size",
            f"must be one of {IMAGE_SIZES} (224 is the size the weights were "
            f"trained at), got {self.image_size!r}",
        )
        _require(
            _is_int(self.batch_size) and 1 <= self.batch_size <= 4096,
            "batch_size",
            f"must be an integer from 1 to 4096, got {self.batch_size!r}",
        )
        _require(
            _is_int(self.max_records_per_batch) and 1 <= self.max_records_per_batch <= 100_000,
            "max_records_per_batch",
            f"must be an integer from 1 to 100000, got {self.max_records_per_batch!r}",
        )
        for name in ("fast_decode", "reuse_features", "incremental"):
            _require(
                isinstance(getattr(self, name), bool),
                name,
                f"must be True or False, got {getattr(self, name)!r}",
            )
        _require(
            _is_int(self.tasks_per_core) and 1 <= self.tasks_per_core <= 64,
            "tasks_per_core",
            f"must be an integer from 1 to 64, got {self.tasks_per_core!r}",
        )
        _require(
            _is_number(self.max_rejected_fraction) and 0 <= self.max_rejected_fraction <= 1,
            "max_rejected_fraction",
            "must be a number in [0, 1] (1 = never fail on rejects), "
            f"got {self.max_rejected_fraction!r}",
        )
        _require(
            _is_int(self.max_image_pixels) and self.max_image_pixels >= 64 * 64,
            "max_image_pixels",
            f"must be an integer >= 4096, got {self.max_image_pixels!r}",
        )

    @property
    def source(self) -> str:
        """Where the images are listed: the input folder or the manifest."""
        return self.input if self.input is not None else self.manifest

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReduceParams:
    """Parameters of the StandardScaler + PCA stage (notebook 02).

    Parameters
    ----------
    output : str
        The run's output folder or URI; reads ``features/`` there, writes the rest.
    k : int or None
        Fixed number of components; ``None`` chooses the smallest k whose cumulative
        explained variance reaches ``variance``.
    variance : float
        Cumulative explained-variance threshold in (0, 1], used when ``k`` is None.
    projection_points : int
        Most points drawn in the 2-D projection plot (a sample keeps it readable).
    then_classify : bool
        Notebook 03 runs next, in the same run (``imagepca run`` says so): ``_SUCCESS`` is
        then notebook 03's to write, and an output is never complete between the two,
        unless the classifier is skipped (fewer than 2 labels).
    """

    output: str
    k: int | None = None
    variance: float = DEFAULT_VARIANCE
    projection_points: int = field(default=5000)
    then_classify: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", expand_home(self.output))
        _check_location("output", self.output)
        _require(
            self.k is None or (_is_int(self.k) and 1 <= self.k <= FEATURE_DIM),
            "k",
            f"must be an integer from 1 to {FEATURE_DIM} (the feature dimension), got "
            f"{self.k!r}; without it, k is chosen by the variance threshold",
        )
        _require(
            _is_number(self.variance) and 0 < self.variance <= 1,
            "variance",
            f"must be a fraction in (0, 1], e.g. 0.95; got {self.variance!r}",
        )
        _require(
            self.k is None or self.variance == DEFAULT_VARIANCE,
            "variance",
            f"{self.variance!r} would be ignored: k = {self.k!r} fixes the number of "
            "components; give one of the two",
        )
        _require(
            _is_int(self.projection_points) and self.projection_points >= 10,
            "projection_points",
            f"must be an integer >= 10, got {self.projection_points!r}",
        )
        _require(
            isinstance(self.then_classify, bool),
            "then_classify",
            f"must be True or False, got {self.then_classify!r}",
        )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClassifyParams:
    """Parameters of the classifier stage (notebook 03).

    Parameters
    ----------
    output : str
        The run's output folder or URI; ``features/``, ``pca_model/``, ``reduced/`` and
        ``metrics.json`` of notebooks 01 and 02 must be there.
    test_fraction : float
        Share of each label's images held out for testing, in (0, 1). Rounded per label,
        and every label with at least 2 images keeps at least one image on each side.
    seed : int
        Seed of the split: the same seed gives the same split on any cluster.
    k_values : sequence of int or None
        Numbers of components for the accuracy-versus-k sweep; None sweeps
        2, 5, 10, 20, 50, 100 and the chosen k, capped by the components the data has.
    max_iter : int
        Iterations of the logistic regression's optimizer.
    reg_param : float
        L2 regularization strength of the logistic regression (0 = none). The default
        0.01 matters: unregularized, the classifier on ~120 components of 180 training
        photos scored 0.717 instead of 0.933.
    sweep_max_images : int
        About the most images used by the full-feature comparison and the k sweep (a
        stratified, seeded subset above that; each label keeps a training and a test
        image, so many small labels raise it to 2 per label): bounds their cost and the
        driver's memory (about ``max(sweep_max_images, 2 x labels) x 1280`` floats).
        With the default 5,000, 1,250 test images put an accuracy of 0.9 within about
        +-0.01 (one standard error). The saved classifier always uses every image.
    driver_max_mb : int
        Largest training matrix (float64 megabytes) fitted on the driver; a larger
        ``reduced/`` is fitted by Spark's distributed LogisticRegression instead.
    """

    output: str
    test_fraction: float = 0.25
    seed: int = 42
    k_values: tuple[int, ...] | None = None
    max_iter: int = 100
    reg_param: float = 0.01
    sweep_max_images: int = 5_000
    driver_max_mb: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", expand_home(self.output))
        _check_location("output", self.output)
        _require(
            _is_number(self.test_fraction) and 0 < self.test_fraction < 1,
            "test_fraction",
            f"must be a fraction strictly between 0 and 1, e.g. 0.25; got {self.test_fraction!r}",
        )
        _require(
            _is_int(self.seed) and 0 <= self.seed < 2**31,
            "seed",
            f"must be an integer from 0 to 2**31 - 1, got {self.seed!r}",
        )
        if self.k_values is not None:
            values = self.k_values
            if isinstance(values, str):
                raise ParameterError(
                    f"arrived as the string {values!r} (papermill's -p passes strings): pass "
                    f"a list, with -y 'k_values: [{values.strip().strip('[]')}]' or in the "
                    "parameters cell",
                    "k_values",
                )
            _require(
                isinstance(values, list | tuple)
                and len(values) > 0
                and all(_is_int(k) and 1 <= k <= FEATURE_DIM for k in values),
                "k_values",
                f"must list integers from 1 to {FEATURE_DIM}, e.g. 2, 10, 50 (or be left "
                f"out: None, the default sweep); got {values!r}",
            )
            # papermill injects lists; a sorted tuple keeps the dataclass hashable and frozen.
            object.__setattr__(self, "k_values", tuple(sorted(set(values))))
        _require(
            _is_int(self.max_iter) and 1 <= self.max_iter <= 10_000,
            "max_iter",
            f"must be an integer from 1 to 10000, got {self.max_iter!r}",
        )
        _require(
            _is_number(self.reg_param) and self.reg_param >= 0,
            "reg_param",
            f"must be a number >= 0 (0 = no regularization), got {self.reg_param!r}",
        )
        _require(
            _is_int(self.sweep_max_images) and self.sweep_max_images >= 10,
            "sweep_max_images",
            f"must be an integer >= 10, got {self.sweep_max_images!r}",
        )
        _require(
            _is_int(self.driver_max_mb) and self.driver_max_mb >= 0,
            "driver_max_mb",
            f"must be an integer >= 0 (0: always fit with Spark), got {self.driver_max_mb!r}",
        )

    def as_dict(self) -> dict:  # JSON's and papermill's: k_values a list
        values = asdict(self)
        return {**values, "k_values": None if self.k_values is None else list(self.k_values)}


# Hadoop's connectors to S3: one bucket, whichever spells its URI.
S3_SCHEMES = ("s3", "s3a", "s3n")


def location_key(location: str) -> str:
    """One spelling per location: ``file:///x``, ``file:/x``, ``/x/`` and a symbolic link to
    ``/x`` are the same folder, and so are ``s3://b/x``, ``s3a://b/x/`` and ``S3://b/x``."""
    if location.lower().startswith("file:"):
        location = "/" + location[len("file:") :].lstrip("/")
    if "://" not in location:
        return os.path.realpath(expand_home(location))
    scheme, rest = location.split("://", 1)
    scheme = "s3" if scheme.lower() in S3_SCHEMES else scheme.lower()
    return f"{scheme}://{rest}".rstrip("/")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def field_names(params_type: type) -> tuple[str, ...]:
    """Names of a params dataclass's fields, for the CLI and notebooks to map options."""
    return tuple(f.name for f in fields(params_type))
