"""The two stages of a run, top to bottom: extract features, then reduce them.

Notebook 01 calls :func:`extract_features`, notebook 02 :func:`reduce_features`; the
CLI runs both notebooks. Each stage reads and writes only the output location, so either
can be re-run alone, and each publishes its datasets whole (see :mod:`imagepca.storage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial

import pandas as pd
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from . import progress
from .config import FEATURE_DIM, ExtractParams, ReduceParams
from .console import increment_line, rate_text
from .driver_projection import driver_writer
from .executor_reads import read_options
from .features import features_udf, load_model_payload, moments_accumulator, warm_python_workers
from .images import NOTHING_SKIPPED, classifiable, content_batch_rows
from .increments import (
    LAYOUT,
    ROW_KEY,
    STORED_COLUMNS,
    batch_folder,
    batches,
    commit_batch,
    new_batch_id,
    plan_increment,
    stage_batch,
    why_not_incremental,
    why_not_reused,
)
from .inputs import folder_rows, list_inputs, scan_settings
from .listing import ImageListing, fingerprint, fingerprint_digest
from .moments import Moments
from .reduction import (
    FLOAT64_BATCH_ROWS,
    PCAFit,
    ProjectionSample,
    check_k,
    decompose_ahead,
    fit_pca,
    save_models,
    wait_for_models,
)
from .rejects import Outcomes, checked, outcome_metrics, rejected_files, reported_per_task
from .run_record import library_versions, timed
from .session import ARROW_BATCH_KEY, default_parallelism, run_concurrently, spark_settings
from .storage import (
    CLASSIFY_ARTIFACTS,
    EXTRACT_FIGURES,
    EXTRACT_NOTEBOOK,
    EXTRACTION_FILE,
    FAILED_EXTRACT_NOTEBOOK,
    REDUCE_FIGURES,
    REDUCE_NOTEBOOK,
    STAGING_DIR,
    STOPPED_LOG_FILE,
    Storage,
    join,
    literal,
    vector_write_settings,
)
from .weights import file_sha256, resolve_weights

MOMENTS_FILE = "_moments.npz"  # the PCA's statistics of features/, from featurization
KEPT_FEATURES = (
    "features/ is kept: run notebook 02 again with a smaller k (`imagepca run`: the same "
    "command with --reuse-features and a smaller --k featurizes nothing again)"
)
# Featurization accumulates the PCA's statistics (one d x d update per task, 13 MB at
# d = 1280, sent to the driver) when it runs at most this many tasks; a larger cluster's
# run leaves them to notebook 02's distributed pass, which merges them on the executors.
FUSED_MOMENTS_MAX_TASKS = 32


# -- stage 1: images -> features ---------------------------------------------------------


@dataclass
class Extraction:
    """What feature extraction produced; ``metadata`` is stored beside the features."""

    listing: ImageListing
    metadata: dict
    reused: bool = False

    @property
    def n_images(self) -> int:
        return self.metadata["n_images"]

    @property
    def n_rejected(self) -> int:
        return self.metadata["n_rejected"]

    def summary(self) -> str:
        m = self.metadata
        rejected = ", ".join(f"{n} {kind}" for kind, n in m["rejected_by_kind"].items()) or "none"
        how = (
            f"reused, featurized {m['reused_features_created_at']}"
            if self.reused
            else f"{m['timings_s']['featurize_s']:.1f} s, " + rate_text(m["images_per_s"])
        )
        increment = increment_line(m.get("incremental"))
        if increment:
            how = f"{increment}; {how}"
        if m.get("reuse_refused"):
            how = f"features not reused, {m['reuse_refused']}; {how}"
        return (
            f"{m['n_files_found']} image files in {m['n_classes']} classes: "
            f"{m['n_images']} in features/, {m['n_rejected']} rejected ({rejected}); {how}"
        )


def start_extraction(spark: SparkSession, params: ExtractParams) -> ImageListing:
    """Check the run's inputs, then begin replacing its output; the input's listing.

    The weights and the input are resolved first: a mistyped path leaves an earlier run's
    output as it was, complete. Then its completion markers go, and the Python workers
    start in the background (:func:`imagepca.features.warm_python_workers`).
    """
    resolve_weights(params.weights, spark)
    listing = list_inputs(spark, params)
    storage = Storage(spark)
    storage.begin_run(params.output)
    if not (params.reuse_features or params.incremental):  # features/ is to be replaced
        storage.mark_replacing(params.output, params.source)
    removed = storage.remove_artifacts(params.output, EXTRACT_FIGURES)  # drawn again next
    if not params.reuse_features:
        warm_python_workers(spark)  # while the notebook shows the sample images
    return replace(listing, removed_figures=tuple(removed))


def _listing_fields(params: ExtractParams, listing: ImageListing) -> dict:
    """What ``_extraction.json`` says of this run's listing (a reused run's own too)."""
    return {
        "input": params.source,
        "input_kind": listing.kind,
        "n_files_found": listing.n_files,
        "n_duplicate_uris": listing.n_duplicates,
        **listing.skipped(),
    }


def extract_features(
    spark: SparkSession, params: ExtractParams, listing: ImageListing | None = None
) -> Extraction:
    """Featurize the run's images into ``OUTPUT/features`` and ``OUTPUT/rejected``.

    Every image file found ends up in exactly one of the two datasets. ``listing`` is
    :func:`start_extraction`'s, which has checked the inputs and begun the run; without
    one, this starts the run itself (a missing weights file fails before any Spark job).
    """
    timings: dict[str, float] = {}
    storage = Storage(spark)
    if listing is None:
        listing = start_extraction(spark, params)
    else:  # the cell run again, say, after notebook 02 had completed the output
        storage.begin_run(params.output)
    timings["list_s"] = listing.seconds
    # An earlier run's figures not drawn again (a cell skipped by hand), its executed copy.
    removed = storage.missing(params.output, listing.removed_figures)
    removed += storage.remove_earlier_copy(params.output, EXTRACT_NOTEBOOK)
    with timed(timings, "weights_s"):
        weights_file = resolve_weights(params.weights, spark)  # the copy it resolved
        weights_sha = file_sha256(weights_file)
    features_uri = join(params.output, "features")
    identity = {**params.as_dict(), "weights_sha256": weights_sha}
    stored = stored_extraction(storage, params.output)
    not_reused = None
    if params.reuse_features:
        if stored:
            identity["listing_fingerprint"] = fingerprint(listing.files, listing.n_files)
        not_reused = why_not_reused(stored, identity)
        if not_reused is None:
            listing.release()
            # The same features, described for this run (and when they were featurized).
            metadata = {
                key: value
                for key, value in stored.items()
                if key not in ("incremental", "reuse_refused")
            }
            metadata.update(
                removed_from_earlier_run=removed,
                **_listing_fields(params, listing),
                params=identity,
                timings_s=timings,
                images_per_s=None,
                reused_features_created_at=stored.get("reused_features_created_at")
                or stored["created_at"],
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            extraction = checked(Extraction(listing, metadata, reused=True), params)
            storage.clear_replacing(params.output)  # an interrupted run's
            storage.write_json(join(features_uri, EXTRACTION_FILE), metadata)
            return extraction

    increment, full_run_reason = None, None
    if params.incremental:
        full_run_reason = why_not_incremental(stored, identity)
        if full_run_reason is None:
            with timed(timings, "plan_s"):
                rejected_uri = join(params.output, "rejected")
                increment = plan_increment(spark, features_uri, listing.files, rejected_uri, stored)
            not_reused = None  # what changed is featurized, not everything "again"

    if increment is None:  # every image featurized again: features/ is being replaced
        storage.mark_replacing(params.output, params.source)
    with timed(timings, "model_s"):
        payload = load_model_payload(params, weights_file, storage)
    # Each task holds a batch's bytes at once: as many files as the largest allow.
    settings = {ARROW_BATCH_KEY: str(content_batch_rows(listing, params.max_records_per_batch))}
    cores = default_parallelism(spark)
    n_tasks = cores * params.tasks_per_core
    reported = reported_per_task(n_tasks)  # rejected rows, per task

    def read_on_executors(files: DataFrame, n_files: int, **udf_options) -> DataFrame:
        """Listing rows with ``out``: each file read and featurized on an executor."""
        udf = features_udf(spark, params, payload, read=read_options(spark), **udf_options)
        tasks = max(1, min(n_tasks, n_files))
        return files.repartition(tasks).select(*ROW_KEY, udf("path").alias("out"))

    # An increment adds to features/ and the fit needs all of it: no statistics then.
    accumulator = (
        moments_accumulator(spark)
        if increment is None and n_tasks <= FUSED_MOMENTS_MAX_TASKS
        else None
    )
    if increment is None and listing.relation is not None:
        # A folder's bytes through Spark's own reader, split into even tasks by count.
        settings.update(scan_settings(listing.n_files, cores, params.tasks_per_core))
        udf = features_udf(spark, params, payload, moments=accumulator, reported_rejects=reported)
        rows = folder_rows(listing.relation, udf("content").alias("out"))
        n_todo = listing.n_files
    else:
        # A list of URIs (a manifest, or the new files of an increment): read on executors.
        todo = increment.todo if increment else listing.files
        n_todo = increment.n_todo if increment else listing.n_files
        rows = read_on_executors(todo, n_todo, moments=accumulator, reported_rejects=reported)
    # The plan is made here and the files are split when it first runs: the scan settings
    # must be in force for both. The job that featurizes writes the featurized rows and
    # observes what the accounting needs (the rejected rows, the scan's fingerprint).
    observation = Observation()
    with spark_settings(spark, settings):
        scored = rows.select(*ROW_KEY, "out.features", "out.reason", "out.reported").observe(
            observation, *outcome_metrics()
        )
        features = scored.filter(F.col("reason").isNull()).select(*STORED_COLUMNS)
    batch_id = new_batch_id()
    staged = join(params.output, STAGING_DIR, f"features-{batch_id}")

    def write_features(uri: str) -> None:
        features.write.parquet(batch_folder(uri, batch_id))

    try:
        with (
            spark_settings(spark, {**settings, **vector_write_settings(features)}),
            timed(timings, "featurize_s"),
            progress.track(spark, "featurize", total=n_todo),
        ):
            if increment is None:
                storage.publish(params.output, "features", write_features)
            else:
                stage_batch(features, increment, staged)
        outcomes = Outcomes.observed(observation.get)
        # Every task has added its partition's part (each once, however often it ran).
        statistics = accumulator.value.total() if accumulator is not None else None
        n_new = outcomes.n_featurized
        with timed(timings, "write_s"):
            if statistics is not None and statistics.n == n_new:
                decompose_ahead(statistics)  # for notebook 02, beside the writes
            # Rejected files the job did not report are read again, in batches as bounded;
            # rows found on the executors are cached until written.
            with spark_settings(spark, settings):
                rejected, by_kind = rejected_files(
                    spark, storage, listing, outcomes, staged if increment else features_uri,
                    increment, read_on_executors,
                )  # fmt: skip
            # Independent jobs, side by side (see run_concurrently). An increment's rejected/
            # is swapped in after its commit: stopped before, the output keeps both as they
            # were; stopped between, features/ has no description (the next run is full).
            write = storage.stage if increment else storage.publish
            jobs = [partial(write, params.output, "rejected", rejected.write.parquet)]
            if increment is not None:
                jobs.append(partial(fingerprint, listing.files, listing.n_files))
            try:
                rejected_written, *increment_fingerprint = run_concurrently(*jobs)
            finally:
                rejected.unpersist()  # cached when rows were found on the executors
            if increment is None:
                # The featurization job summed the files it scanned.
                listing_fingerprint = fingerprint_digest(listing.n_files, [outcomes.sums])
            else:
                listing_fingerprint = increment_fingerprint[0]
                descriptions = [
                    join(features_uri, name) for name in (EXTRACTION_FILE, MOMENTS_FILE)
                ]
                batch_id = commit_batch(
                    storage, features_uri, staged, increment, batch_id, n_new, descriptions
                )
                storage.swap_in(params.output, "rejected", rejected_written)  # the staged
            moments_uri = join(features_uri, MOMENTS_FILE)
            if increment is not None and batch_id is None:  # features/ and its statistics kept
                moments_file = stored.get("moments_file")
            elif statistics is not None and statistics.n == n_new:
                storage.write_bytes(moments_uri, statistics.to_npz())
                moments_file = MOMENTS_FILE
            else:  # none, or a task counted twice: notebook 02 makes its own pass
                storage.delete(moments_uri)
                moments_file = None
            metadata = {
                # --reuse-features that featurized again all the same: why.
                "reuse_refused": not_reused,
                "removed_from_earlier_run": removed,
                **_listing_fields(params, listing),
                "layout": LAYOUT,
                "rejected_by_kind": by_kind,
                "n_rejected": sum(by_kind.values()),
                "params": {**identity, "listing_fingerprint": listing_fingerprint},
                "moments_file": moments_file,
                "versions": library_versions(),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            # This run's featurized rows are the whole of features/, unless it is an increment.
            labels = None if increment else outcomes.featurized_per_label(listing.labels())
            if labels is None:
                labels = _label_counts(read_features(spark, params.output))
            metadata.update(
                n_images=sum(labels.values()),
                n_classes=len(labels),
                images_per_label=labels,
                batches=batches(storage, features_uri),
            )
            if params.incremental:
                metadata["incremental"] = (
                    increment.described(n_new, batch_id)
                    if increment
                    else {"featurized": n_new, "full_run_because": full_run_reason}
                )
    finally:
        listing.release()
        if increment:
            increment.release()
    metadata["timings_s"] = timings
    # None when nothing was featurized (an increment with nothing new read rejected files).
    metadata["images_per_s"] = round(n_todo / timings["featurize_s"], 2) if n_new else None
    # Written last: features/ never has a description of another run's rows.
    storage.clear_replacing(params.output)  # an interrupted full run's, if any
    storage.write_json(join(features_uri, EXTRACTION_FILE), metadata)
    storage.remove_empty_staging(params.output)  # none left if checked() below stops the run
    return checked(Extraction(listing, metadata), params)


def _label_counts(features: DataFrame) -> dict[str, int]:
    rows = features.groupBy("label").count().collect()
    return dict(sorted((row["label"], row["count"]) for row in rows))


def stored_extraction(storage: Storage, output: str) -> dict | None:
    """``features/_extraction.json`` of ``output``: None until a notebook 01 finished there."""
    return storage.read_json_if_exists(join(output, "features", EXTRACTION_FILE))


def _stored_moments(storage: Storage, output: str, extraction: dict) -> Moments | None:
    """The statistics featurization kept beside ``features/``, when they describe all of it."""
    name = extraction.get("moments_file")
    if not name:
        return None
    moments = Moments.from_npz(storage.read_bytes(join(output, "features", name)))
    return moments if moments.n == extraction["n_images"] else None


def read_features(spark: SparkSession, output: str) -> DataFrame:
    """The ``features/`` dataset of a run (``path``, ``label``, ``features``), every batch."""
    return spark.read.parquet(literal(join(output, "features"))).select("path", "label", "features")


# -- stage 2: features -> scaler + PCA ---------------------------------------------------


@dataclass
class Reduction:
    fit: PCAFit
    params: ReduceParams
    projection: pd.DataFrame
    metrics: dict = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        return (
            f"{m['n_images']} images, {m['n_classes']} classes: k = {m['k']} components "
            f"keep {m['variance_reached']:.1%} of the variance"
        )


def reduce_features(spark: SparkSession, params: ReduceParams) -> Reduction:
    """Fit scaler + PCA on ``OUTPUT/features``; write ``pca_model/``, ``pca_components/``
    and ``reduced/``.

    Artifacts of notebook 03 left by an earlier run are removed first: they were made from
    another PCA, and a completed output holds only what its own run produced.
    """
    timings: dict[str, float] = {}
    storage = Storage(spark)
    storage.refuse_half_replaced(params.output)
    extraction = stored_extraction(storage, params.output)
    if extraction is None:
        raise FileNotFoundError(
            f"no features under {join(params.output, 'features')}"
            f"{storage.relative_note(params.output)}: run notebook 01_extract_features (or "
            "`imagepca run`) with this output first"
        )
    # An object store's input or a manifest has no image count before featurization.
    check_k(params.k, extraction["n_images"], FEATURE_DIM, then=KEPT_FEATURES)
    storage.begin_run(params.output)
    # An earlier notebook 03's (another PCA's), a failed attempt's notebook 01 and log (kept
    # while the output stayed complete), an earlier run's figures of this notebook (drawn
    # again next), and, run by hand, an earlier run's log and copies of notebooks 01-02.
    removed = [
        *extraction.get("removed_from_earlier_run", []),
        *storage.remove_artifacts(
            params.output,
            (FAILED_EXTRACT_NOTEBOOK, STOPPED_LOG_FILE, *REDUCE_FIGURES, *CLASSIFY_ARTIFACTS),
        ),
        *storage.remove_earlier_copy(params.output, REDUCE_NOTEBOOK, log=True),
    ]
    features = read_features(spark, params.output)
    with timed(timings, "fit_s"):
        moments = _stored_moments(storage, params.output, extraction)
        fit = fit_pca(features, k=params.k, variance=params.variance, moments=moments)
    # The projection plot's points, kept as reduced/ is written (a bounded sample).
    sample = ProjectionSample(spark, params.projection_points, fit.n_images)
    reduced = fit.transform(features, sample)
    layout = vector_write_settings(reduced)  # the models' vectors are written alike
    save_models(spark, storage, params.output, fit, layout)  # finish_run waits for them
    with (
        timed(timings, "reduce_write_s"),
        # The projection holds a batch as float64 in the worker.
        spark_settings(spark, {ARROW_BATCH_KEY: str(FLOAT64_BATCH_ROWS), **layout}),
    ):
        # An output on the driver's disk is the driver's to write (imagepca.driver_projection).
        write = driver_writer(storage, features, params.output, fit.projector(sample))
        storage.publish(params.output, "reduced", write or reduced.write.parquet)
    with timed(timings, "projection_s"):
        points = sample.points()
    cumulative = fit.cumulative_variance
    labels = extraction["images_per_label"]
    metrics = {
        "n_files_found": extraction["n_files_found"],
        **{key: extraction.get(key, none) for key, none in NOTHING_SKIPPED.items()},
        "n_images": extraction["n_images"],
        "n_rejected": extraction["n_rejected"],
        "rejected_by_kind": extraction["rejected_by_kind"],
        "n_classes": extraction["n_classes"],
        "images_per_label": labels,
        "k": fit.k,
        "k_mode": "fixed" if params.k else "variance",
        "variance_threshold": None if params.k else params.variance,  # unused with a fixed k
        "variance_reached": fit.variance_reached,
        "explained_variance": fit.explained_variance,
        "cumulative_variance": cumulative,
        "timings_s": {**extraction.get("timings_s", {}), **timings},
        "images_per_s": extraction.get("images_per_s"),
        # When notebook 01 reused features/ (--reuse-features): when they were featurized.
        "reused_features_created_at": extraction.get("reused_features_created_at"),
        "incremental": extraction.get("incremental"),
        "reuse_refused": extraction.get("reuse_refused"),
        "params": {"extract": extraction["params"], "reduce": params.as_dict()},
        "versions": library_versions(),
        "removed_from_earlier_run": removed,
        # Where the fit's count, mean and covariance came from.
        "pca_statistics": "featurization" if moments is not None else "pass over features/",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    unclassifiable = classifiable(labels)
    if unclassifiable:
        metrics["classification"] = {"skipped": unclassifiable}
    return Reduction(fit=fit, params=params, projection=points, metrics=metrics)


def finish_run(spark: SparkSession, output: str, metrics: dict) -> None:
    """Wait for notebook 02's models (:func:`imagepca.reduction.save_models`; a failed save
    raises here), then write ``metrics.json`` and ``_SUCCESS`` (notebook 03's to write with
    ``then_classify``): from there on the output is complete."""
    waited = wait_for_models(output)
    if waited is not None:
        metrics.setdefault("timings_s", {})["models_wait_s"] = waited
    storage, removed = Storage(spark), metrics.get("removed_from_earlier_run", [])
    if storage.classified_since(output, metrics):  # the cell run again after notebook 03
        print("notebook 03 has classified this reduction since: the output is kept as it is")
        return
    metrics["removed_from_earlier_run"] = storage.missing(output, removed)  # not drawn again
    # With notebook 03 next in this run (then_classify), _SUCCESS is its to write.
    then_classify = metrics["params"]["reduce"].get("then_classify", False)
    storage.finish_run(output, metrics, complete=not then_classify or "classification" in metrics)
