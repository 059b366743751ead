"""Files under a job's `storage_path`, whether a local directory or a cloud URI.

Ray Train and Tune write checkpoints there through pyarrow filesystems; raylm's own records
(manifests, run records, reports) go through the same pyarrow filesystem, so `s3://`, `gs://` and
`file://` paths work for them exactly as for Ray's. Plain paths stay plain local files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any


def is_uri(path: str) -> bool:
    """Whether `path` is a URI (`s3://…`, `gs://…`, `file://…`) rather than a local path."""
    return "://" in path


def storage_uri(path: str) -> str:
    """Ray wants absolute local paths; URIs (s3://, gs://) pass through."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Joins path parts onto a local path or a URI."""
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else os.path.join(base, *parts)


def uri_of(filesystem: Any, path: str) -> str:
    """A pyarrow (filesystem, path) pair as one string: plain for local disk, else `s3://…`.

    Ray's Checkpoint and Result carry paths without their scheme (`bucket/runs/…`).
    """
    import pyarrow.fs

    if filesystem is None or isinstance(filesystem, pyarrow.fs.LocalFileSystem) or is_uri(path):
        return path
    scheme = {"gcs": "gs"}.get(filesystem.type_name, filesystem.type_name)
    return f"{scheme}://{path}"


def _fs(path: str) -> tuple[Any, str]:
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), storage_uri(path)


def exists(path: str) -> bool:
    """Whether a file or directory exists at `path`."""
    import pyarrow.fs

    fs, p = _fs(path)
    return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound


def read_json(path: str) -> Any:
    """Parsed JSON at `path`; raises FileNotFoundError if there is none."""
    if not is_uri(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if not exists(path):
        raise FileNotFoundError(path)
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return json.loads(f.read().decode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    """Writes JSON so a reader never sees half of it (rename locally; one PUT on object stores)."""
    text = json.dumps(obj, indent=2)
    if not is_uri(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        return
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode("utf-8"))


def child_dirs(path: str, prefix: str = "") -> list[str]:
    """Sorted paths of the directories directly under `path` whose names start with `prefix`."""
    import pyarrow.fs

    fs, p = _fs(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.Directory:
        return []
    infos = fs.get_file_info(pyarrow.fs.FileSelector(p))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix)
    )
    return [uri_of(fs, f"{p.rstrip('/')}/{n}") for n in names]


def file_sizes(path: str) -> dict[str, int]:
    """Size of every file under the directory `path`, keyed by `/`-separated relative path."""
    import pyarrow.fs

    fs, p = _fs(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.Directory:
        return {}
    root = p.rstrip("/") + "/"
    infos = fs.get_file_info(pyarrow.fs.FileSelector(p, recursive=True))
    return {
        i.path[len(root) :]: i.size
        for i in infos
        if i.type == pyarrow.fs.FileType.File and i.path.startswith(root)
    }


def move(src: str, dst: str) -> None:
    """Moves a directory tree (a rename locally; copy + delete on object stores)."""
    fs, s = _fs(src)
    _, d = _fs(dst)
    fs.move(s, d)


@contextlib.contextmanager
def staged_dir(path: str) -> Iterator[str]:
    """A local directory to write files into that end up at `path` (uploaded on exit for URIs)."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="raylm-stage-") as tmp:
        yield tmp
        fs, p = _fs(path)
        fs.create_dir(p, recursive=True)
        pyarrow.fs.copy_files(tmp, p, destination_filesystem=fs)


def local_dir(path: str, cache: str | None = None, filesystem: Any = None) -> str:
    """A local directory holding what `path` holds: itself on local disk (plain or `file://`),
    else a copy downloaded once into a cache (`filesystem` overrides the one the URI names)."""
    import pyarrow.fs

    if filesystem is not None:
        fs, p = filesystem, path
    elif not is_uri(path):
        return path
    else:
        fs, p = _fs(path)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return p
    root = cache or os.path.join(
        os.environ.get("RAYLM_CACHE", os.path.expanduser("~/.cache/raylm")), "remote"
    )
    target = os.path.join(root, hashlib.sha256(path.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    tmp = tempfile.mkdtemp(prefix=".download-", dir=_makedirs(root))
    pyarrow.fs.copy_files(p, tmp, source_filesystem=fs)
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same download first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _makedirs(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
