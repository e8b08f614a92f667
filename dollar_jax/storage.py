"""Files and folders on local disks and object stores (gs://...) behind one API, over etils.epath.

Every reader and writer of the project goes through here or through epath/Orbax directly, so a workdir, a
model folder or a dataset may be `gs://bucket/...` as well as a local path. Object stores have no
directories and no rename: nothing here renames a folder on them. Instead a folder is complete once its
*marker file* exists (Orbax: commit_success.txt; model folders: config.json; datasets: dataset_info.json),
and the marker is written last. Single objects are replaced atomically by the store itself.

Which client serves gs:// is epath's choice: TensorFlow's gfile when TensorFlow is importable (the
default), fsspec/gcsfs with EPATH_USE_TF=false. Orbax writes arrays through TensorStore's own GCS driver.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

CACHE_ENV = "DOLLAR_JAX_CACHE"  # where object-store datasets are staged for ArrayRecord (local files only)


def is_remote(path) -> bool:
    """True for URLs (gs://, s3://, ...): paths that are not opened with the local file API."""
    return "://" in os.fspath(path)


def resolve(path) -> str:
    """An absolute local path, or the URL as given (os.path.abspath would turn gs://b into ./gs:/b)."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(base, *parts) -> str:
    """os.path.join that keeps URLs intact (posix separators)."""
    return str(epath.Path(resolve(base)).joinpath(*parts))


def exists(path) -> bool:
    return epath.Path(path).exists()


def makedirs(path) -> None:
    """Create a local folder (and parents); a no-op on object stores, where folders need not exist."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_text(path) -> str:
    return epath.Path(path).read_text()


def write_text(path, text: str) -> None:
    """Replace a file's contents at once: locally via a temporary sibling and os.replace (a reader never
    sees half a file), on object stores with one upload (objects are replaced atomically)."""
    path = os.fspath(path)
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path):
    return json.loads(read_text(path))


def write_json(path, value, **kwargs) -> None:
    write_text(path, json.dumps(value, **kwargs))


def rmtree(path) -> None:
    """Remove a folder and everything under it, if it exists."""
    p = epath.Path(path)
    if p.exists():
        p.rmtree()


def files_under(root) -> list[str]:
    """Relative paths of every file below `root` (a folder), sorted."""
    root_path = epath.Path(root)
    out = []

    def visit(folder: epath.Path, prefix: str):
        for child in folder.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                visit(child, rel + "/")
            else:
                out.append(rel)

    visit(root_path, "")
    return sorted(out)


def copy_file(src, dst) -> None:
    """Copy one file between any two backends (local <-> object store, store <-> store), streamed."""
    src, dst = epath.Path(src), epath.Path(dst)
    if not is_remote(dst):
        os.makedirs(os.path.dirname(os.fspath(dst)), exist_ok=True)
    if is_remote(src) and is_remote(dst) and src.parts[1] == dst.parts[1]:
        src.copy(dst, overwrite=True)  # same store: a server-side copy, no bytes through this host
        return
    with src.open("rb") as r, dst.open("wb") as w:
        shutil.copyfileobj(r, w, length=16 << 20)


def copy_tree(src, dst, last: str | None = None) -> None:
    """Copy every file of folder `src` into `dst`; `last` (a relative path) is copied after all others, so
    that a reader who waits for it never sees a partial copy."""
    files = files_under(src)
    if last is not None:
        if last not in files:
            raise FileNotFoundError(f"{join(src, last)} is missing: {src} is not complete")
        files = [f for f in files if f != last] + [last]
    for rel in files:
        copy_file(join(src, rel), join(dst, rel))


def move_tree(src, dst) -> None:
    """Move a folder. Locally a rename; on object stores (no directory rename) a copy of each object,
    then the source is deleted, so an interruption leaves both copies, never neither."""
    if not is_remote(src) and not is_remote(dst):
        os.rename(src, dst)
        return
    copy_tree(src, dst)
    rmtree(src)


@contextlib.contextmanager
def local_file(path) -> Iterator[str]:
    """A local path to write `path` through: `path` itself when local; otherwise a temporary file that is
    uploaded when the block ends without error (for writers that need a real file: ffmpeg, matplotlib)."""
    path = os.fspath(path)
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="dollar_upload_") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        yield local
        copy_file(local, path)


def cache_root() -> str:
    """Local folder for copies of object-store data ($DOLLAR_JAX_CACHE, default ~/.cache/dollar_jax)."""
    return os.path.abspath(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dollar_jax"))


def stage_local(src: str, marker: str) -> str:
    """A local copy of the complete folder `src` (remote), made once and reused while `src` is unchanged.

    For readers that open local files only (ArrayRecord). The copy lives under cache_root() at a path
    mirroring the URL; it is rebuilt when the source's listing (names and sizes) changes. `marker` is the
    source's completeness marker: a source without it is an error, never a partial copy.
    """
    if not is_remote(src):
        return src
    source = epath.Path(src)
    if not (source / marker).exists():
        raise FileNotFoundError(f"{src} has no {marker}: not a complete folder")
    listing = {rel: (source / rel).stat().length for rel in files_under(src)}
    scheme, rest = os.fspath(src).split("://", 1)
    local = os.path.join(cache_root(), scheme, rest.strip("/"))
    stamp = os.path.join(local, ".staged.json")

    def current() -> bool:
        if not os.path.exists(stamp):
            return False
        with open(stamp) as f:
            return json.load(f) == listing

    if current():
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(local)}.staging-", dir=os.path.dirname(local))
    try:
        copy_tree(src, tmp, last=marker)
        with open(os.path.join(tmp, ".staged.json"), "w") as f:
            json.dump(listing, f)
        if current():  # another process on this host finished first: use its copy, never delete it
            return local
        shutil.rmtree(local, ignore_errors=True)  # an older copy of a changed source
        try:
            os.rename(tmp, local)
        except OSError:  # another process on this host staged it first
            if not os.path.exists(stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local
