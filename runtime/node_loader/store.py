"""Remote model stores: where converted checkpoint directories come from.

A store hands out a model's manifest and its files by name. `LocalStore` is a directory (an NFS
mount, or a local folder in local mode); `HttpStore` is any static HTTP server exposing
`BASE/MODEL/FILE` (nginx, an object store's website endpoint). An S3 store implements the same
three methods.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import requests
import urllib3

from sllm_faas.common.names import validate_model_name
from sllm_faas.runtime.checkpoint.format import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    CheckpointError,
    open_regular,
    read_regular,
)
from sllm_faas.runtime.loader.direct import HugePageWatch, allocate_buffer, open_for_reading
from sllm_faas.runtime.loader.policy import huge_page_watch, measure_memory
from sllm_faas.runtime.loader.tiers import tmpfs_huge_pages

Progress = Callable[[int], None]  # called with bytes just written
DEFAULT_TRANSFER_TIMEOUT_S = 3600.0  # overall deadline of one manifest read or one file download


class StoreError(RuntimeError):
    """The remote store does not have the model, or the transfer failed for good."""


class RemoteStore(Protocol):
    def read_manifest(self, model: str) -> bytes: ...

    def fetch(self, model: str, file: str, destination: Path, size: int, progress: Progress) -> None:
        """Write `file` of `model` to `destination`, resuming from what `destination` already holds; never more
        than `size` bytes (the manifest's), within the store's overall transfer deadline."""

    def describe(self) -> str: ...


class _Transfer:
    """One transfer's overall deadline and byte bound: a store that trickles, or sends more than the manifest
    declares, fails the transfer instead of holding a staging worker or filling the disk past the budget."""

    def __init__(self, what: str, timeout_s: float) -> None:
        self.what, self.timeout_s = what, timeout_s
        self.deadline = time.monotonic() + timeout_s

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StoreError(f"{self.what}: not finished within the {self.timeout_s:g} s transfer deadline "
                             "(transfer_timeout_s)")
        return left

    def write(self, chunks: Iterator[bytes], destination: Path, done: int, size: int, progress: Progress) -> None:
        """Append `chunks` to `destination` (which holds `done` bytes) up to `size`; a byte beyond `size`
        removes the file and fails the transfer."""
        with open(destination, "ab") as dst:
            for chunk in chunks:
                self.remaining()
                if done + len(chunk) > size:
                    destination.unlink(missing_ok=True)
                    raise StoreError(f"{self.what}: more than the {size} bytes the manifest declares; "
                                     "download stopped and removed")
                dst.write(chunk)
                done += len(chunk)
                progress(len(chunk))


class LocalStore:
    def __init__(self, root: str | os.PathLike, transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S) -> None:
        self.root = Path(root)
        self.transfer_timeout_s = transfer_timeout_s

    def describe(self) -> str:
        return f"dir:{self.root}"

    def read_manifest(self, model: str) -> bytes:
        path = self.root / validate_model_name(model) / MANIFEST_NAME
        try:
            return read_regular(path, MAX_MANIFEST_BYTES, "manifest")
        except FileNotFoundError:
            raise StoreError(f"model {model!r} is not in the store {self.root}") from None

    def fetch(self, model: str, file: str, destination: Path, size: int, progress: Progress) -> None:
        source = self.root / validate_model_name(model) / file
        transfer = _Transfer(str(source), self.transfer_timeout_s)
        fd, actual = open_regular(source)
        with os.fdopen(fd, "rb") as src:
            if actual != size:
                raise CheckpointError(source, "size", f"file has {actual} bytes, manifest says {size}")
            done = destination.stat().st_size if destination.exists() else 0
            src.seek(done)
            transfer.write(iter(lambda: src.read(8 << 20), b""), destination, done, size, progress)


class HttpStore:
    """GET BASE/MODEL/FILE; interrupted transfers resume with a Range request. `timeout` bounds each connect
    and read, `transfer_timeout_s` the whole of one manifest read or file download, retries included."""

    def __init__(self, base_url: str, attempts: int = 5, timeout: float = 30.0,
                 transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S) -> None:
        self.base = base_url.rstrip("/")
        self.attempts, self.timeout, self.transfer_timeout_s = attempts, timeout, transfer_timeout_s
        self.session = requests.Session()

    def describe(self) -> str:
        return self.base

    def _url(self, model: str, file: str) -> str:
        return f"{self.base}/{validate_model_name(model)}/{file}"

    def _get(self, url: str, transfer: _Transfer, headers: dict[str, str] | None = None) -> requests.Response:
        # identity: the byte bounds apply to what is written; each read waits at most what is left of the deadline
        return self.session.get(url, headers={"Accept-Encoding": "identity", **(headers or {})}, stream=True,
                                timeout=(self.timeout, min(self.timeout, transfer.remaining())))

    @staticmethod
    def _chunks(response: requests.Response, amount: int = 256 << 10) -> Iterator[bytes]:
        """What the socket has now (read1), not a full buffer, so the deadline is checked as bytes trickle in."""
        while chunk := response.raw.read1(amount):
            yield chunk

    def read_manifest(self, model: str) -> bytes:
        url = self._url(model, MANIFEST_NAME)
        transfer = _Transfer(f"GET {url}", self.transfer_timeout_s)
        with self._get(url, transfer) as response:
            if response.status_code == 404:
                raise StoreError(f"model {model!r} is not in the store {self.base}")
            response.raise_for_status()
            body = bytearray()
            for chunk in self._chunks(response):
                transfer.remaining()
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise StoreError(f"GET {url}: manifest exceeds the {MAX_MANIFEST_BYTES} byte limit; "
                                     "not read further")
            return bytes(body)

    def fetch(self, model: str, file: str, destination: Path, size: int, progress: Progress) -> None:
        url = self._url(model, file)
        transfer = _Transfer(f"GET {url}", self.transfer_timeout_s)
        for attempt in range(1, self.attempts + 1):
            done = destination.stat().st_size if destination.exists() else 0
            if done >= size:
                return
            headers = {"Range": f"bytes={done}-"} if done else {}
            try:
                with self._get(url, transfer, headers) as response:
                    if response.status_code == 200 and done:  # server ignored the range: start over
                        destination.unlink()
                        done = 0
                    elif response.status_code not in (200, 206):
                        raise StoreError(f"GET {url}: HTTP {response.status_code}")
                    transfer.write(self._chunks(response), destination, done, size, progress)
                if destination.stat().st_size >= size:
                    return
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    urllib3.exceptions.HTTPError):
                if attempt == self.attempts:
                    raise StoreError(f"GET {url} failed {attempt} times") from None
                time.sleep(min(0.1 * 2**attempt, 2.0, transfer.remaining()))
        raise StoreError(f"GET {url}: incomplete after {self.attempts} attempts")


def open_store(location: str, transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S) -> RemoteStore:
    if location.startswith(("http://", "https://")):
        return HttpStore(location, transfer_timeout_s=transfer_timeout_s)
    if not Path(location).is_dir():
        raise StoreError(f"remote store {location} is neither an http(s) URL nor a directory")
    return LocalStore(location, transfer_timeout_s)


STAGE_CHUNK = 16 << 20
STAGE_THREADS = 4
# Onto a tmpfs of 2 MiB pages each worker allocates its chunk's pages before its read: more workers keep the
# disk's queue as deep while some of them allocate (1 GiB: 0.448 s with 8, 0.45-0.88 s with 4; Intel SPR host).
MAPPED_STAGE_THREADS = 8
# Files copied at once. A tmpfs file's pages are allocated under its inode lock, one core's work (fallocate of
# 1 GiB: 0.25 s, as long as the disk's O_DIRECT read of it), so two files use both cores: 4 x 256 MiB took
# 0.371 s two at a time against 0.457 s one after another (medians of 6, Zen 5 host, 2026-12-01).
STAGE_FILES = 2
_ALIGN = mmap.PAGESIZE  # O_DIRECT offsets, lengths and buffers: multiples of the logical block size (<= a page)


def _pages(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class StagingPlan:
    """How the files of one staging land in their directory: the pages its tmpfs gives (`tmpfs_huge_pages`) and,
    for huge pages, the one watch they share. Memory is measured once, and once huge pages come slow every file
    goes on in 4 KiB pages: a 140 GB model is 140 partition files, each of which would otherwise pay 8 slow pieces
    to find out again."""
    huge: str                    # "always", "advise" or "never"
    watch: HugePageWatch | None  # None for 4 KiB pages


def staging_plan(directory: Path) -> StagingPlan:
    huge = tmpfs_huge_pages(directory)
    return StagingPlan(huge, None if huge == "never" else huge_page_watch(measure_memory()))


def copy_file(source: Path, destination: Path, progress: Progress, *, chunk: int = STAGE_CHUNK,
              threads: int | None = None, plan: StagingPlan | None = None) -> None:
    """SSD -> DRAM staging copy at the disk's O_DIRECT bandwidth; `progress` is called from this thread only.

    A kernel copy (sendfile, `cp`) is one stream through the page cache: read-ahead is its only queue depth
    (~72% of the parallel O_DIRECT bandwidth here) and the source lands in the page cache as a second copy of
    the model. Here `threads` workers each copy one chunk at a time with O_DIRECT preads, so the disk always
    has requests in flight, into one page-aligned buffer per worker, reused for every chunk, and pwrite it at
    the same offset. The buffers are huge pages: the kernel pins 8 pages per 16 MiB read instead of 4,096, and
    the copy into the destination crosses few TLB entries. Onto a memory filesystem (the DRAM tier's tmpfs)
    this beats reading straight into the destination mapped shared (each of its 4 KiB pages then costs a
    fault, with MADV_POPULATE_WRITE or in the read): 0.53 s against 0.76 s for a 0.94 GB partition, medians
    of 9 interleaved copies on a 2-vCPU AMD EPYC (2026-12-01), where the same workers with 4 KiB buffers took
    0.93 s. Where O_DIRECT is refused (a tmpfs source, some network filesystems) the same plan runs buffered.

    Onto a tmpfs that gives 2 MiB pages (`tmpfs_huge_pages`: mounted huge=advise, within_size or always) the
    reads land straight in the destination mapped shared instead, each chunk's pages allocated first
    (`_MappedLanding`): 512 page allocations a GiB, no copy. Where fresh memory is host-backed (bare metal, or a
    VM's recently freed memory) 1 GiB took 0.448 s against the disk's O_DIRECT 0.426 s (95%), where the buffered
    plan took 0.548 s onto 4 KiB pages and 1.12 s onto 2 MiB ones (medians of 7 interleaved, Intel SPR host,
    2026-12-01). `threads` defaults to the plan's; `plan` (what `staging_plan` finds for the destination's
    directory) is shared by the files of one staging.
    """
    if chunk <= 0 or chunk % _ALIGN:
        raise ValueError(f"chunk must be a positive multiple of {_ALIGN}, got {chunk}")
    fd, direct = open_for_reading(source)
    plain = open_regular(source)[0] if direct else fd  # for a remainder that a short direct read left unaligned
    try:
        size = os.fstat(fd).st_size
        plan = (plan or staging_plan(destination.parent)) if direct and size else StagingPlan("never", None)
        huge = plan.huge
        threads = threads or (STAGE_THREADS if huge == "never" else MAPPED_STAGE_THREADS)
        with open(destination, "w+b") as dst:  # truncated; the chunks' writes cover every byte up to `size`
            if size:
                workers = max(1, min(threads, -(-size // chunk)))
                # huge=always/within_size give writes huge pages too: no buffered plan to fall back on
                buffered = _BufferedLanding(dst.fileno(), chunk, workers) if huge != "always" else None
                landing = buffered if huge == "never" else _MappedLanding(dst.fileno(), size, destination, buffered,
                                                                          plan.watch)
                with landing:
                    _copy_chunks(fd, plain, direct, size, progress, chunk, workers, str(source), landing)
    finally:
        os.close(fd)
        if plain != fd:
            os.close(plain)
    shutil.copystat(source, destination)


def copy_files(pairs: list[tuple[Path, Path]], progress: Progress, *, files: int = STAGE_FILES) -> None:
    """`copy_file` for each (source, destination), `files` at a time, with one `staging_plan` per destination
    directory; `progress` is still called from this thread only. The first failure is raised once the copies under
    way have stopped; the others are not started."""
    reports: queue.SimpleQueue[int] = queue.SimpleQueue()

    def drain() -> None:
        while not reports.empty():
            progress(reports.get())

    plans = {directory: staging_plan(directory) for directory in {destination.parent for _, destination in pairs}}
    pool = ThreadPoolExecutor(max(1, min(files, len(pairs))), thread_name_prefix="stage-file")
    try:
        pending = {pool.submit(copy_file, source, destination, reports.put, plan=plans[destination.parent])
                   for source, destination in pairs}
        while pending:
            done, pending = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    drain()


class _BufferedLanding:
    """Chunks are read into one of `count` reused aligned buffers, then written at their offset."""

    def __init__(self, dst: int, chunk: int, count: int) -> None:
        self.dst = dst
        self.buffers: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(count):
            self.buffers.put(memoryview(allocate_buffer(chunk)))  # huge pages, no fresh memory per chunk

    def __enter__(self) -> _BufferedLanding:
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # the buffers go with the last reference to them

    @contextmanager
    def __call__(self, offset: int, length: int) -> Iterator[memoryview]:
        view = self.buffers.get()
        try:
            yield view
            written = 0
            while written < length:
                written += os.pwrite(self.dst, view[written:length], offset + written)
        finally:
            self.buffers.put(view)


class _MappedLanding:
    """Chunks are read straight into the destination file mapped shared, each chunk's pages allocated first, 2 MiB
    at a time while huge pages come fast (`watch`, the staging's `HugePageWatch`, against 4 KiB pages measured
    when the staging began).

    A VM whose balloon reports free memory to the host backs a fresh huge page with 512 host faults: 1 GiB then
    took 2.0-2.3 s this way against 0.61 s through the buffered plan onto 4 KiB pages. Once huge pages come slow,
    the rest goes through `fallback` (the buffered plan: a tmpfs mounted huge=advise gives writes 4 KiB pages),
    or, with none (huge=always or within_size give writes huge pages too), is read into the mapping advised for
    4 KiB pages. The file is sized to whole pages while mapped, so a direct read of the last chunk (whole
    pages, short at the source's end) stays inside the mapping, then truncated to `size`."""

    def __init__(self, dst: int, size: int, path: Path, fallback: _BufferedLanding | None,
                 watch: HugePageWatch) -> None:
        self.dst, self.size, self.path, self.fallback, self.watch = dst, size, path, fallback, watch
        os.ftruncate(dst, _pages(size))
        self.map = mmap.mmap(dst, _pages(size), mmap.MAP_SHARED)
        self.map.madvise(mmap.MADV_HUGEPAGE)  # huge=advise gives huge pages only so
        self.view = memoryview(self.map)

    def __enter__(self) -> _MappedLanding:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.view.release()
            self.map.close()
        except BufferError:  # code that kept a slice (a wrapped read) holds the mapping until it is collected
            pass
        os.ftruncate(self.dst, self.size)

    @contextmanager
    def __call__(self, offset: int, length: int) -> Iterator[memoryview]:
        if not (self.watch.small_pages and self.fallback):
            try:  # the chunk's pages are allocated before its read (after the switch: by the read, 4 KiB each)
                self.watch.fault_in(self.map, offset, _pages(length))
            except OSError as exc:
                if exc.errno == errno.EFAULT:  # the tmpfs is full: its page faults fail (SIGBUS for a write)
                    raise OSError(errno.ENOSPC, f"no room for bytes {offset}-{offset + length} in the tmpfs "
                                                "(MADV_POPULATE_WRITE: EFAULT)", str(self.path)) from None
                raise
        if self.watch.small_pages and self.fallback:
            with self.fallback(offset, length) as view:
                yield view
            return
        with self.view[offset:offset + _pages(length)] as view:
            yield view


def _copy_chunks(fd: int, plain: int, direct: bool, size: int, progress: Progress, chunk: int, threads: int,
                 path: str, landing: Callable) -> None:
    def copy_one(offset: int) -> int:
        length = min(chunk, size - offset)
        with landing(offset, length) as view:
            done = 0
            while done < length:
                aligned = direct and done % _ALIGN == 0
                want = _pages(length - done) if aligned else length - done  # past EOF: a short read
                count = os.preadv(fd if aligned else plain, [view[done:done + want]], offset + done)
                if count == 0:
                    raise OSError(errno.EIO, f"unexpected end of file at byte {offset + done}", path)
                done += count
        return length

    pool = ThreadPoolExecutor(threads, thread_name_prefix="stage-copy")
    try:
        for future in as_completed([pool.submit(copy_one, offset) for offset in range(0, size, chunk)]):
            progress(future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, stop the chunks not started yet
