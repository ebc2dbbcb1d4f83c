"""The local JVM's class archive: written once as a JVM exits, then mapped by the next."""

import os
import subprocess
import sys

from imagepca import session

SESSION = (
    "import sys\n"
    "from imagepca.session import get_spark\n"
    "conf = {'spark.ui.enabled': 'false'}\n"
    "if len(sys.argv) > 1:\n"
    "    conf['spark.driver.extraJavaOptions'] = f'-Xlog:class+load=info:file={sys.argv[1]}'\n"
    "spark = get_spark('local[1]', conf=conf)\n"
    "assert spark.range(5).count() == 5\n"
    "print('counted')\n"
)


def run_session(cache, *args):
    env = {**os.environ, "IMAGEPCA_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", SESSION, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("counted")
    return done


def test_first_jvm_writes_the_archive_and_the_next_loads_spark_from_it(tmp_path):
    cache = tmp_path / "cache"
    run_session(cache)  # no stop_spark: the exit hook waits for the JVM and keeps its archive
    archives = sorted((cache / "jvm").iterdir())
    assert [path.suffix for path in archives] == [".jsa"], archives  # no partial file left
    assert archives[0].stat().st_size > 10 * 2**20

    log = tmp_path / "classes.log"
    run_session(cache, str(log))
    loaded = log.read_text()
    assert "org.apache.spark.SparkContext source: shared objects file (top)" in loaded
    assert sorted((cache / "jvm").iterdir()) == archives  # mapped, not written again


def test_archive_of_a_failed_jvm_is_dropped(tmp_path, monkeypatch):
    writing, archive = tmp_path / "spark-x.jsa.123.tmp", tmp_path / "spark-x.jsa"
    writing.write_bytes(b"partial")
    monkeypatch.setattr(session, "_pending_archive", (writing, archive))
    session._keep_class_archive(137)
    assert not writing.exists() and not archive.exists()


def test_java_version_from_the_release_file(tmp_path):
    (tmp_path / "release").write_text('IMPLEMENTOR="Debian"\nJAVA_VERSION="17.0.15"\n')
    assert session._java_major(tmp_path) == 17
    (tmp_path / "release").write_text('JAVA_VERSION="1.8.0_402"\n')
    assert session._java_major(tmp_path) == 8
    assert session._java_major(tmp_path / "missing") is None


def test_no_archive_before_java_13(tmp_path, monkeypatch):
    (tmp_path / "release").write_text('JAVA_VERSION="11.0.22"\n')
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    assert session.class_archive_options() == ""


def test_no_archive_when_spark_defaults_set_the_drivers_java_options(tmp_path, monkeypatch):
    """An EMR node's spark-defaults.conf sets them: a session setting would replace them."""
    (tmp_path / "spark-defaults.conf").write_text(
        "spark.driver.memory 2g\n"
        "spark.driver.extraJavaOptions    -XX:+UseG1GC -XX:OnOutOfMemoryError='kill -9 %p'\n"
    )
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path))
    monkeypatch.setenv("IMAGEPCA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(session, "_pending_archive", None)  # this process's JVM keeps its own
    assert session.class_archive_options() == ""
    (tmp_path / "spark-defaults.conf").write_text("spark.driver.extraClassPath=/opt/x.jar\n")
    assert session.class_archive_options().startswith("-XX:ArchiveClassesAtExit=")
