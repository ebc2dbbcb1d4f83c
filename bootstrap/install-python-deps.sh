#!/usr/bin/env bash
# EMR bootstrap action: install imagepca's Python 3.11 environment on every node.
#
# Runs as the hadoop user on every node before the cluster's applications are
# installed. A non-zero exit stops the cluster from starting, which is what we
# want: a node without TensorFlow would fail every Spark task later, far from
# the cause.
#
# Usage:
#   install-python-deps.sh --artifacts s3://BUCKET/artifacts/VERSION [--version VERSION]
#                          [--offline] [--dry-run]
#
#   --artifacts URI  staging prefix written by `imagepca emr stage`; holds
#                    bootstrap/requirements-emr.txt and wheels/ (the imagepca wheel,
#                    plus every dependency wheel when staged for private subnets).
#   --version V      imagepca version to install (default: any staged wheel).
#   --offline        install only from the staged wheels (pip --no-index), for
#                    subnets without a route to PyPI.
#   --dry-run        print every command instead of running it
#                    (also: IMAGEPCA_BOOTSTRAP_DRY_RUN=1).
#
# Idempotent: re-running re-syncs the same files and pip keeps what is installed.
set -euo pipefail

PYTHON="${IMAGEPCA_PYTHON:-python3.11}"
WORK_DIR="${IMAGEPCA_BOOTSTRAP_DIR:-/mnt/imagepca-bootstrap}"
ARTIFACTS=""
VERSION=""
OFFLINE=0
DRY_RUN="${IMAGEPCA_BOOTSTRAP_DRY_RUN:-0}"
RETRIES="${IMAGEPCA_BOOTSTRAP_RETRIES:-5}"

log() {
  echo "[imagepca-bootstrap] $*" >&2
}

die() {
  echo "[imagepca-bootstrap] ERROR: $*" >&2
  exit 1
}

# Print a command in a copy-pasteable form; run it unless in dry-run mode.
run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  log "running: $*"
  "$@"
}

# Retry a network command with exponential backoff (S3 and PyPI hiccups at launch
# are common when many nodes start at once).
retry() {
  local attempt=1 delay=5
  while true; do
    if run "$@"; then
      return 0
    fi
    if (( attempt >= RETRIES )); then
      die "failed after ${attempt} attempts: $*"
    fi
    log "attempt ${attempt} failed, retrying in ${delay}s: $*"
    sleep "${delay}"
    attempt=$((attempt + 1))
    delay=$((delay * 2))
  done
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --artifacts) ARTIFACTS="${2:?--artifacts needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[[ -n "${ARTIFACTS}" ]] || die "--artifacts s3://BUCKET/artifacts/VERSION is required"
[[ "${ARTIFACTS}" == s3://* ]] || die "--artifacts must be an s3:// URI, got ${ARTIFACTS}"
ARTIFACTS="${ARTIFACTS%/}"
WHEEL_DIR="${WORK_DIR}/wheels"
REQUIREMENTS="${WORK_DIR}/requirements-emr.txt"

log "artifacts=${ARTIFACTS} version=${VERSION:-any} offline=${OFFLINE} dry_run=${DRY_RUN} arch=$(uname -m)"

# 1. Python 3.11 and its pip. On Amazon Linux 2023 (EMR 7.x) they are separate
#    packages, python3.11 and python3.11-pip: an image can have the interpreter without
#    pip. The checks only read, so a dry run makes them too.
MISSING=()
if ! command -v "${PYTHON}" >/dev/null 2>&1; then
  MISSING=(python3.11 python3.11-pip python3.11-devel)
elif ! "${PYTHON}" -m pip --version >/dev/null 2>&1; then
  MISSING=(python3.11-pip)
fi
if (( ${#MISSING[@]} > 0 )); then
  retry sudo dnf install -y "${MISSING[@]}"
else
  log "${PYTHON} and its pip are installed"
fi

# 2. Requirements and wheels staged by `imagepca emr stage`.
run sudo mkdir -p "${WHEEL_DIR}"
run sudo chown -R "$(id -u):$(id -g)" "${WORK_DIR}"
retry aws s3 cp "${ARTIFACTS}/bootstrap/requirements-emr.txt" "${REQUIREMENTS}"
retry aws s3 sync --only-show-errors "${ARTIFACTS}/wheels/" "${WHEEL_DIR}/"

PIP=(sudo "${PYTHON}" -m pip install --disable-pip-version-check --no-cache-dir
     --find-links "${WHEEL_DIR}")
if [[ "${OFFLINE}" == "1" ]]; then
  PIP+=(--no-index)
fi

# 3. Pinned dependencies first, then this project's wheel without dependencies,
#    so the pins decide every version.
retry "${PIP[@]}" --requirement "${REQUIREMENTS}"

if [[ -n "${VERSION}" ]]; then
  WHEEL_PATTERN="imagepca-${VERSION}-*.whl"
else
  WHEEL_PATTERN="imagepca-*.whl"
fi
if [[ "${DRY_RUN}" == "1" ]]; then
  WHEEL="${WHEEL_DIR}/${WHEEL_PATTERN}"
else
  WHEEL="$(find "${WHEEL_DIR}" -maxdepth 1 -name "${WHEEL_PATTERN}" | sort | tail -n 1)"
  [[ -n "${WHEEL}" ]] || die "no ${WHEEL_PATTERN} in ${ARTIFACTS}/wheels/ (run: imagepca emr stage)"
fi
run "${PIP[@]}" --no-deps --force-reinstall "${WHEEL}"

# 4. Make EMR's own PySpark importable from python3.11 (it lives in /usr/lib/spark,
#    which is installed after bootstrap actions, so the path is resolved at import).
if [[ "${DRY_RUN}" == "1" ]]; then
  SITE_PACKAGES="<python3.11 purelib>"
else
  SITE_PACKAGES="$("${PYTHON}" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
fi
PTH_LINE='import sys, glob; sys.path.extend(p for p in ["/usr/lib/spark/python", *sorted(glob.glob("/usr/lib/spark/python/lib/py4j-*-src.zip"))] if p not in sys.path)'
if [[ "${DRY_RUN}" == "1" ]]; then
  printf '+ write %q to %q\n' "${PTH_LINE}" "${SITE_PACKAGES}/emr_pyspark.pth"
else
  printf '%s\n' "${PTH_LINE}" | sudo tee "${SITE_PACKAGES}/emr_pyspark.pth" >/dev/null
fi

# 5. The python3 Jupyter kernel papermill uses on the primary node.
run sudo "${PYTHON}" -m ipykernel install --name python3 --display-name "Python 3.11 (imagepca)"

# 6. Verify: imports work and no pip-installed pyspark shadows EMR's Spark.
run "${PYTHON}" -c 'import importlib.metadata as m, sys
try:
    m.version("pyspark")
except m.PackageNotFoundError:
    pass
else:
    sys.exit("a pip-installed pyspark is present; EMR nodes must use /usr/lib/spark")
import numpy, pandas, pyarrow, PIL, matplotlib, papermill, tensorflow, imagepca
print("imports ok: tensorflow", tensorflow.__version__, "numpy", numpy.__version__)'

log "done"
