"""Parameters, k selection, labels and URI spelling: the small pure pieces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imagepca import runner
from imagepca.cli import main
from imagepca.config import (
    ClassifyParams,
    ExtractParams,
    ParameterError,
    ReduceParams,
    check_master,
)
from imagepca.images import extension_glob, label_of
from imagepca.inputs import list_folder, scan_settings
from imagepca.reduction import check_k, choose_k
from imagepca.storage import join, normalize_uri


def test_defaults_are_valid():
    params = ExtractParams(input="data/sample", output="out")
    assert params.engine == "tflite" and params.image_size == 224
    assert ReduceParams(output="out").variance == 0.95


def test_a_leading_tilde_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """A notebook's "~/photos" or a shell's --output=~/x: Spark, Hadoop and papermill would
    take "~" as a folder of that name in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photos").mkdir()
    params = ExtractParams(input="~/photos", output="~/out", weights="~/w.h5")
    assert (params.input, params.output) == (f"{tmp_path}/photos", f"{tmp_path}/out")
    assert params.weights == "~/w.h5"  # resolved where it is loaded, s3:// or local
    assert ReduceParams(output="~/out").output == ClassifyParams(output="~/out").output
    assert ClassifyParams(output="~/out").output == f"{tmp_path}/out"
    assert ExtractParams(manifest="~/list.csv", output="o").manifest == f"{tmp_path}/list.csv"
    assert ReduceParams(output="~backup/run").output == "~backup/run"  # not another's home
    with pytest.raises(ParameterError, match="output must not be inside input"):
        ExtractParams(input="~/photos", output=f"{tmp_path}/photos/out")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--input", ".", "--output=~/photos/o"]) == 2  # no shell expanded it
    assert "--output must not be inside input" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"input": ""}, "input must be a non-empty"),
        ({"output": "data/sample"}, "output must differ from input"),
        ({"engine": "onnx"}, "engine must be one of tflite, keras"),
        ({"image_size": 100}, "image_size must be one of"),
        ({"batch_size": 0}, "batch_size must be an integer from 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"max_records_per_batch": 0}, "max_records_per_batch"),
        ({"fast_decode": "yes"}, "fast_decode must be True or False"),
        ({"max_rejected_fraction": 1.5}, "max_rejected_fraction must be a number in [0, 1]"),
        ({"tasks_per_core": 0}, "tasks_per_core"),
        ({"max_image_pixels": 10}, "max_image_pixels"),
    ],
)
def test_extract_params_say_what_is_wrong(changes, message):
    with pytest.raises(ParameterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ExtractParams(**{"input": "data/sample", "output": "out", **changes})


def test_output_inside_input_is_refused_through_links_and_uri_spellings(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (tmp_path / "link").symlink_to(photos)
    for inside in (photos / "out", f"file://{photos}/out", tmp_path / "link" / "out"):
        with pytest.raises(ParameterError, match="output must not be inside input"):
            ExtractParams(input=str(tmp_path / "link"), output=str(inside))
        with pytest.raises(ParameterError, match="output must not be inside input"):
            ExtractParams(input=str(photos), output=str(inside))
    with pytest.raises(ParameterError, match="output must differ from input"):
        ExtractParams(input=f"file:{photos}/", output=str(tmp_path / "link"))
    # Hadoop's S3 connectors reach one bucket under three schemes.
    for output in ("s3a://bucket/photos/out", "S3://bucket/photos/runs/1", "s3n://bucket/photos/o"):
        with pytest.raises(ParameterError, match="output must not be inside input"):
            ExtractParams(input="s3://bucket/photos/", output=output)
    with pytest.raises(ParameterError, match="output must differ from input"):
        ExtractParams(input="s3a://bucket/photos", output="s3://bucket/photos/")
    assert ExtractParams(input="s3://bucket/photos", output="s3a://bucket/photos-out").output
    assert ExtractParams(input=str(photos), output=str(tmp_path / "out")).output


def test_an_output_or_input_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for spelling in (str(tmp_path / "notes.txt"), f"file://{tmp_path}/notes.txt"):
        with pytest.raises(ParameterError, match="is a file: give a folder"):
            ExtractParams(input="data/sample", output=spelling)
        with pytest.raises(ParameterError, match="is a file: give the folder .*--manifest"):
            ExtractParams(input=spelling, output=str(tmp_path / "out"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_notebooks_folder_without_the_classifier_needs_skip_classify(tmp_path, capsys):
    from imagepca.runner import notebooks_dir

    (tmp_path / "images" / "apple").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    for name in ("01_extract_features.ipynb", "02_reduce_pca.ipynb"):
        (tmp_path / "notebooks" / name).write_bytes((Path(notebooks_dir()) / name).read_bytes())
    run = ["run", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "out")]
    assert main([*run, "--notebooks", str(tmp_path / "notebooks")]) == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert "no 03_classify.ipynb there" in message and "--skip-classify" in message
    assert not (tmp_path / "out").exists()


def test_an_input_whose_links_loop_is_refused(tmp_path, capsys):
    """Spark's listing follows a link to a folder that holds it until the system's limit of
    40 links: every image below it would be featurized 41 times."""
    photos = tmp_path / "photos"
    (photos / "apple").mkdir(parents=True)
    (photos / "banana" / "ripe").mkdir(parents=True)
    (photos / "banana" / "ripe" / "more").symlink_to(photos / "banana")
    with pytest.raises(
        ParameterError, match="'.*/banana/ripe/more' links to '.*/banana', which the"
    ):
        ExtractParams(input=str(photos), output=str(tmp_path / "out"))
    status = main(["run", "--input", str(photos), "--output", str(tmp_path / "out")])
    assert status == 2 and "input has a link that loops" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (photos / "banana" / "ripe" / "more").unlink()
    # Two folders linking to each other: apple/to_banana/to_apple/to_banana/...
    (photos / "apple" / "to_banana").symlink_to(photos / "banana")
    (photos / "banana" / "to_apple").symlink_to(photos / "apple")
    with pytest.raises(ParameterError, match="input has a link that loops: '.*/to_(apple|banana)'"):
        ExtractParams(input=str(photos), output=str(tmp_path / "out"))
    (photos / "banana" / "to_apple").unlink()
    (photos / "apple" / "to_banana").unlink()
    (photos / "_old").symlink_to(photos)  # Spark skips it: no loop
    (photos / "banana" / "ripe" / "apple").symlink_to(photos / "apple")  # no loop either
    assert ExtractParams(input=str(photos), output=str(tmp_path / "out")).output


def test_linked_class_folders_count_for_k(spark, tmp_path, capsys):
    """Spark lists the images of linked class folders: so does the check of ``--k``."""
    store = tmp_path / "store"
    (tmp_path / "images").mkdir()
    for label in ("apple", "banana"):
        (store / label).mkdir(parents=True)
        for name in ("1.jpg", "2.JPG"):
            (store / label / name).write_bytes(b"")
        (tmp_path / "images" / label).symlink_to(store / label)
    (tmp_path / "images" / "again").symlink_to(store / "apple")  # Spark lists these twice
    assert runner.local_image_count(str(tmp_path / "images"), 100) == 6
    output = tmp_path / "out"
    status = main(["run", "--input", str(tmp_path / "images"), "--output", str(output), "--k", "6"])
    assert status == 2 and "holds 6 image files" in capsys.readouterr().err  # 5 at most
    assert not output.exists()
    # Names Spark's listing skips, and links to nothing, are not images the run can have.
    for skipped in ("_MG_1.jpg", ".2.jpg", "_drafts/4.jpg", ".cache/5.jpg"):
        (store / "apple" / skipped).parent.mkdir(exist_ok=True)
        (store / "apple" / skipped).write_bytes(b"")
    (store / "apple" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (store / "apple" / "_year=2024").mkdir()  # a partition's folder: listed
    (store / "apple" / "_year=2024" / "6.jpg").write_bytes(b"")
    # Parquet's _metadata and _common_metadata names are listed, as Spark lists them.
    (tmp_path / "images" / "_metadata_pears").mkdir()
    (tmp_path / "images" / "_metadata_pears" / "1.jpg").write_bytes(b"")
    (tmp_path / "images" / "_common_metadata.jpg").write_bytes(b"")
    assert runner.local_image_count(str(tmp_path / "images"), 100) == 10
    listing = list_folder(spark, str(tmp_path / "images"))
    assert listing.n_files == 10  # as Spark lists them
    assert listing.n_hidden == 4  # _MG_1.jpg and _drafts/4.jpg, through two links
    listing.release()


def refused(argv: list[str], capsys) -> str:
    """The last line `imagepca` prints for options it refuses (exit status 2)."""
    assert main(argv) == 2
    return capsys.readouterr().err.splitlines()[-1]


def images_folder(root: Path, labels: tuple[str, ...], per_label: int) -> list[str]:
    """Empty files named like images, ``per_label`` per label; ``run``'s arguments on them."""
    for label in labels:
        (root / "images" / label).mkdir(parents=True)
        for index in range(per_label):
            (root / "images" / label / f"{index}.jpg").write_bytes(b"")
    return ["run", "--input", str(root / "images"), "--output", str(root / "out")]


def test_k_on_a_folder_of_one_image_says_pca_needs_two(tmp_path, capsys):
    argv = images_folder(tmp_path, ("apple",), 1)
    assert refused([*argv, "--k", "1"], capsys).endswith(
        "holds 1 image files, and the PCA of n images has at most n - 1 components with "
        "variance; PCA needs 2"
    )


def test_k_values_beyond_the_folders_images_are_refused_before_the_run(tmp_path, capsys):
    """The sweep's k values are checked as --k is."""
    argv = images_folder(tmp_path, ("apple", "banana"), 2)
    assert refused([*argv, "--k-values", "2,4"], capsys).endswith(
        "--k-values 2,4: " + str(tmp_path / "images") + " holds 4 image files, and the PCA of "
        "n images has at most n - 1 components with variance; give --k-values up to 3 (less if "
        "some are not usable images)"
    )
    # --k first, when both are too large.
    assert "--k 9:" in refused([*argv, "--k-values", "2,4", "--k", "9"], capsys)
    assert not (tmp_path / "out").exists()


def test_an_output_reached_through_a_link_in_the_input_is_refused(tmp_path):
    """Spark's listing follows a folder's link: an output in its target, or holding it, is
    read by the next run. Folders Spark skips (``_``, ``.``) don't count."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (photos / "apple").mkdir(parents=True)
    (elsewhere / "pears").mkdir(parents=True)
    (photos / "apple" / "pears").symlink_to(elsewhere / "pears")
    (photos / "more").symlink_to(elsewhere)
    for output in (elsewhere / "out", elsewhere / "pears", elsewhere):
        with pytest.raises(ParameterError, match=f"'{photos}/more' links to '{elsewhere}'"):
            ExtractParams(input=str(photos), output=str(output))
    (photos / "more").unlink()
    with pytest.raises(ParameterError, match="'.*/apple/pears' links to .*remove the link"):
        ExtractParams(input=str(photos), output=str(elsewhere / "pears" / "out"))
    # A link into the output: its folder becomes a class of plots.
    with pytest.raises(ParameterError, match="'.*/apple/pears' links to"):
        ExtractParams(input=str(photos), output=str(elsewhere))
    (photos / "apple" / "pears").unlink()
    (photos / "_drafts").mkdir()
    (photos / "_drafts" / "pears").symlink_to(elsewhere / "pears")
    (photos / ".cache").symlink_to(elsewhere)
    assert ExtractParams(input=str(photos), output=str(elsewhere / "pears" / "out")).output
    assert ExtractParams(input=str(photos), output=str(tmp_path / "out")).output
    (photos / "root").symlink_to("/")
    with pytest.raises(ParameterError, match=f"'{photos}/root' links to '/'"):
        ExtractParams(input=str(photos), output=str(tmp_path / "out"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"k": 0}, "k must be an integer from 1 to 1280"),
        ({"k": 1281}, "k must be an integer from 1 to 1280"),
        ({"k": True}, "k must be an integer"),
        ({"variance": 0}, r"variance must be a fraction in \(0, 1\]"),
        ({"variance": 1.01}, r"variance must be a fraction in \(0, 1\]"),
        ({"variance": float("nan")}, "variance must be a fraction"),
        ({"k": 3, "variance": 0.5}, "variance 0.5 would be ignored: k = 3 fixes the number"),
    ],
)
def test_reduce_params_say_what_is_wrong(changes, message):
    with pytest.raises(ParameterError, match=message):
        ReduceParams(**{"output": "out", **changes})


def test_choose_k_is_the_smallest_reaching_the_threshold():
    cumulative = [0.5, 0.8, 0.9, 0.95, 1.0]
    assert choose_k(cumulative, 0.5) == 1
    assert choose_k(cumulative, 0.85) == 3
    assert choose_k(cumulative, 0.95) == 4
    assert choose_k(cumulative, 1.0) == 5
    # A sum of ratios a hair under 1.0 still reaches 1.0.
    assert choose_k([0.6, 0.9999999999], 1.0) == 2


def test_check_k_against_the_data():
    check_k(9, n_images=10, n_features=1280)
    check_k(1280, n_images=2000, n_features=1280)
    with pytest.raises(ParameterError, match=r"k=10 is larger .* min\(9, 1280\) = 9 comp"):
        check_k(10, n_images=10, n_features=1280)  # the 10th component has no variance
    with pytest.raises(ParameterError, match="at least 2 featurized images"):
        check_k(None, n_images=1, n_features=1280)


def test_label_is_the_parent_folder():
    assert label_of("s3://bucket/fruits/Apple Braeburn/r_1_100.jpg") == "Apple Braeburn"
    assert label_of("file:/data/Äpfel grün/1.JPG") == "Äpfel grün"


def test_extension_glob_is_case_insensitive(spark, tmp_path):
    """Spark's listing with the glob finds image files whatever their extension's case."""
    for name in ("a.jpg", "b.JPG", "c.Png", "d.jpeg", "e.JPEG", "f.txt", "g.jpg.bak", "hjpg"):
        (tmp_path / name).write_bytes(b"x")
    glob = extension_glob((".jpg", ".jpeg", ".png"))
    listed = spark.read.format("binaryFile").option("pathGlobFilter", glob).load(str(tmp_path))
    found = sorted(row.path.rsplit("/", 1)[1] for row in listed.select("path").collect())
    assert found == ["a.jpg", "b.JPG", "c.Png", "d.jpeg", "e.JPEG"]


def test_uri_spelling_matches_spark_path_column():
    assert normalize_uri("file:///tmp/a%20b/%C3%A9%25x.jpg") == "file:/tmp/a b/é%x.jpg"
    assert normalize_uri("s3://bucket/a%20b/c.jpg") == "s3://bucket/a b/c.jpg"
    assert normalize_uri("hdfs://nn:8020/x/y.png") == "hdfs://nn:8020/x/y.png"
    assert join("s3://b/out/", "/features") == "s3://b/out/features"


def test_scan_settings_pack_files_by_count():
    settings = scan_settings(n_files=10_000, cores=2, tasks_per_core=4)
    assert settings["spark.sql.files.minPartitionNum"] == "8"
    open_cost = int(settings["spark.sql.files.openCostInBytes"])
    max_bytes = int(settings["spark.sql.files.maxPartitionBytes"])
    # Each file costs at least the open cost, so a partition holds about 10000 / 8 files.
    assert 1200 <= max_bytes // open_cost <= 1300
    few = scan_settings(n_files=3, cores=2, tasks_per_core=4)
    assert few["spark.sql.files.minPartitionNum"] == "3"


def test_papermill_locations():
    """papermill knows neither file: URIs nor Hadoop's S3 schemes."""
    from imagepca.storage import papermill_location

    assert papermill_location("file:///tmp/a b/out") == "/tmp/a b/out"
    assert papermill_location("file:/tmp/out") == "/tmp/out"
    assert papermill_location("s3a://bucket/runs/x") == "s3://bucket/runs/x"
    assert papermill_location("s3n://bucket/runs/x") == "s3://bucket/runs/x"
    for unchanged in ("s3://bucket/x", "output/sample", "/abs/out", "hdfs://nn/out"):
        assert papermill_location(unchanged) == unchanged


@pytest.mark.parametrize(
    "master", ["local", "local[2]", "local[*]", "local[2,3]", "local-cluster[2,1,1024]", "yarn",
               "spark://10.0.0.1:7077", "k8s://https://10.0.0.1:6443"],
)  # fmt: skip
def test_spark_masters_are_accepted(master):
    check_master(master)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--master", "bogus"], "^error: --master 'bogus' is not a Spark master: use local"),
        (["--master", "local[two]"], "is not a Spark master"),
        (["--master", "local[0]"], "is not a Spark master"),  # Spark: no threads to run on
        (["--master", " local[2]"], "is not a Spark master"),  # spark-submit would refuse it
        (["--execution-timeout", "0"], "--execution-timeout 0: give a positive number"),
        (["--kernel", "no-such-kernel"], "--kernel no-such-kernel: no such Jupyter kernel"),
        (["--notebooks", "/no/such/folder"], "no 01_extract_features.ipynb there"),
        (["--livy-url", "http://127.0.0.1:1"], "--livy-\\* options need --kernel pysparkkernel"),
        (["--kernel", "pysparkkernel", "--master", "local[2]"], "--master does not apply"),
        (["--livy-startup-timeout", "900"], "--livy-\\* options need --kernel pysparkkernel"),
        (
            ["--kernel", "pysparkkernel", "--livy-startup-timeout", "10"],
            "--livy-startup-timeout 10: give at least 300 seconds",
        ),
        (
            ["--kernel", "pysparkkernel", "--livy-url", "ftp://127.0.0.1:1"],
            "--livy-url ftp://127.0.0.1:1: give an http:// or https:// URL",
        ),
        # Two image files: notebook 02 would refuse k = 3 after notebook 01's whole work.
        (["--k", "3"], "--k 3: .* holds 2 image files"),
        # The notebooks' parameters, named as the command line's options, with its choices.
        (["--k", "0"], "^error: --k must be .* got 0; without it, k is chosen by the variance"),
        (["--batch-size", "0"], "^error: --batch-size must be an integer from 1 to 4096, got 0$"),
        (["--max-image-pixels", "10"], "^error: --max-image-pixels must be an integer >= 4096"),
    ],
)
def test_run_options_spark_or_jupyter_would_reject_stop_before_any_write(
    tmp_path, capsys, options, message
):
    """Refused as parameters (exit 2, the option named) before the run's log or output
    exists, not as a Java gateway's or a kernel's error once it had begun."""
    (tmp_path / "images" / "apple").mkdir(parents=True)
    for name in ("1.jpg", "2.JPG", "notes.txt"):
        (tmp_path / "images" / "apple" / name).write_bytes(b"")
    output = tmp_path / "out"
    status = main(["run", "--input", str(tmp_path / "images"), "--output", str(output), *options])
    assert status == 2
    assert re.search(message, capsys.readouterr().err.splitlines()[-1])
    assert not output.exists()


@pytest.mark.parametrize(
    "location", ["/data/Photos 10:30 [export]", "file:/data/in{1}:x", "file:///d/a:b/c*"]
)
def test_a_local_path_hadoop_cannot_glob_is_refused_before_any_work(location):
    """A ':' beside [ ] { } * ? fails in Hadoop's globbing (a raw URISyntaxException, after
    featurization for an output); each alone is read as written."""
    for name in ("input", "output"):
        other = {"input": "/data/in", "output": "/data/out"}
        with pytest.raises(ParameterError, match=f"{name} .*Hadoop cannot read a local path"):
            ExtractParams(**{**other, name: location})
    readable = ("/data/Photos 10:30", "/data/in [1]", "s3://b/Photos 10:30 [x]", "hdfs:/d/in[1]")
    for fine in (*readable, "file:/d/[1]"):
        assert ExtractParams(input=fine, output="/data/out").input == fine


def test_classifier_options_with_skip_classify_are_refused(tmp_path, capsys):
    """They would be ignored without a word: the run stops before any work."""
    argv = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert refused([*argv, "--skip-classify", "--seed", "7", "--k-values", "2,5"], capsys) == (
        "error: --seed, --k-values set notebook 03, which --skip-classify leaves out: drop one "
        "or the other"
    )
    assert not (tmp_path / "out").exists()


def test_run_options_reach_the_parameters_with_their_defaults():
    """`imagepca run`'s tuning options default to the parameters' own defaults, and a 0
    given on the command line is a value, not an option left out."""
    from imagepca.cli import build_parser
    from imagepca.run_options import tuning_values

    base = ["run", "--input", "in", "--output", "out"]
    args = build_parser().parse_args(base)
    assert ExtractParams(input="in", output="out", **tuning_values(args, ExtractParams)) == (
        ExtractParams(input="in", output="out")
    )
    args = build_parser().parse_args([*base, "--max-rejected-fraction", "0", "--fast-decode"])
    extract = tuning_values(args, ExtractParams)
    assert extract["max_rejected_fraction"] == 0.0 and extract["fast_decode"] is True
    assert "projection_points" not in extract
    assert tuning_values(args, ReduceParams) == {"projection_points": 5000}
    # Notebook 03's parameters too: a k_values list from "2,10".
    args = build_parser().parse_args([*base, "--k-values", "10,2", "--seed", "0"])
    classify = ClassifyParams(output="out", **tuning_values(args, ClassifyParams))
    assert classify.k_values == (2, 10) and classify.seed == 0
    assert classify == ClassifyParams(output="out", k_values=[2, 10], seed=0)


def test_a_relative_output_not_found_says_where_it_was_looked_for(spark, tmp_path):
    """nbconvert and VS Code start a notebook's kernel, and its JVM, in notebooks/: the
    defaults (output/sample) are then looked for there, which the message must say; Hadoop
    resolves a relative path in the JVM's working folder (EMR: the HDFS home)."""
    from imagepca.pipeline import reduce_features
    from imagepca.storage import Storage

    jvm_folder = spark.sparkContext._jvm.System.getProperty("user.dir")
    with pytest.raises(FileNotFoundError) as raised:
        reduce_features(spark, ReduceParams(output="no-run/here"))
    assert str(raised.value).startswith(
        f"no features under no-run/here/features (no-run/here is file:{jvm_folder}/no-run/here "
        "for Spark): run notebook 01"
    )
    storage = Storage(spark)
    assert storage.relative_note(str(tmp_path)) == storage.relative_note("s3://b/x") == ""
    assert storage.relative_note(f"file:{tmp_path}") == ""
