"""Count, mean and centred Gram matrix of feature vectors, and their projection, on Arrow
batches.

What the scaler + PCA fit needs, in one pass: each Python worker turns its Arrow batches into
float64 matrices and accumulates them with one matrix product per batch (level-3 BLAS);
partial results merge with Chan et al.'s pairwise update, exact and stable for features
whose mean is large next to their spread. The fitted scaler + PCA then projects the same
batches with one matrix product each (:func:`projector`), where Spark's ``PCAModel`` would
run a JVM matrix-vector product per row. This module imports only numpy and pyarrow: Spark
workers load it (by reference, from the functions given to ``mapInArrow``) in milliseconds.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

# part: the first partition a row covers (see merge_partials).
MOMENTS_SCHEMA = "part long, n long, mean binary, m2 binary"
_PART = operator.itemgetter("part")
# What projector's sample holds of each row it keeps (pc2 null when k = 1).
SAMPLE_SCHEMA = pa.schema(
    [("key", pa.float64()), ("path", pa.string()), ("label", pa.string()),
     ("pc1", pa.float32()), ("pc2", pa.float32())]
)  # fmt: skip


@dataclass(frozen=True)
class Moments:
    """Count, mean and centred sum of squares ``M2 = sum (x - mean)(x - mean)^T``."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls) -> Moments:
        return cls(0, np.zeros(0), np.zeros((0, 0)))

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s pairwise update: exact, no large-mean cancellation."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        m2 = self.m2 + other.m2
        m2 += np.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, self.mean + delta * (other.n / n), m2)

    @classmethod
    def merged(cls, parts: Iterable[Moments]) -> Moments:
        """``parts`` merged from the first to the last: the order decides the last bits."""
        return functools.reduce(cls.merge, parts, cls.empty())

    @property
    def covariance(self) -> np.ndarray:
        """Sample covariance (divisor n - 1), as Spark's ``StandardScaler`` and ``PCA``."""
        return self.m2 / (self.n - 1)

    def to_bytes(self) -> dict:
        return {"n": self.n, "mean": self.mean.tobytes(), "m2": self.m2.tobytes()}

    def to_npz(self) -> bytes:
        """The moments as one ``.npz`` file's bytes (kept beside the features they describe)."""
        buffer = io.BytesIO()
        np.savez(buffer, n=np.int64(self.n), mean=self.mean, m2=self.m2)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> Moments:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(int(arrays["n"]), arrays["mean"], arrays["m2"])

    @classmethod
    def from_bytes(cls, n: int, mean: bytes, m2: bytes) -> Moments:
        mean_array = np.frombuffer(mean, dtype=np.float64)
        side = len(mean_array)
        return cls(n, mean_array, np.frombuffer(m2, dtype=np.float64).reshape(side, side).copy())


@dataclass
class PartitionMoments:
    """:class:`Moments` of numbered partitions, merged in an order fixed by their numbers.

    Floating-point merges depend on their order, and tasks finish in any order: merged as
    they arrived, the statistics of one input differed between runs in their last bits,
    enough to move a test image across the classifier's boundary (0.9762 or 0.9766). Here a
    partition's moments are merged with its sibling's in a binary tree over the partition
    numbers, as soon as both are in (so few are held at once), and what remains, in order,
    by :meth:`total`: the same input gives the same bits. A partition that arrives twice
    (its task ran again) counts once.
    """

    # (level, index) -> Moments of partitions index * 2**level .. (index + 1) * 2**level - 1
    nodes: dict[tuple[int, int], Moments] = field(default_factory=dict)
    partitions: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, partition: int, moments: Moments) -> PartitionMoments:
        return cls({(0, partition): moments}, {partition})

    def add(self, other: PartitionMoments) -> PartitionMoments:
        """``other``'s single partitions added to these (in place), each once."""
        for (level, index), moments in sorted(other.nodes.items()):
            if level:
                raise ValueError("only single partitions can be added")
            if index in self.partitions:
                continue
            self.partitions.add(index)
            while (level, index ^ 1) in self.nodes:
                sibling = self.nodes.pop((level, index ^ 1))
                moments = sibling.merge(moments) if index & 1 else moments.merge(sibling)
                level, index = level + 1, index >> 1
            self.nodes[(level, index)] = moments
        return self

    def total(self) -> Moments:
        """Everything added, merged from the first partition to the last."""
        in_order = sorted(self.nodes, key=lambda node: node[1] << node[0])  # by first partition
        return Moments.merged(map(self.nodes.get, in_order))


def _batch_rows(column: pa.Array) -> np.ndarray:
    """A list<float> Arrow column of equal-length rows as an (n, d) float64 matrix."""
    values = column.flatten().to_numpy(zero_copy_only=False)
    if len(column) and values.size % len(column):
        raise ValueError("feature vectors of different lengths in one dataset")
    return values.reshape(len(column), -1)


