"""The one-pass scaler + PCA statistics: exact, stable for large means, distributed."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
from pyspark.ml import PipelineModel
from pyspark.ml.feature import PCA, PCAModel, StandardScaler
from pyspark.ml.functions import array_to_vector, vector_to_array

from imagepca import reduction
from imagepca.images import InputError
from imagepca.moments import MomentsBuilder, PartitionMoments, merge_partials, merged_rows
from imagepca.reduction import (
    Moments,
    decompose,
    decompose_ahead,
    feature_moments,
    fit_pca,
    read_pca,
    reduce_with,
)


def test_merged_moments_are_exact_and_stable_for_large_means():
    """Chan's pairwise merge of chunk statistics against numpy's two-pass covariance.

    A mean of 1e8 next to a spread of 1 is where the one-pass textbook formula
    (sum x x^T - n mean mean^T) loses every significant digit in float64.
    """
    rng = np.random.default_rng(0)
    rows = 1e8 + rng.normal(size=(1000, 5)) @ rng.normal(size=(5, 5))
    merged = Moments(0, np.zeros(0), np.zeros((0, 0)))
    for chunk in np.array_split(rows, 7):
        centred = chunk - chunk.mean(axis=0)
        merged = merged.merge(Moments(len(chunk), chunk.mean(axis=0), centred.T @ centred))
    assert merged.n == 1000
    np.testing.assert_allclose(merged.mean, rows.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged.covariance, np.cov(rows, rowvar=False), rtol=1e-7)
    naive = (rows.T @ rows - 1000 * np.outer(rows.mean(0), rows.mean(0))) / 999
    assert not np.allclose(naive, np.cov(rows, rowvar=False), rtol=1e-3)  # why the merge


def test_batched_moments_are_exact_and_stable_for_large_means():
    """A task's batches, summed about the first batch's mean, against numpy; then tasks
    merged pairwise, as featurization's statistics are."""
    rng = np.random.default_rng(2)
    rows = 1e8 + rng.normal(size=(1000, 5)) @ rng.normal(size=(5, 5))
    merged = Moments.empty()
    for task in np.array_split(rows, 3):
        builder = MomentsBuilder()
        builder.add([])  # a batch of rejected images only
        for batch in np.array_split(task, 4):
            builder.add(list(batch))
        merged = merged.merge(builder.moments())
    assert merged.n == 1000
    np.testing.assert_allclose(merged.mean, rows.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged.covariance, np.cov(rows, rowvar=False), rtol=1e-7)
    assert MomentsBuilder().moments().n == 0


