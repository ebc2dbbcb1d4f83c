"""What Spark's listing of a local folder will see, walked on this machine: the links it
follows (and those it would follow forever), and the image files it drops.

Spark lists a folder through Hadoop's local file system, which follows every link to a
folder and skips names with a leading ``_`` or ``.`` and links to nothing; :mod:`imagepca.config`
checks an input's links before a run, and :mod:`imagepca.inputs` reports the images Spark
dropped.
"""

from __future__ import annotations

import os
from pathlib import Path


def within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both spelled alike)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def followed_walk(folder: str, loops: list[tuple[str, str]] | None = None):
    """``os.walk`` of a local folder that follows links to folders as Spark's listing does,
    but not a link that loops: one to a folder holding a folder walked on the way to it,
    which Spark follows again and again (to the system's limit of 40 links). Those are
    appended to ``loops`` as ``(link, target)``. Prune ``subfolders`` in place, as with
    ``os.walk``."""
    # The real folders on the way to each folder still to walk.
    chains = {folder: frozenset([os.path.realpath(folder)])}
    for parent, subfolders, names in os.walk(folder, followlinks=True):
        yield parent, subfolders, names
        chain = chains.pop(parent)
        kept = []
        for name in subfolders:
            path = os.path.join(parent, name)
            real = os.path.realpath(path)
            if os.path.islink(path) and any(within(step, real) for step in chain):
                if loops is not None:
                    loops.append((path, real))
                continue
            chains[path] = chain | {real}
            kept.append(name)
        subfolders[:] = kept


def followed_links(folder: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The links to folders that Spark's listing of the local ``folder`` follows (in folders
    it lists: :func:`listed_by_spark`; none for a remote location), and among them
    those that loop (:func:`followed_walk`): ``(link, target)`` lists."""
    links: list[tuple[str, str]] = []
    loops: list[tuple[str, str]] = []
    if "://" in folder or not os.path.isdir(folder):
        return links, loops
    for parent, subfolders, _ in followed_walk(folder, loops):
        subfolders[:] = [name for name in subfolders if listed_by_spark(name)]
        for name in subfolders:
            path = os.path.join(parent, name)
            if os.path.islink(path):
                links.append((path, os.path.realpath(path)))
    return links, loops


def listed_by_spark(name: str) -> bool:
    """Whether Spark's listing keeps this file or folder name: Spark 3.5's
    ``HadoopFSUtils.shouldFilterOutPathName`` drops a leading ``.``, a leading ``_`` (not a
    partition's ``k=v``, nor Parquet's ``_metadata`` and ``_common_metadata``) and a copy
    under way (``._COPYING_``)."""
    dropped = (
        (name.startswith("_") and "=" not in name)
        or name.startswith(".")
        or name.endswith("._COPYING_")
    )
    return not dropped or name.startswith(("_common_metadata", "_metadata"))


def skipped_images(
    folder: str, extensions: tuple[str, ...], most: int = 100_000
) -> tuple[int, list[str]]:
    """Image files (by ``extensions``, lower case) of a local folder that Spark's listing
    drops without a word, among its first ``most`` entries: the number skipped for a leading
    ``_`` (in their name or a parent folder's), and the links to nothing, which Hadoop's
    listing leaves out. Names with a leading ``.`` are hidden on purpose (``._IMG_1.JPG``,
    ``.thumbnails/``) and macOS's ``__MACOSX/`` holds no image: neither is counted."""
    hidden = seen = 0
    broken: list[str] = []
    root = Path(folder)
    for parent, folders, names in followed_walk(folder):
        folders[:] = [name for name in folders if name[0] != "." and name != "__MACOSX"]
        parts = Path(parent).relative_to(root).parts
        in_skipped = not all(listed_by_spark(part) for part in parts)
        for name in names:
            seen += 1
            if not name.lower().endswith(extensions) or name.startswith("."):
                continue
            path = os.path.join(parent, name)
            if in_skipped or not listed_by_spark(name):
                hidden += 1
            elif os.path.islink(path) and not os.path.exists(path):
                broken.append(path)
        if seen >= most:
            break
    return hidden, sorted(broken)
