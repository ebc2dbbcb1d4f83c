"""Step 2: put what a cluster needs in S3 (``aws upload``, ``emr stage``, ``emr wheelhouse``).

Why this module exists: an EMR node installs imagepca from the bucket, not from this
machine, so the wheel, the bootstrap script and its pinned requirements, the notebooks,
the weights and the converted TFLite model are uploaded under
``s3://BUCKET/artifacts/VERSION/``. Data (``aws upload``) is skipped when an object of the
same size exists, which is right for images; artifacts are compared by content (a SHA-256
kept in the object's metadata), because an edited pin often keeps the file's size.
For subnets without a route to PyPI, :func:`download_wheelhouse` fetches every dependency
wheel for the nodes' platform (x86_64 or aarch64), whatever this machine is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TextIO

from boto3.s3.transfer import TransferConfig

from imagepca.config import KERAS_WEIGHTS_FILE
from imagepca.weights import check_weights_file, file_sha256

from .settings import VERSION_PATTERN, AwsError, parse_s3_uri, repo_root

WEIGHTS_FILE = KERAS_WEIGHTS_FILE
BOOTSTRAP_FILES = ("install-python-deps.sh", "requirements-emr.txt")
PYSPARK_NOTEBOOKS = "notebooks-pyspark"
"""Copies of the notebooks for EMR Studio notebook executions, in the PySpark kernel: on a
Studio-attached cluster the ``python3`` kernel is EMR's ``/emr/notebook-env``, where
imagepca is not installed, while PySpark cells run in the Livy session on the driver's
python3.11, which the bootstrap set up."""
PYSPARK_KERNELSPEC = {"name": "pysparkkernel", "display_name": "PySpark", "language": "python"}
ARCHES = ("x86_64", "aarch64")
NODE_GLIBC_MINOR = 34
"""Amazon Linux 2023 (EMR 7.x) has glibc 2.34: wheels tagged manylinux_2_17 to _2_34 run."""
SHA256_KEY = "sha256"


# --------------------------------------------------------------------------- upload


@dataclass
class UploadResult:
    """What an upload did: counts let callers (and tests) check what was skipped."""

    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0


class _Progress:
    """Line-based progress on stderr: a line per file plus one every ~10% of a big file."""

    def __init__(self, label: str, size: int, out: TextIO) -> None:
        self.label, self.size, self.out = label, size, out
        self.seen = 0
        self.next_report = 0.1

    def __call__(self, amount: int) -> None:
        self.seen += amount
        if self.size >= 8 * 1024 * 1024 and self.seen / self.size >= self.next_report:
            print(f"  {self.label}: {100 * self.seen / self.size:.0f}%", file=self.out)
            self.next_report += 0.1


def iter_files(local: Path) -> Iterable[tuple[Path, str]]:
    """Files under ``local`` (or ``local`` itself) with their relative POSIX names, sorted."""
    if local.is_file():
        yield local, local.name
        return
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        yield path, path.relative_to(local).as_posix()


def upload(
    local: str | os.PathLike[str],
    s3_uri: str,
    *,
    s3_client: Any,
    compare: Literal["size", "sha256"] = "size",
    transfer_config: TransferConfig | None = None,
    extra_args: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> UploadResult:
    """Upload a directory (or one file) to ``s3_uri``, skipping objects already there.

    ``compare="size"`` skips an object of the same size (``aws s3 sync --size-only``:
    re-runs after an interruption only send what is missing; right for images).
    ``compare="sha256"`` skips only an object whose ``sha256`` metadata equals the file's
    digest (every upload records it), so an edited file of the same size is sent. boto3's
    transfer manager does multipart and parallel parts. Keys keep the file names as they
    are (spaces, non-ASCII) in UTF-8.
    """
    out = out or sys.stderr
    source = Path(local)
    if not source.exists():
        raise AwsError(f"{source} does not exist")
    bucket, prefix = parse_s3_uri(s3_uri)
    if prefix and not prefix.endswith("/") and source.is_dir():
        prefix += "/"
    existing = _existing_sizes(s3_client, bucket, prefix)
    config = transfer_config or TransferConfig(
        multipart_threshold=64 * 1024 * 1024, max_concurrency=8
    )
    files = list(iter_files(source))
    result = UploadResult()
    for index, (path, relative) in enumerate(files, start=1):
        # A single file goes to PREFIX/NAME, or to PREFIX itself when it names a key.
        key = prefix + relative if source.is_dir() or not prefix or prefix.endswith("/") else prefix
        size = path.stat().st_size
        digest = file_sha256(path)
        if existing.get(key) == size and (
            compare == "size" or _remote_sha256(s3_client, bucket, key) == digest
        ):
            result.skipped.append(key)
            continue
        print(f"[{index}/{len(files)}] s3://{bucket}/{key} ({size} bytes)", file=out)
        arguments = dict(extra_args or {})
        arguments["Metadata"] = {**arguments.get("Metadata", {}), SHA256_KEY: digest}
        s3_client.upload_file(
            str(path),
            bucket,
            key,
            ExtraArgs=arguments,
            Config=config,
            Callback=_Progress(relative, size, out),
        )
        result.uploaded.append(key)
        result.bytes_uploaded += size
    print(
        f"uploaded {len(result.uploaded)} file(s), {result.bytes_uploaded} bytes; "
        f"skipped {len(result.skipped)} already present",
        file=out,
    )
    return result


def _existing_sizes(s3_client: Any, bucket: str, prefix: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            sizes[item["Key"]] = item["Size"]
    return sizes


def _remote_sha256(s3_client: Any, bucket: str, key: str) -> str | None:
    return s3_client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(SHA256_KEY)


# --------------------------------------------------------------------------- stage


def build_wheel(project: Path, destination: Path) -> Path:
    """``pip wheel --no-deps . -w DIR``: the project's own wheel, dependencies come from pins."""
    destination.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", str(project), "-w", str(destination)],
        check=True,
    )
    wheels = sorted(destination.glob("imagepca-*.whl"))
    if not wheels:
        raise AwsError(f"pip wheel produced no imagepca wheel in {destination}")
    return wheels[-1]


