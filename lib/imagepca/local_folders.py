"""What Spark's listing of a local folder will see, walked on this machine: the links it
follows (and those it would follow forever), and the image files it drops.

Spark lists a folder through Hadoop's local file system, which follows every link to a
folder and skips names with a leading ``_`` or ``.`` and links to nothing; :mod:`imagepca.config`
checks an input's links before a run, and :mod:`imagepca.inputs` reports the images Spark
dropped.
"""

from __future__ import annotations

import locale
import os
from pathlib import Path


def within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both spelled alike)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def followed_walk(folder: str, loops: list[tuple[str, str]] | None = None):
    """Walk a local folder as ``os.walk`` does, following links to folders as Spark's listing
    does, but not a link that loops: one to a folder holding a folder walked on the way to
    it, which Spark follows again and again (to the system's limit of 40 links). Those are
    appended to ``loops`` as ``(link, target)``.

    Yields ``(parent, subfolders, files)``: the subfolders' names (prune them in place, as
    with ``os.walk``) and the other entries as ``os.DirEntry``, whose ``is_symlink()`` costs
    no system call (a stat per file made 100,000 images' walk five times slower).
    """
    # The real folders on the way to each folder still to walk.
    chains = {folder: frozenset([os.path.realpath(folder)])}
    pending = [folder]
    while pending:
        parent = pending.pop()
        try:
            with os.scandir(parent) as listing:
                entries = list(listing)
        except OSError:  # gone or unreadable, as os.walk skips it
            continue
        folders = {entry.name for entry in entries if _is_folder(entry)}  # links followed
        subfolders = [entry.name for entry in entries if entry.name in folders]
        yield parent, subfolders, [entry for entry in entries if entry.name not in folders]
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
            kept.append(path)
        pending.extend(reversed(kept))  # depth first, in listing order, as os.walk goes


def _is_folder(entry: os.DirEntry) -> bool:
    """A folder, or a link to one; not a link to itself or in a circle (``is_dir`` raises
    ELOOP for those: reported as links to nothing)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


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


def is_utf8(name: str) -> bool:
    """Whether a file name's bytes are UTF-8: Python keeps others as surrogates (a Latin-1
    ``café.jpg`` from an old archive), and Spark's JVM cannot open them."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(path: str) -> str:
    """A path as text, bytes that are not UTF-8 as ``\\xe9`` escapes (JSON-safe)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def image_files(folder: str, extensions: tuple[str, ...], most: int | None = None):
    """Each image file (by ``extensions``, lower case) under a local folder, with what
    Spark's listing does with it: ``(path, kind)``, kind ``"listed"``, ``"skipped"`` for a
    leading ``_`` (its name's or a parent folder's), ``"broken"`` for a link to nothing and
    ``"not_utf8"`` for a name (its own or a parent folder's) that is not UTF-8, both of
    which Hadoop's listing leaves out. Names with a leading ``.`` are hidden on purpose
    (``._IMG_1.JPG``, ``.thumbnails/``) and macOS's ``__MACOSX/`` holds no image: neither is
    given. Stops after ``most`` entries."""
    seen = 0
    root = Path(folder)
    for parent, folders, files in followed_walk(folder):
        folders[:] = [name for name in folders if name[0] != "." and name != "__MACOSX"]
        parts = Path(parent).relative_to(root).parts
        in_skipped = not all(listed_by_spark(part) for part in parts)
        in_unnamed = not all(is_utf8(part) for part in parts)
        for entry in files:
            seen += 1
            if not entry.name.lower().endswith(extensions) or entry.name.startswith("."):
                continue
            if in_skipped or not listed_by_spark(entry.name):
                yield entry.path, "skipped"
            elif in_unnamed or not is_utf8(entry.name):
                yield entry.path, "not_utf8"
            elif entry.is_symlink() and not os.path.exists(entry.path):
                yield entry.path, "broken"
            else:
                yield entry.path, "listed"
        if most is not None and seen >= most:
            return


def skipped_images(
    folder: str, extensions: tuple[str, ...], most: int = 100_000
) -> tuple[list[str], list[str], list[str]]:
    """Image files of a local folder that Spark's listing drops without a word, among its
    first ``most`` entries: those skipped for a leading ``_``, the links to nothing, and
    the names that are not UTF-8 (skipped and not-UTF-8 names as :func:`shown` gives them;
    see :func:`image_files`)."""
    hidden, broken, not_utf8 = [], [], []
    for path, kind in image_files(folder, extensions, most):
        if kind == "skipped":
            hidden.append(shown(path))
        elif kind == "broken":
            broken.append(path)
        elif kind == "not_utf8":
            not_utf8.append(shown(path))
    return sorted(hidden), sorted(broken), sorted(not_utf8)


def is_plain_folder(path: str) -> bool:
    """Whether a local path is a folder without Parquet files (not a dataset Spark wrote)."""
    return os.path.isdir(path) and not any(Path(path).rglob("*.parquet"))


# UTF-8 locales, the first a system has going to the JVM: C.UTF-8 (glibc 2.35, Debian, Amazon
# Linux 2023), else en_US.UTF-8 (older glibc).
UTF8_LOCALES = ("C.UTF-8", "C.utf8", "en_US.UTF-8", "en_US.utf8")


def utf8_locale() -> str | None:
    """A UTF-8 locale this system has, for the JVM's ``LC_ALL``; None if none of
    :data:`UTF8_LOCALES`. Java reads file names in its locale's encoding: under ``LC_ALL=C``,
    or a locale the system lacks (``LANG=en_US.UTF-8`` in a slim container: Java takes no
    category then), it read ``café/`` as ``caf?/``, no file, and lost those images without
    a word."""
    current = locale.setlocale(locale.LC_CTYPE)
    try:
        for name in UTF8_LOCALES:
            try:
                locale.setlocale(locale.LC_CTYPE, name)
            except locale.Error:
                continue
            return name
        return None
    finally:
        locale.setlocale(locale.LC_CTYPE, current)