def test_partition_moments_are_the_same_bits_in_any_order_and_count_a_partition_once():
    """Featurization's tasks finish in any order, and a task may run again: the statistics
    they add up to depend on neither (they decide the PCA, and through it the classifier)."""
    rng = np.random.default_rng(3)
    rows = 50 + rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6))
    parts = []
    for chunk in np.array_split(rows, 11):
        centred = chunk - chunk.mean(axis=0)
        parts.append(Moments(len(chunk), chunk.mean(axis=0), centred.T @ centred))
    totals = []
    for seed in range(6):
        order = np.random.default_rng(seed).permutation(11)
        merged = PartitionMoments()
        for partition in [*order, order[0], order[5]]:  # two tasks ran twice
            merged.add(PartitionMoments.of(int(partition), parts[partition]))
        assert len(merged.nodes) == 3  # 11 = 8 + 2 + 1: halves merged once both were in
        totals.append(merged.total())
    for total in totals:
        assert total.n == 2000
        assert np.array_equal(total.mean, totals[0].mean)
        assert np.array_equal(total.m2, totals[0].m2)
    np.testing.assert_allclose(totals[0].mean, rows.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(totals[0].covariance, np.cov(rows, rowvar=False), rtol=1e-9)
    # Merged as they arrive, the same parts give other bits in other orders.
    arrival = [
        functools.reduce(
            Moments.merge, [parts[i] for i in np.random.default_rng(s).permutation(11)]
        )
        for s in range(6)
    ]
    assert any(not np.array_equal(a.m2, arrival[0].m2) for a in arrival)
    with pytest.raises(ValueError, match="single partitions"):
        PartitionMoments().add(merged)


def test_a_merge_level_merges_runs_of_partitions_in_their_order():
    """notebook 02's pass merges its partitions' statistics on the executors, in the order
    the shuffle delivers them: each run of `span` partitions is merged in the partitions'
    order all the same, to the same bits."""
    import pyarrow as pa

    rng = np.random.default_rng(4)
    rows = []
    for part in range(11):
        chunk = 1e3 + rng.normal(size=(30 + part, 4))
        centred = chunk - chunk.mean(axis=0)
        moments = Moments(len(chunk), chunk.mean(axis=0), centred.T @ centred)
        rows.append({"part": part, **moments.to_bytes()})
    outputs = []
    for seed in range(5):
        shuffled = [rows[i] for i in np.random.default_rng(seed).permutation(11)]
        batches = [
            pa.RecordBatch.from_pylist(shuffled[:3]),
            pa.RecordBatch.from_pylist(shuffled[3:]),
        ]
        merged = [row for batch in merge_partials(4)(iter(batches)) for row in batch.to_pylist()]
        assert [row["part"] for row in merged] == [0, 4, 8]
        outputs.append(merged)
    assert all(output == outputs[0] for output in outputs)  # the same bytes
    expected = [merged_rows(rows[start : start + 4]) for start in (0, 4, 8)]
    for row, moments in zip(outputs[0], expected, strict=True):
        assert row["n"] == moments.n and row["m2"] == moments.m2.tobytes()


@pytest.fixture(scope="module")
def synthetic(spark):
    rng = np.random.default_rng(1)
    values = (rng.normal(size=(600, 8)) @ rng.normal(size=(8, 40)) + 300).astype(np.float32)
    values[:, 7] = 3.0  # a constant feature: Spark's scaler maps it to 0
    frame = pd.DataFrame(
        {
            "path": [f"/x/{i % 3}/{i}.jpg" for i in range(600)],
            "label": [str(i % 3) for i in range(600)],
            "features": list(values),
        }
    )
    return spark.createDataFrame(frame).repartition(5), values.astype(np.float64)


def test_distributed_moments_equal_numpy(synthetic):
    df, values = synthetic
    for frame in (df, df.repartition(40)):  # one merge level, then two
        moments = feature_moments(frame)
        assert moments.n == 600
        np.testing.assert_allclose(moments.mean, values.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(moments.covariance, np.cov(values, rowvar=False), atol=1e-9)


def test_the_fit_takes_the_decomposition_started_for_its_statistics(synthetic, monkeypatch):
    """Notebook 01 starts the eigendecomposition once featurization has summed the
    statistics; notebook 02's fit in the same kernel, reading their .npz copy, takes it
    instead of decomposing again. Other statistics leave it alone."""
    df, values = synthetic
    moments = feature_moments(df)
    copy = Moments.from_npz(moments.to_npz())  # what notebook 02 reads back
    other = Moments(moments.n, moments.mean + 1.0, moments.m2)
    expected = fit_pca(df, k=3, variance=0.9, moments=copy)

    decompositions = []
    monkeypatch.setattr(reduction, "decompose", lambda m: decompositions.append(m) or decompose(m))
    decompose_ahead(other)
    next(iter(reduction._decompositions.values())).result()
    fit_pca(df, k=3, variance=0.9, moments=copy)
    assert [m.n for m in decompositions] == [moments.n, moments.n]  # ahead, then its own
    assert reduction._decompositions, "another run's decomposition was taken"

    decompositions.clear()
    decompose_ahead(moments)
    fit = fit_pca(df, k=3, variance=0.9, moments=copy)
    assert decompositions == [moments] and not reduction._decompositions
    np.testing.assert_array_equal(fit.chosen_components, expected.chosen_components)
    np.testing.assert_array_equal(fit.std, expected.std)
    assert fit.explained_variance == expected.explained_variance


def test_fit_equals_sparks_own_scaler_and_pca(spark, synthetic, tmp_path):
    """The model built from the statistics is Spark's StandardScaler + PCA, saved and
    reloaded as an ordinary PipelineModel, projecting onto k components only."""
    df, _ = synthetic
    fit = fit_pca(df, k=6, variance=0.95)
    assert fit.k == 6 and len(fit.explained_variance) == 40
    assert fit.components.pc.numCols == 40 and fit.model.stages[1].pc.numCols == 6
    # The JVM's matrices hold the driver's components exactly (sent through a file).
    np.testing.assert_array_equal(fit.model.stages[1].pc.toArray(), fit.chosen_components)
    np.testing.assert_array_equal(fit.components.pc.toArray()[:, :6], fit.chosen_components)
    fit.model.save(str(tmp_path / "model"))
    ours = reduce_with(PipelineModel.load(str(tmp_path / "model")), df).toPandas()

    vectors = df.withColumn("v", array_to_vector("features"))
    scaler = StandardScaler(inputCol="v", outputCol="s", withMean=True, withStd=True).fit(vectors)
    spark_pca = PCA(inputCol="s", outputCol="p", k=6).fit(scaler.transform(vectors))
    np.testing.assert_allclose(scaler.mean.toArray(), fit.model.stages[0].mean.toArray())
    np.testing.assert_allclose(scaler.std.toArray(), fit.model.stages[0].std.toArray(), rtol=1e-9)
    np.testing.assert_allclose(
        spark_pca.explainedVariance.toArray(), fit.explained_variance[:6], atol=1e-9
    )
    theirs = (
        spark_pca.transform(scaler.transform(vectors))
        .select("path", vector_to_array("p").alias("pca"))
        .toPandas()
    )
    a = np.stack(ours.sort_values("path")["pca"].to_numpy())
    b = np.stack(theirs.sort_values("path")["pca"].to_numpy())
    # Components are defined up to their sign.
    np.testing.assert_allclose(np.abs(a), np.abs(b), atol=1e-3)


def test_read_pca_gives_what_sparks_loaders_give(spark, synthetic, tmp_path):
    """Notebook 03 reads the saved scaler + PCA without Spark ML's loaders: same arrays."""
    df, values = synthetic
    fit = fit_pca(df, k=6, variance=0.95)
    fit.model.save(str(tmp_path / "pca_model"))
    fit.components.save(str(tmp_path / "pca_components"))
    stored = read_pca(spark, str(tmp_path))
    scaler, pca = PipelineModel.load(str(tmp_path / "pca_model")).stages
    components = PCAModel.load(str(tmp_path / "pca_components"))
    assert stored.k == pca.getK() == 6
    np.testing.assert_array_equal(stored.mean, scaler.mean.toArray())
    np.testing.assert_array_equal(stored.std, scaler.std.toArray())
    np.testing.assert_array_equal(stored.components, components.pc.toArray())
    np.testing.assert_array_equal(stored.explained_variance, components.explainedVariance.toArray())
    assert stored.components.shape == (40, 40)
    # Its scores are the pipeline's projection (float64 here, float32 in reduced/).
    rows = reduce_with(fit.model, df).toPandas()
    order = rows["path"].str.extract(r"/(\d+)\.jpg$")[0].astype(int).argsort().to_numpy()
    projected = np.stack(rows["pca"].to_numpy()[order])  # in the order of ``values``
    np.testing.assert_allclose(stored.scores(values, 6), projected, rtol=1e-4, atol=1e-3)
    assert stored.scores(values, None)[:, 7].max() == 0  # the constant feature scales to 0


def test_read_pca_rejects_another_pipeline(spark, synthetic, tmp_path):
    df, _ = synthetic
    fit = fit_pca(df, k=3, variance=0.95)
    PipelineModel(stages=fit.model.stages[:1]).save(str(tmp_path / "pca_model"))
    fit.components.save(str(tmp_path / "pca_components"))
    with pytest.raises(ValueError, match="not a pca_model of this project"):
        read_pca(spark, str(tmp_path))


def test_images_with_identical_features_are_refused_not_fitted_to_nan(spark):
    """Copies of one image: every explained-variance ratio was 0 / 0, metrics.json held
    NaN (not JSON) and the run completed with k = n."""
    same = [float(value) for value in range(8)]
    df = spark.createDataFrame(
        [(f"{i}.jpg", same) for i in range(6)], "path string, features array<float>"
    )
    with pytest.raises(InputError, match="the 6 featurized images all have the same features"):
        fit_pca(df, k=None, variance=0.95)
    differing = spark.createDataFrame(
        [(f"{i}.jpg", [*same[:-1], float(i % 2)]) for i in range(6)],
        "path string, features array<float>",
    )  # one feature that varies: one component with all the variance
    assert fit_pca(differing, k=None, variance=0.95).explained_variance[0] == pytest.approx(1.0)
