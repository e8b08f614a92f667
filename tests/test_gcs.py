"""gs:// workdirs, model folders and datasets, against a local GCS emulator (tests/gcs_emulator.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from dollar_jax import storage
from gcs_emulator import GcsEmulator


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    emulator = GcsEmulator().start()
    old_cache = os.environ.get(storage.CACHE_ENV)
    os.environ[storage.CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield emulator.create_bucket("dollar-test")
    finally:
        emulator.stop()
        if old_cache is None:
            os.environ.pop(storage.CACHE_ENV, None)
        else:
            os.environ[storage.CACHE_ENV] = old_cache


def test_storage_helpers_on_the_emulator(bucket, tmp_path):
    root = f"{bucket}/helpers"
    assert storage.resolve(root) == root and storage.join(root, "a", "b.txt") == f"{root}/a/b.txt"
    storage.write_json(f"{root}/src/sub/x.json", {"v": 1})
    storage.write_text(f"{root}/src/marker", "done")
    assert storage.files_under(f"{root}/src") == ["marker", "sub/x.json"]
    storage.move_tree(f"{root}/src", f"{root}/moved")  # no directory rename on the store: copy + delete
    assert not storage.exists(f"{root}/src") and storage.read_json(f"{root}/moved/sub/x.json") == {"v": 1}
    with storage.local_file(f"{root}/up/file.bin") as local:
        assert not storage.is_remote(local)
        with open(local, "wb") as f:
            f.write(b"\x00\x01")
    assert epath.Path(f"{root}/up/file.bin").read_bytes() == b"\x00\x01"
    staged = storage.stage_local(f"{root}/moved", marker="marker")
    assert open(os.path.join(staged, "sub", "x.json")).read() == '{"v": 1}'
    with pytest.raises(FileNotFoundError, match="no missing_marker"):
        storage.stage_local(f"{root}/moved", marker="missing_marker")
