"""The classifier notebook 03 saves: where it goes, how it classifies ``reduced/`` rows, and
its save, which runs beside the notebook's later cells.

:class:`imagepca.classify.Classification` fits the model; :class:`StagedSave` writes it
under ``OUTPUT/_staging/`` on a thread of its own and swaps it in as
``OUTPUT/classifier_model`` when the notebook publishes.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from pyspark.ml import PipelineModel
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame

from .logistic import PREDICTED_LABEL_COL
from .reduction import PCA_COL
from .session import in_background
from .storage import Storage

MODEL_DIR = "classifier_model"


def predict(model: PipelineModel, reduced: DataFrame) -> DataFrame:
    """``path``, ``label``, ``predicted_label`` for rows of ``reduced/`` (``pca`` arrays).

    The classifier's input column is ``pca_vector``, the output column of ``pca_model``:
    ``PipelineModel(stages=[*pca_model.stages, *classifier.stages])`` therefore classifies
    ``array_to_vector(features)`` directly.
    """
    vectors = reduced.withColumn(PCA_COL, array_to_vector("pca"))
    return model.transform(vectors).select("path", "label", PREDICTED_LABEL_COL)


@dataclass
class StagedSave:
    """The classifier's Spark ML save (six small jobs, 0.5 s) under ``OUTPUT/_staging/``, on a
    thread of its own.

    It then runs beside what follows in notebook 03 (the confusion matrix's drawing, the
    comparison's fits), none of which runs a Spark job; :meth:`swap_in` waits for it. It is
    started once the output's completion markers are withdrawn: the staged model never sits
    in an output that looks complete.
    """

    storage: Storage
    output: str
    future: Future | None = None  # the staging URI, once written

    @property
    def started(self) -> bool:
        return self.future is not None

    def start(self, model: PipelineModel) -> None:
        self.future = in_background(self.storage.stage, self.output, MODEL_DIR, model.save)

    def wait(self) -> str | None:
        """The staged model's URI once its save has ended (None if it failed); it is no
        longer tracked then. An interrupt of the wait leaves it tracked: a running save is
        never forgotten (a later :meth:`swap_in` would otherwise finish the run under it)."""
        staged = self.future
        try:
            return staged.result()
        except Exception:
            return None
        finally:
            if staged.done():
                self.future = None

    def discard(self) -> None:
        """Before a refit: wait for the earlier model's save and remove what it staged (a
        failed save's debris goes with ``_staging/`` when the run completes)."""
        if self.started:
            staging = self.wait()
            if staging is not None:
                self.storage.delete(staging)

    def swap_in(self, model: PipelineModel) -> None:
        """Replace ``OUTPUT/classifier_model`` with the staged save of ``model``.

        A save that failed in the background (an interrupt of any cell cancels every running
        job in a local kernel, this save's too) is done here again, or raises its own error.
        """
        staging = self.wait()
        if staging is None:
            staging = self.storage.stage(self.output, MODEL_DIR, model.save)
        self.storage.swap_in(self.output, MODEL_DIR, staging)