def default_weights() -> Path | None:
    """The Keras cache copy of the MobileNetV2 weights, if present."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    candidate = home / "models" / WEIGHTS_FILE
    return candidate if candidate.exists() else None


def pinned_tensorflow(project: Path) -> str | None:
    """The TensorFlow version the bootstrap installs (the same on x86_64 and aarch64)."""
    text = (project / "bootstrap" / "requirements-emr.txt").read_text()
    match = re.search(r"^tensorflow==([\w.]+)\s*(?:#.*)?$", text, re.M)
    return match.group(1) if match else None


def pyspark_notebook(path: Path, destination: Path) -> Path:
    """A copy of ``path`` whose kernel is sparkmagic's PySpark kernel (see PYSPARK_NOTEBOOKS)."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    meta = notebook.setdefault("metadata", {})
    meta["kernelspec"] = dict(PYSPARK_KERNELSPEC)
    # papermill picks its parameter translator by language; EMR notebooks may carry "".
    meta["language_info"] = {**meta.get("language_info", {}), "name": "python"}
    target = destination / path.name
    target.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


def stage(
    bucket: str,
    version: str,
    weights: Path,
    *,
    s3_client: Any,
    project: Path | None = None,
    wheel_builder: Callable[[Path, Path], Path] = build_wheel,
    model_converter: Callable[[Path, int], Path] | None = None,
    image_sizes: Sequence[int] = (224,),
    wheelhouse: Path | None = None,
    out: TextIO | None = None,
) -> dict[str, str]:
    """Upload everything a cluster needs to ``s3://BUCKET/artifacts/VERSION/``.

    Layout: ``wheels/`` (imagepca wheel, plus ``wheelhouse`` wheels for offline
    installs), ``bootstrap/`` (script and pinned requirements), ``notebooks/``,
    ``notebooks-pyspark/`` (the same in the PySpark kernel, for EMR Studio notebook
    executions), ``models/<weights file>`` and ``models/tflite/`` (the tflite engine's
    model converted here for each of ``image_sizes``, so the cluster's driver fetches it
    instead of converting). Files whose content is unchanged are skipped.
    """
    # Here, not at import: the model code pulls in pandas and PySpark, which `emr up`,
    # `run` and `down` do not need.
    from imagepca.features import staged_models_uri, tflite_model_path

    out = out or sys.stderr
    if not VERSION_PATTERN.match(version):
        raise AwsError(f"invalid version {version!r}")
    weights = Path(weights)
    if not weights.is_file():
        raise AwsError(f"weights file {weights} not found (pass --weights FILE)")
    if model_converter is None:  # the real conversion: the file checked as notebook 01 does
        hint = f"Pass --weights with Keras' {KERAS_WEIGHTS_FILE}."
        check_weights_file(weights, str(weights), hint=hint)
        model_converter = tflite_model_path
    # Converted before anything is uploaded: weights that cannot be converted replace nothing.
    models = [model_converter(weights, size) for size in image_sizes]
    project = project or repo_root()
    base = f"s3://{bucket}/artifacts/{version}"

    def put(local: Path, uri: str) -> None:
        upload(local, uri, s3_client=s3_client, compare="sha256", out=out)

    with tempfile.TemporaryDirectory(prefix="imagepca-stage-") as tmp:
        wheel = wheel_builder(project, Path(tmp))
        if not wheel.name.startswith(f"imagepca-{version}-"):
            raise AwsError(
                f"built {wheel.name} but staging version {version}: stage the package's own "
                "version or bump it in pyproject.toml"
            )
        put(wheel, f"{base}/wheels/")
        for notebook in sorted((project / "notebooks").glob("*.ipynb")):
            put(notebook, f"{base}/notebooks/")
            put(pyspark_notebook(notebook, Path(tmp)), f"{base}/{PYSPARK_NOTEBOOKS}/")
    if wheelhouse:
        put(wheelhouse, f"{base}/wheels/")
    for name in BOOTSTRAP_FILES:
        put(project / "bootstrap" / name, f"{base}/bootstrap/")
    put(weights, f"{base}/models/{WEIGHTS_FILE}")
    models_uri = staged_models_uri(f"{base}/models/{WEIGHTS_FILE}")
    for model in models:
        put(model, f"{models_uri}/{model.name}")
    local_tf, cluster_tf = metadata.version("tensorflow"), pinned_tensorflow(project)
    if cluster_tf and local_tf != cluster_tf:
        print(
            f"note: the TFLite model was converted with TensorFlow {local_tf}, the cluster "
            f"installs {cluster_tf}: its driver will not use the staged model and converts "
            "once per node instead (seconds). Stage from an environment with "
            f"tensorflow=={cluster_tf} to avoid that.",
            file=out,
        )
    return {
        "artifacts": base,
        "bootstrap": f"{base}/bootstrap/install-python-deps.sh",
        "notebooks": f"{base}/notebooks",
        "pyspark_notebooks": f"{base}/{PYSPARK_NOTEBOOKS}",
        "weights": f"{base}/models/{WEIGHTS_FILE}",
        "tflite_models": models_uri,
    }


