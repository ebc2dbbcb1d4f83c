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
    "jvm = spark.sparkContext._jvm\n"
    "bean = jvm.java.lang.Class.forName('com.sun.management.HotSpotDiagnosticMXBean')\n"
    "flag = jvm.java.lang.management.ManagementFactory.getPlatformMXBean(bean)\n"
    "print('TieredStopAtLevel', flag.getVMOption('TieredStopAtLevel').getValue())\n"
    "print('counted')\n"
)


def run_script(script: str, *args: str, env: dict, last_line: str):
    """Run ``script`` in a fresh interpreter (a JVM of its own); it succeeds and ends by
    printing ``last_line``."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(last_line)
    return done


def run_session(cache, *args, quick_jit=False):
    env = {**os.environ, "IMAGEPCA_CACHE": str(cache)}
    env["IMAGEPCA_JVM_QUICK_JIT"] = "1" if quick_jit else "0"
    return run_script(SESSION, *args, env=env, last_line="counted")


def test_first_jvm_writes_the_archive_and_the_next_loads_spark_from_it(tmp_path):
    cache = tmp_path / "cache"
    first = run_session(cache)  # no stop_spark: the exit hook waits for the JVM and keeps it
    assert "TieredStopAtLevel 4" in first.stdout  # both compilers by default
    archives = sorted((cache / "jvm").iterdir())
    assert [path.suffix for path in archives] == [".jsa"], archives  # no partial file left
    assert archives[0].stat().st_size > 10 * 2**20

    log = tmp_path / "classes.log"
    second = run_session(cache, str(log), quick_jit=True)
    assert "TieredStopAtLevel 1" in second.stdout  # C1 only, as imagepca run asks for small runs
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


def test_no_jvm_options_when_spark_defaults_set_the_drivers_java_options(tmp_path, monkeypatch):
    """An EMR node's spark-defaults.conf sets them: a session setting would replace them."""
    (tmp_path / "spark-defaults.conf").write_text(
        "spark.driver.memory 2g\n"
        "spark.driver.extraJavaOptions    -XX:+UseG1GC -XX:OnOutOfMemoryError='kill -9 %p'\n"
    )
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path))
    monkeypatch.setenv("IMAGEPCA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(session, "_pending_archive", None)  # this process's JVM keeps its own
    assert session.local_jvm_options() == ""
    # Other settings there: the session's options, but no class archive, which Java does not
    # write for a class path with a non-empty folder (Spark's launcher puts this one on it).
    (tmp_path / "spark-defaults.conf").write_text("spark.driver.extraClassPath=/opt/x.jar\n")
    monkeypatch.setenv("IMAGEPCA_JVM_QUICK_JIT", "1")
    assert session.local_jvm_options() == session.QUICK_JIT_OPTION
    empty = tmp_path / "empty-conf"
    empty.mkdir()
    monkeypatch.setenv("SPARK_CONF_DIR", str(empty))
    assert session.local_jvm_options().startswith("-XX:ArchiveClassesAtExit=")
    assert session.local_jvm_options().split()[-1] == session.QUICK_JIT_OPTION
    monkeypatch.setenv("IMAGEPCA_JVM_CLASS_ARCHIVE", "0")
    assert session.local_jvm_options() == session.QUICK_JIT_OPTION


def test_imagepca_run_asks_for_c1_only_on_small_local_folders(tmp_path, monkeypatch):
    from imagepca import runner
    from imagepca.config import ExtractParams

    images = tmp_path / "images"
    for name in ("a/1.jpg", "a/2.JPEG", "b/3.png", "b/notes.txt"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(b"x")
    monkeypatch.delenv("IMAGEPCA_JVM_QUICK_JIT", raising=False)

    def env(input_uri=str(images), manifest=None, master=None, kernel="python3"):
        params = ExtractParams(input=input_uri, manifest=manifest, output=str(tmp_path / "o"))
        return runner.jvm_environment(params, master=master, kernel=kernel)

    assert env() == env(master="local[2]") == {"IMAGEPCA_JVM_QUICK_JIT": "1"}
    monkeypatch.setattr(runner, "QUICK_JIT_MAX_IMAGES", 2)  # 3 images: a long run
    assert env() == {}
    monkeypatch.setattr(runner, "QUICK_JIT_MAX_IMAGES", 3)
    assert env(input_uri=f"file://{images}") == {"IMAGEPCA_JVM_QUICK_JIT": "1"}
    assert env(master="yarn") == env(kernel="pysparkkernel") == {}
    assert env(input_uri="s3://bucket/images") == {}
    assert env(input_uri=None, manifest=str(tmp_path / "m.csv")) == {}
    monkeypatch.setenv("IMAGEPCA_JVM_QUICK_JIT", "0")  # the user's own choice wins
    assert env() == {}


LAUNCH = (
    "import signal\n"
    "from imagepca import session\n"
    "conf = {'spark.ui.enabled': 'false', 'spark.sql.shuffle.partitions': '3'}\n"
    "session.start_spark('local[1]', conf=conf)\n"
    "launched = session._launch[1]\n"
    "spark = session.get_spark('local[1]', conf=conf)\n"
    "assert spark.sparkContext._gateway is launched.result()  # the launched JVM, adopted\n"
    "assert spark.range(5).count() == 5\n"
    "assert spark.conf.get('spark.sql.shuffle.partitions') == '3'\n"
    "assert spark.sparkContext.master == 'local[1]' and spark.sparkContext.appName == 'imagepca'\n"
    "# The context was made on the main thread: PySpark's job-cancelling interrupt handler.\n"
    "assert signal.getsignal(signal.SIGINT).__qualname__.startswith('SparkContext')\n"
    "session.stop_spark()\n"
    "session.start_spark('local[1]', conf=conf)\n"
    "other = session._launch[1]\n"
    "spark = session.get_spark('local[2]', conf=conf)  # not what was launched\n"
    "assert other.result().proc.poll() is not None  # that JVM was shut down\n"
    "assert spark.sparkContext._gateway is not other.result()\n"
    "assert spark.sparkContext.master == 'local[2]' and spark.range(3).count() == 3\n"
    "session.stop_spark()\n"
    "session.start_spark('local[1]', conf=conf)\n"
    "unused = session._launch[1]\n"
    "session.stop_spark()  # no session took it: ended\n"
    "assert session._launch is None and unused.result().proc.poll() is not None\n"
    "print('adopted')\n"
)


def test_get_spark_adopts_the_jvm_start_spark_launched_with_the_same_arguments(tmp_path):
    env = {**os.environ, "IMAGEPCA_CACHE": str(tmp_path / "cache")}
    env["IMAGEPCA_JVM_CLASS_ARCHIVE"] = "0"  # the archive is the test above's
    run_script(LAUNCH, env=env, last_line="adopted")


DISCARD = (
    "import sys\n"
    "from imagepca import session\n"
    "conf = {'spark.ui.enabled': 'false', 'spark.driver.extraJavaOptions': sys.argv[1]}\n"
    "session.start_spark('local[1]', conf=conf)\n"
    "unused = session._launch[1]\n"
    "assert 'ArchiveClassesAtExit' in session._launch[0]['spark.driver.extraJavaOptions']\n"
    "session.stop_spark()  # no session took it\n"
    "assert unused.result().proc.returncode == 0  # it exited, not killed\n"
    "print('ended')\n"
)


def test_a_launched_jvm_no_session_takes_exits_and_leaves_nothing(tmp_path):
    """Its shutdown hooks remove its scratch folder; the class archive it wrote as it exited
    (of the gateway's classes alone) is not kept."""
    scratch = tmp_path / "java-tmp"
    scratch.mkdir()
    env = {**os.environ, "IMAGEPCA_CACHE": str(tmp_path / "cache")}
    env.pop("IMAGEPCA_JVM_CLASS_ARCHIVE", None)  # no archive yet: this JVM would write one
    run_script(DISCARD, f"-Djava.io.tmpdir={scratch}", env=env, last_line="ended")
    assert list(scratch.iterdir()) == []
    assert list((tmp_path / "cache" / "jvm").iterdir()) == []


def test_start_spark_does_nothing_beside_an_active_session(spark):
    session.start_spark("local[1]")
    assert session._launch is None
    assert session.get_spark("local[1]") is spark


STOP = (
    "import time\n"
    "import pandas as pd\n"
    "from pyspark import SparkContext\n"
    "from pyspark.sql import functions as F\n"
    "from imagepca.session import get_spark, stop_spark\n"
    "spark = get_spark('local[1]', conf={'spark.ui.enabled': 'false'})\n"
    "plus = F.pandas_udf(lambda values: values + 1, 'long')\n"
    "assert [row[0] for row in spark.range(3).select(plus('id')).collect()] == [1, 2, 3]\n"
    "server = SparkContext._active_spark_context._accumulatorServer\n"
    "stop_spark()\n"
    "deadline = time.monotonic() + 10\n"
    "while server.socket.fileno() != -1 and time.monotonic() < deadline:\n"
    "    time.sleep(0.05)\n"
    "assert server.socket.fileno() == -1, 'the accumulator server was not shut down'\n"
    "print('stopped')\n"
)


def test_stop_spark_shuts_the_accumulator_server_down_without_a_traceback(tmp_path):
    """After a Python UDF's job, the server is connected to the JVM, which exits first."""
    env = {**os.environ, "IMAGEPCA_CACHE": str(tmp_path / "cache")}
    env["IMAGEPCA_JVM_CLASS_ARCHIVE"] = "0"
    done = run_script(STOP, env=env, last_line="stopped")
    assert "Traceback" not in done.stderr and "Exception" not in done.stderr, done.stderr


def test_file_names_are_utf8_in_the_jvm_whatever_the_locale(tmp_path):
    """Under LC_ALL=C, or a UTF-8 locale not installed, Java read non-ASCII names as "?": a
    class folder "café" was lost without a word, a non-ASCII input or output "did not exist"."""
    for label in ("café", "plain"):
        (tmp_path / "in" / label).mkdir(parents=True)
        (tmp_path / "in" / label / "ñandú 1.png").write_bytes(b"x")
    script = (
        "import sys\n"
        "from imagepca.inputs import list_folder\n"
        "from imagepca.session import get_spark\n"
        "spark = get_spark('local[1]', conf={'spark.ui.enabled': 'false'})\n"
        "print(sorted(list_folder(spark, sys.argv[1]).label_counts.items()))\n"
        "print(spark.sparkContext._jvm.System.getProperty('sun.jnu.encoding'))\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_CTYPE", "LANG")}
    base["IMAGEPCA_CACHE"] = str(tmp_path / "cache")
    # The C locale, and a UTF-8 locale the system lacks (Java falls back to ASCII).
    for locale in ({"LC_ALL": "C"}, {"LANG": "xx_XX.UTF-8"}):
        done = run_script(script, str(tmp_path / "in"), env={**base, **locale}, last_line="UTF-8")
        assert "[('café', 1), ('plain', 1)]" in done.stdout, locale


def test_the_utf8_locale_is_one_this_system_has_and_the_process_keeps_its_own():
    import locale

    from imagepca.local_folders import UTF8_LOCALES, utf8_locale

    before = locale.setlocale(locale.LC_CTYPE)
    assert utf8_locale() in UTF8_LOCALES  # Debian has C.UTF-8
    assert locale.setlocale(locale.LC_CTYPE) == before
