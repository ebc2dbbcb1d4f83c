"""Project new images' features with a PCA fitted by an earlier run (Spark ML's load and
transform), once both sets of features are known to be alike.

Features of other weights, another image size or another decoding project without an error
and mean nothing, so :func:`reduce_output` compares how both outputs were featurized before
it applies the fitted ``pca_model/``; :func:`imagepca.reduction.reduce_with` is the step
without that check, for features that are not an output's.
"""

from __future__ import annotations

from pyspark.ml import PipelineModel
from pyspark.sql import DataFrame, SparkSession

from .images import InputError
from .pipeline import read_features, stored_extraction
from .reduction import reduce_with
from .storage import METRICS_FILE, Storage, join, literal

# Extraction parameters that change the features themselves. The engine does not (Keras and
# TFLite agree within 1e-4), nor does max_image_pixels (it decides which images have one).
PROJECTION_KEYS = ("weights_sha256", "image_size", "fast_decode")


def reduce_output(spark: SparkSession, *, model_output: str, features_output: str) -> DataFrame:
    """Scores (``path``, ``label``, ``pca``: k floats) of ``features_output``'s images on the
    components ``model_output``'s notebook 02 fitted.

    Parameters
    ----------
    spark : SparkSession
    model_output : str
        Folder or URI of a run whose notebook 02 finished (its ``metrics.json`` says how the
        features it fitted were made).
    features_output : str
        Folder or URI of a run whose notebook 01 finished: only its ``features/`` is read.

    Raises
    ------
    InputError
        When either output lacks what is needed, or the two were featurized differently
        (the message names each differing parameter and both values).
    RuntimeError
        When a run stopped while it replaced ``features_output``'s features.
    """
    storage = Storage(spark)
    if not storage.exists(join(model_output, "pca_model")):
        raise InputError(
            f"no fitted PCA under {model_output}{storage.relative_note(model_output)} (notebook "
            "02 writes pca_model/): give the output of a run whose notebook 02 finished"
        )
    fitted = storage.read_json_if_exists(join(model_output, METRICS_FILE))
    if fitted is None:  # removed as a run starts, written again by its notebook 02
        raise InputError(
            f"{model_output} has a pca_model/ but no metrics.json: a run started there after "
            "notebook 02 fitted it, so its features/ may not be those the PCA was fitted on; "
            "run notebook 02 on it again (or `imagepca run --reuse-features`)"
        )
    storage.refuse_half_replaced(features_output)
    made = stored_extraction(storage, features_output)
    if made is None:
        raise InputError(
            f"no features under {join(features_output, 'features')}"
            f"{storage.relative_note(features_output)}: run notebook 01_extract_features (or "
            "`imagepca run`) on the new images with this output first"
        )
    wanted, found = fitted["params"]["extract"], made["params"]
    differ = [key for key in PROJECTION_KEYS if wanted.get(key) != found.get(key)]
    if differ:
        changes = ", ".join(
            f"{key} {found.get(key)!r} (fitted: {wanted.get(key)!r})" for key in differ
        )
        raise InputError(
            f"the features under {features_output} were made differently from those "
            f"{model_output}'s PCA was fitted on: {changes}; featurize the new images again "
            "with the fitted run's settings"
        )
    model = PipelineModel.load(literal(join(model_output, "pca_model")))
    return reduce_with(model, read_features(spark, features_output))