# --------------------------------------------------------------------------- wheelhouse


def platform_tags(arch: str) -> list[str]:
    """pip ``--platform`` tags of wheels that run on an EMR 7 node of ``arch``.

    Given several, pip accepts any of them; given one, only that one (a single
    ``manylinux_2_28`` misses TensorFlow's ``manylinux_2_27`` wheels).
    """
    if arch not in ARCHES:
        raise AwsError(f"--arch must be one of {ARCHES}, got {arch!r}")
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(NODE_GLIBC_MINOR, 16, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return tags


def wheel_architectures(names: Iterable[str]) -> set[str]:
    """The node architectures (:data:`ARCHES`) the platform wheels among ``names`` are for."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    found = set()
    for name in names:
        try:
            wheel_tags = parse_wheel_filename(name)[3]
        except InvalidWheelFilename:
            continue
        found.update(arch for tag in wheel_tags for arch in ARCHES if tag.platform.endswith(arch))
    return found


PIP_WITH_MACHINE = (
    "import platform, sys; machine = sys.argv.pop(1); platform.machine = lambda: machine; "
    "from pip._internal.cli.main import main; sys.exit(main())"
)
"""Runs pip with ``platform.machine()`` answering the target's architecture: pip evaluates
environment markers (``platform_machine == "aarch64"``, in our pins and in TensorFlow's
own requirements) with the running interpreter's values, not ``--platform``."""


def wheelhouse_command(requirements: Path, arch: str, destination: Path) -> list[str]:
    """The ``pip download`` that fetches every wheel an ``arch`` node installs offline."""
    command = [sys.executable, "-c", PIP_WITH_MACHINE, arch, "download"]
    command += ["--only-binary", ":all:", "--python-version", "3.11"]
    command += ["--implementation", "cp", "--abi", "cp311"]
    for tag in platform_tags(arch):
        command += ["--platform", tag]
    command += ["--requirement", str(requirements), "--dest", str(destination)]
    return command + ["--disable-pip-version-check", "--progress-bar", "off"]


def download_wheelhouse(
    arch: str,
    destination: Path,
    *,
    requirements: Path | None = None,
    out: TextIO | None = None,
) -> list[Path]:
    """Download the wheels of ``bootstrap/requirements-emr.txt`` for ``arch`` nodes.

    Stage the folder with ``emr stage --wheelhouse DIR`` and set ``"offline": true``; the
    bootstrap then installs with ``pip --no-index``. The default instance types share one
    architecture; a cluster that mixes two needs a download for each into the same folder
    (each node's pip picks its own wheels).
    """
    out = out or sys.stderr
    requirements = requirements or repo_root() / "bootstrap" / "requirements-emr.txt"
    destination.mkdir(parents=True, exist_ok=True)
    command = wheelhouse_command(requirements, arch, destination)
    print("running: pip " + " ".join(command[4:]), file=out)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AwsError(
            f"pip download for {arch} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    wheels = sorted(destination.glob("*.whl"))
    print(f"{len(wheels)} wheels in {destination} (downloaded for {arch})", file=out)
    return wheels
