"""Remote model stores: where converted checkpoint directories come from.

A store hands out a model's manifest and its files by name. `LocalStore` is a directory (an NFS
mount, or a local folder in local mode); `HttpStore` is any static HTTP server exposing
`BASE/MODEL/FILE` (nginx, an object store's website endpoint). An S3 store implements the same
three methods.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import requests

from runtime.checkpoint.format import MANIFEST_NAME
from runtime.names import validate_model_name

Progress = Callable[[int], None]  # called with bytes just written


class StoreError(RuntimeError):
    """The remote store does not have the model, or the transfer failed for good."""


class RemoteStore(Protocol):
    def read_manifest(self, model: str) -> bytes: ...

    def fetch(self, model: str, file: str, destination: Path, size: int, progress: Progress) -> None:
        """Write `file` of `model` to `destination`, resuming from what `destination` already holds."""

    def describe(self) -> str: ...


class LocalStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"dir:{self.root}"

    def read_manifest(self, model: str) -> bytes:
        path = self.root / validate_model_name(model) / MANIFEST_NAME
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"model {model!r} is not in the store {self.root}") from None

    def fetch(self, model: str, file: str, destination: Path, size: int, progress: Progress) -> None:
        source = self.root / validate_model_name(model) / file
        done = destination.stat().st_size if destination.exists() else 0
        with open(source, "rb") as src, open(destination, "ab") as dst:
            src.seek(done)
            while chunk := src.read(8 << 20):
                dst.write(chunk)
                progress(len(chunk))


class HttpStore:
    """GET BASE/MODEL/FILE; interrupted transfers resume with a Range request."""

    def __init__(self, base_url: str, attempts: int = 5, timeout: float = 30.0) -> None:
        self.base = base_url.rstrip("/")
        self.attempts, self.timeout = attempts, timeout
        self.session = requests.Session()

    def describe(self) -> str:
        return self.base

    def _url(self, model: str, file: str) -> str:
        return f"{self.base}/{validate_model_name(model)}/{file}"

    def read_manifest(self, model: str) -> bytes:
        response = self.session.get(self._url(model, MANIFEST_NAME), timeout=self.timeout)
        if response.status_code == 404:
            raise StoreError(f"model {model!r} is not in the store {self.base}")
        response.raise_for_status()
        return response.content

    def fetch(self, model: str, file: str, destination: Path, size: int, progress: Progress) -> None:
        for attempt in range(1, self.attempts + 1):
            done = destination.stat().st_size if destination.exists() else 0
            if done >= size:
                return
            headers = {"Range": f"bytes={done}-"} if done else {}
            try:
                with self.session.get(self._url(model, file), headers=headers, stream=True,
                                      timeout=self.timeout) as response:
                    if response.status_code == 200 and done:  # server ignored the range: start over
                        destination.unlink()
                    elif response.status_code not in (200, 206):
                        raise StoreError(f"GET {self._url(model, file)}: HTTP {response.status_code}")
                    with open(destination, "ab") as dst:
                        for chunk in response.iter_content(256 << 10):  # small: a cut loses little
                            dst.write(chunk)
                            progress(len(chunk))
                if destination.stat().st_size >= size:
                    return
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
                if attempt == self.attempts:
                    raise StoreError(f"GET {self._url(model, file)} failed {attempt} times") from None
                time.sleep(min(0.1 * 2**attempt, 2.0))
        raise StoreError(f"GET {self._url(model, file)}: incomplete after {self.attempts} attempts")


def open_store(location: str) -> RemoteStore:
    if location.startswith(("http://", "https://")):
        return HttpStore(location)
    if not Path(location).is_dir():
        raise StoreError(f"remote store {location} is neither an http(s) URL nor a directory")
    return LocalStore(location)


def copy_file(source: Path, destination: Path, progress: Progress, chunk: int = 64 << 20) -> None:
    """In-kernel copy (copy_file_range / sendfile), chunk by chunk so progress is reported."""
    size = source.stat().st_size
    with open(source, "rb") as src, open(destination, "wb") as dst:
        if size == 0:
            return
        offset = 0
        while offset < size:
            sent = os.sendfile(dst.fileno(), src.fileno(), offset, min(chunk, size - offset))
            if sent == 0:
                raise OSError(f"short copy of {source} at byte {offset}")
            offset += sent
            progress(sent)
    shutil.copystat(source, destination)
