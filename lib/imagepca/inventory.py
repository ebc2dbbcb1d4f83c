"""An S3 Inventory report as a manifest: the objects its ``manifest.json`` lists, read from
its CSV, ORC or Parquet data files as rows of ``path``, ``label``, ``size``, ``modified``.

A report lists every object of a bucket, old versions and delete markers too:
:func:`imagepca.inputs.read_manifest` keeps the image keys of the current versions.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from .images import InputError
from .storage import Storage, literal

# Column names an S3 Inventory report uses: CSV reports name them in ``fileSchema``,
# Parquet and ORC reports carry them (in snake case) in the data files.
INVENTORY_COLUMNS = {
    "bucket": "bucket",
    "key": "key",
    "size": "size",
    "lastmodifieddate": "last_modified_date",
    "islatest": "is_latest",
    "isdeletemarker": "is_delete_marker",
}


def inventory_table(spark: SparkSession, manifest_uri: str) -> DataFrame:
    """The objects of an S3 Inventory report (the data files its ``manifest.json`` names)."""
    storage = Storage(spark)
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
        bucket = manifest["destinationBucket"].rsplit(":", 1)[-1]
        file_format = manifest["fileFormat"].lower()
        data_files = [f"s3://{bucket}/{entry['key']}" for entry in manifest["files"]]
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(
            f"{manifest_uri!r} is not an S3 Inventory manifest.json ({type(error).__name__}: "
            f"{error}); expected destinationBucket, fileFormat, fileSchema and files[].key"
        ) from None
    # The report's objects live in S3: spelled with the manifest's own S3 scheme (s3a://
    # off EMR), s3:// otherwise.
    scheme = urlsplit(manifest_uri).scheme.lower()
    scheme = scheme if scheme in ("s3a", "s3n") else "s3"
    data_files = [literal(f"{scheme}{uri[2:]}") for uri in data_files]
    if not data_files:
        return spark.createDataFrame([], "path string, label string, size long, modified string")
    if file_format == "csv":
        schema = [c.strip() for c in manifest["fileSchema"].split(",")]
        table = spark.read.csv(data_files, schema=", ".join(f"`{c}` string" for c in schema))
        table = table.toDF(*(INVENTORY_COLUMNS.get(c.lower(), c.lower()) for c in schema))
        # CSV reports URL-encode keys (spaces as +); Parquet and ORC reports do not.
        key = F.url_decode(F.col("key"))
    elif file_format in ("parquet", "orc"):
        table = spark.read.format(file_format).load(data_files)
        key = F.col("key")
    else:
        raise InputError(f"S3 Inventory fileFormat {manifest['fileFormat']!r} is not supported")
    keep = F.lit(True)
    if "is_latest" in table.columns:  # versioned reports list old versions too
        keep = keep & (F.lower(F.col("is_latest").cast("string")) == "true")
    if "is_delete_marker" in table.columns:
        keep = keep & ~F.coalesce(F.lower(F.col("is_delete_marker").cast("string")) == "true",
                                  F.lit(False))  # fmt: skip
    modified = F.col("last_modified_date") if "last_modified_date" in table.columns else None
    return table.where(keep).select(
        F.concat(F.lit(f"{scheme}://"), F.col("bucket"), F.lit("/"), key).alias("path"),
        F.lit(None).cast("string").alias("label"),
        (F.col("size") if "size" in table.columns else F.lit(None)).alias("size"),
        (modified if modified is not None else F.lit(None)).alias("modified"),
    )