class MomentsBuilder:
    """:class:`Moments` of the vectors of one task, added a batch at a time.

    Sums of the vectors' offsets from the first batch's mean (the shifted-data algorithm,
    free of large-mean cancellation like the pairwise merge) and one Gram-matrix product
    per batch, with no d x d merge per batch: featurization's 256-row batches took 0.55 s
    per 5,000 vectors with a merge each, 0.35 s this way.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift = self.offsets = self.gram = None

    def add(self, vectors) -> None:
        """Add a batch: an (n, d) array, or a sequence of d-vectors."""
        if not len(vectors):
            return
        rows = np.array(vectors, dtype=np.float64)  # a copy, shifted in place
        if self.shift is None:
            self.shift = rows.mean(axis=0)
            self.offsets = np.zeros_like(self.shift)
            self.gram = np.zeros((len(self.shift), len(self.shift)))
        rows -= self.shift
        self.n += len(rows)
        self.offsets += rows.sum(axis=0)
        self.gram += rows.T @ rows

    def moments(self) -> Moments:
        if not self.n:
            return Moments.empty()
        offset = self.offsets / self.n
        return Moments(self.n, self.shift + offset, self.gram - self.n * np.outer(offset, offset))


def partition_moments(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` function: one row of :class:`Moments` per partition of vectors, its
    ``part`` the partition's number."""
    from pyspark import TaskContext  # loaded in every Spark worker already

    builder = MomentsBuilder()
    for batch in batches:
        builder.add(_batch_rows(batch.column(0)))
    if builder.n:
        part = TaskContext.get().partitionId()
        yield pa.RecordBatch.from_pylist([{"part": part, **builder.moments().to_bytes()}])


def merge_partials(span: int):
    """A ``mapInArrow`` function for a level of the merge tree: the rows of each run of
    ``span`` consecutive partitions merged into one, in the partitions' order (as
    :class:`PartitionMoments`, whatever order the shuffle delivers them in)."""

    def merge(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        rows = sorted((row for batch in batches for row in batch.to_pylist()), key=_PART)
        for _, group in itertools.groupby(rows, key=lambda row: row["part"] // span):
            group = list(group)
            total = merged_rows(group).to_bytes()
            yield pa.RecordBatch.from_pylist([{"part": group[0]["part"], **total}])

    return merge


def merged_rows(rows: Iterable) -> Moments:
    """Rows of :data:`MOMENTS_SCHEMA` merged in the order of their partitions."""
    in_order = sorted(rows, key=_PART)
    parts = (Moments.from_bytes(row["n"], row["mean"], row["m2"]) for row in in_order)
    return Moments.merged(parts)


def projector(
    mean: np.ndarray,
    std: np.ndarray,
    components: np.ndarray,
    scores_type: pa.DataType,
    sample: tuple[Any, float] | None = None,
):
    """A ``mapInArrow`` function: ``path``, ``label``, ``features`` batches to ``path``,
    ``label``, ``pca`` (float32 lists of ``scores_type``, the Arrow spelling of the output
    schema's column), as ``StandardScaler(withMean, withStd)`` then ``PCAModel`` compute it
    (a constant feature, std 0, scales to 0).

    ``sample`` (an accumulator of lists, a fraction) also gets, for each batch, a
    :data:`SAMPLE_SCHEMA` batch of its rows whose :func:`sample_key` is below the fraction.
    """
    inverse = np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
    k = components.shape[1]

    def project(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            rows = _batch_rows(batch.column(2)) if batch.num_rows else np.zeros((0, len(mean)))
            scores = (((rows - mean) * inverse) @ components).astype(np.float32)
            if sample is not None:
                points, fraction = sample
                keys = np.array([sample_key(path) for path in batch.column(0).to_pylist()])
                kept = np.flatnonzero(keys < fraction)
                second = scores[kept, 1] if k > 1 else pa.nulls(len(kept), pa.float32())
                columns = [keys[kept], batch.column(0).take(kept), batch.column(1).take(kept)]
                columns += [scores[kept, 0], second]  # the values written
                points.add([pa.RecordBatch.from_arrays(columns, schema=SAMPLE_SCHEMA)])
            values = pa.array(scores.ravel())
            offsets = pa.array(np.arange(0, (batch.num_rows + 1) * k, k, dtype=np.int32))
            pca = pa.ListArray.from_arrays(offsets, values, type=scores_type)
            yield pa.RecordBatch.from_arrays(
                [batch.column(0), batch.column(1), pca], names=["path", "label", "pca"]
            )

    return project


class ListsParam:
    """An accumulator of lists, concatenated (PySpark's ``AccumulatorParam`` by its two
    methods). Defined here, not beside the driver's code: a Python worker unpickles it
    with each task, and importing :mod:`imagepca.reduction` (Spark ML) there cost 0.3 s."""

    def zero(self, value: list) -> list:
        return []

    def addInPlace(self, lists: list, more: list) -> list:
        lists.extend(more)
        return lists


def sample_key(path: str) -> float:
    """A number in [0, 1) from a hash of ``path``: a sample by it keeps the same images
    however the rows are partitioned."""
    digest = hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
