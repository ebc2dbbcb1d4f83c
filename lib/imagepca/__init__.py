"""imagepca: folder-per-class images -> MobileNetV2 features -> StandardScaler + PCA on Spark.

The notebooks in ``notebooks/`` are the interface; this package holds their logic, one
module per stage of the data flow:

- :mod:`imagepca.config`    run parameters, validated once
- :mod:`imagepca.local_folders` what Spark's listing of a local folder sees (links, skips)
- :mod:`imagepca.session`   the SparkSession (the cluster's, or a local one)
- :mod:`imagepca.images`    listing, reading and decoding images
- :mod:`imagepca.features`  MobileNetV2 feature extraction on the executors
- :mod:`imagepca.moments`   one-pass mean and Gram matrix of the features (executors;
                            summed while featurizing, or in a pass of their own)
- :mod:`imagepca.reduction` StandardScaler + PCA pipeline, choice of k
- :mod:`imagepca.plots`     figures
- :mod:`imagepca.storage`   output location: staged writes, markers
- :mod:`imagepca.rejects`   every file found in features/ or rejected/, with its reason
- :mod:`imagepca.pipeline`  the two stages, top to bottom
- :mod:`imagepca.split`     notebook 03's train/test split and driver-side training rows
- :mod:`imagepca.logistic`  Spark's logistic regression objective fitted on the driver
- :mod:`imagepca.classify_inputs` notebook 03's inputs: metrics, PCA, split, subset
- :mod:`imagepca.classify`  classifier on the reduced features (notebook 03)
- :mod:`imagepca.progress`  a progress line for long Spark jobs
- :mod:`imagepca.runner`    papermill execution of the notebooks
- :mod:`imagepca.kernel`    the run's one kernel: its clients, its Spark's stop
- :mod:`imagepca.executed`  the executed notebooks a stopped or failed run leaves
- :mod:`imagepca.livy`      the same notebooks through sparkmagic and Livy
- :mod:`imagepca.livy_api`  Livy's REST API: TLS trust, the run's sessions listed and deleted
- :mod:`imagepca.aws`       AWS in deployment order: settings, account, stage, cluster, runs
- :mod:`imagepca.sample`    the generated sample data set (painted by :mod:`imagepca.fruits`)
- :mod:`imagepca.cli`       ``python -m imagepca``
"""

from importlib import metadata as _metadata

from .config import ExtractParams, ParameterError, ReduceParams
from .magics import register_matplot_magic as _register_matplot_magic

try:
    __version__ = _metadata.version("imagepca")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

__all__ = [
    "ExtractParams",
    "ParameterError",
    "ReduceParams",
    "__version__",
]

_register_matplot_magic()
