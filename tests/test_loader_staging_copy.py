"""The node loader's SSD -> DRAM copy (sllm_faas.runtime.node_loader.store.copy_file): pipelined O_DIRECT reads
into reused aligned huge-page buffers, written at the same offsets, or, onto a tmpfs of 2 MiB pages, straight
into the destination mapped shared.
Byte-identical output whatever the size, the chunking, the thread count, the destination's filesystem (disk,
tmpfs, tmpfs mounted huge=within_size), or whether the source filesystem takes O_DIRECT."""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tmpfs import mounted_tmpfs

import sllm_faas.runtime.loader.direct as direct_module
import sllm_faas.runtime.loader.tiers as tiers_module
import sllm_faas.runtime.node_loader.store as store_module
from sllm_faas.runtime.checkpoint.format import CheckpointError
from sllm_faas.runtime.loader.direct import HugePageWatch
from sllm_faas.runtime.loader.tiers import mount_options, tmpfs_huge_pages
from sllm_faas.runtime.node_loader.store import copy_file, copy_files

PAGE = mmap.PAGESIZE
CHUNK = 4 * PAGE


def disk_dir(tmp_path: Path) -> Path:
    """/var/tmp when writable: a disk that takes O_DIRECT, where pytest's tmp_path may be on tmpfs."""
    return Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else tmp_path


@pytest.fixture
def source_dir(tmp_path):
    directory = Path(tempfile.mkdtemp(prefix="sllm-copy-test-", dir=disk_dir(tmp_path)))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def write_source(directory: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = directory / f"src-{size}.bin"
    path.write_bytes(data)
    return path, data


class Progress:
    """Records every progress call and the thread that made it."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[int] = set()

    def __call__(self, nbytes: int) -> None:
        self.calls.append(nbytes)
        self.threads.add(threading.get_ident())


@pytest.fixture(params=["disk", "tmpfs", "huge-tmpfs"])
def target_dir(request, tmp_path):
    """Where the copy lands: a disk folder or tmpfs, the DRAM tier's kind of filesystem, with 4 KiB or 2 MiB
    pages."""
    if request.param == "disk":
        root = disk_dir(tmp_path)
    elif request.param == "tmpfs":
        if not (Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK)):
            pytest.skip("no writable /dev/shm")
        root = Path("/dev/shm")
    else:
        root = request.getfixturevalue("huge_tmpfs")
    directory = Path(tempfile.mkdtemp(prefix="sllm-copy-out-", dir=root))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class MappedLandings(store_module._MappedLanding):
    """The real mapped landing, counted."""

    made = 0
    watches: list = []

    def __init__(self, dst: int, size: int, path: Path, fallback, watch) -> None:
        type(self).made += 1
        type(self).watches.append(watch)
        super().__init__(dst, size, path, fallback, watch)


@pytest.fixture
def mapped_landings(monkeypatch) -> type[MappedLandings]:
    monkeypatch.setattr(store_module, "_MappedLanding", MappedLandings)
    monkeypatch.setattr(MappedLandings, "made", 0)
    monkeypatch.setattr(MappedLandings, "watches", [])
    return MappedLandings


@contextmanager
def huge_capable_tmpfs(point: Path, options: str) -> Iterator[Path]:
    """`mounted_tmpfs` at the new directory `point`; skipped where this kernel or process keeps every tmpfs in
    4 KiB pages (shmem_enabled deny, THP disabled) unless `options` ask for that."""
    point.mkdir()
    with mounted_tmpfs(point, options):
        if "huge=never" not in options and tmpfs_huge_pages(point) == "never":
            pytest.skip("this kernel or process keeps tmpfs in 4 KiB pages (shmem_enabled deny, or THP disabled)")
        yield point


def mapped_plan_possible(source_dir: Path) -> None:
    """The mapped plan reads the source with O_DIRECT: skip where its filesystem refuses it."""
    probe, _ = write_source(source_dir, PAGE)
    fd, direct = direct_module.open_for_reading(probe)
    os.close(fd)
    if not direct:
        pytest.skip(f"{source_dir} does not take O_DIRECT")


def huge_pages_backing(path: Path) -> int:
    """Bytes of `path` mapped with 2 MiB page table entries once every page is touched (/proc/self/smaps,
    ShmemPmdMapped of that mapping): whether its pages are huge pages."""
    size = path.stat().st_size
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapping:
        mapping.madvise(mmap.MADV_HUGEPAGE)
        sum(mapping[offset] for offset in range(0, size, PAGE))
        start = None
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip().endswith(str(path)):
                    start = int(line.split("-")[0], 16)
        assert start is not None, f"{path} is not mapped"
        with open("/proc/self/smaps") as smaps:
            blocks = smaps.read().split("\n")
        inside = False
        for line in blocks:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = int(line.split("-")[0], 16) == start
            elif inside and line.startswith("ShmemPmdMapped:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("huge", ["within_size", "always", "advise"])
def test_onto_a_tmpfs_of_huge_pages_the_reads_land_in_the_mapped_file(source_dir, tmp_path, mapped_landings,
                                                                     monkeypatch, huge):
    mapped_plan_possible(source_dir)
    # huge pages however slow they come (idle memory on a VM makes them slow, and the watch would switch)
    monkeypatch.setattr(store_module, "huge_page_watch", lambda probe: HugePageWatch(0.0))
    with huge_capable_tmpfs(tmp_path / "huge", f"huge={huge},size=64m") as point:
        source, data = write_source(source_dir, (16 << 20) + 4 * PAGE + 5)
        copy_file(source, point / "out.bin", Progress())
        assert mapped_landings.made == 1
        assert (point / "out.bin").read_bytes() == data
        assert huge_pages_backing(point / "out.bin") >= 16 << 20  # advise too: the copy advised it
        if Path("/dev/shm").is_dir() and tmpfs_huge_pages("/dev/shm") == "never":  # the buffered plan
            directory = Path(tempfile.mkdtemp(prefix="sllm-copy-out-", dir="/dev/shm"))
            try:
                copy_file(source, directory / "out.bin", Progress())
                assert (directory / "out.bin").read_bytes() == data
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            assert mapped_landings.made == 1


@pytest.mark.parametrize(("huge", "plan"), [("advise", "huge=advise"), ("always", "huge=within_size")])
def test_when_huge_pages_come_slow_the_rest_gets_4_kib_pages(source_dir, tmp_path, mapped_landings, monkeypatch,
                                                             huge, plan):
    """A VM that handed free memory back to its host backs each fresh huge page with 512 host faults. Once the
    watch sees that (here: at once, its floor unreachable), the rest of a copy onto a huge=advise tmpfs goes
    through the buffered plan, whose writes get 4 KiB pages there; onto huge=within_size (writes would get
    huge pages too) it is read into the mapping advised for 4 KiB pages."""
    mapped_plan_possible(source_dir)
    monkeypatch.setattr(store_module, "huge_page_watch", lambda probe: HugePageWatch(float("inf"), patience=1))
    with huge_capable_tmpfs(tmp_path / "t", f"{plan},size=64m") as point:
        assert tmpfs_huge_pages(point) == huge
        source, data = write_source(source_dir, 3 * (16 << 20) + PAGE + 3)
        progress = Progress()
        copy_file(source, point / "out.bin", progress)
        assert mapped_landings.made == 1
        assert (point / "out.bin").read_bytes() == data and sum(progress.calls) == len(data)
        # at most each worker's first 2 MiB piece, timed before the switch was seen
        assert huge_pages_backing(point / "out.bin") <= store_module.MAPPED_STAGE_THREADS * (2 << 20)


def test_the_files_of_one_staging_share_one_memory_measurement_and_one_watch(source_dir, tmp_path, mapped_landings,
                                                                              monkeypatch):
    """copy_files measures memory once per destination directory, and its files share the watch: once huge pages
    come slow (here: at the first piece), the files started after that copy onto 4 KiB pages from their start."""
    mapped_plan_possible(source_dir)
    measured = []
    monkeypatch.setattr(store_module, "measure_memory", lambda: measured.append(1))
    monkeypatch.setattr(store_module, "huge_page_watch", lambda probe: HugePageWatch(float("inf"), patience=1))
    with huge_capable_tmpfs(tmp_path / "t", "huge=within_size,size=256m") as point:
        sources = [write_source(source_dir, 2 * (16 << 20) + i) for i in range(3)]
        copy_files([(source, point / str(i)) for i, (source, _) in enumerate(sources)], Progress(), files=1)
        assert len(measured) == 1 and mapped_landings.made == 3 and len(set(map(id, mapped_landings.watches))) == 1
        for i, (_, data) in enumerate(sources):
            assert (point / str(i)).read_bytes() == data
        assert huge_pages_backing(point / "1") == huge_pages_backing(point / "2") == 0  # started after the switch


@pytest.mark.parametrize("huge", ["within_size", "never"])
def test_a_full_tmpfs_fails_the_copy_with_an_error_not_a_crash(source_dir, tmp_path, mapped_landings, huge):
    """A DRAM tier that fills up mid-copy: the mapped plan allocates each chunk's pages before its read, so a
    tmpfs out of space is ENOSPC naming the file there, never a SIGBUS on a write into the mapping; the buffered
    plan's pwrite gets ENOSPC."""
    mapped_plan_possible(source_dir)
    with huge_capable_tmpfs(tmp_path / "small", f"huge={huge},size=8m") as point:
        source, _ = write_source(source_dir, 3 * (16 << 20) + 5)
        with pytest.raises(OSError) as failure:
            copy_file(source, point / "out.bin", Progress())
        assert failure.value.errno == errno.ENOSPC, failure.value
        assert mapped_landings.made == (huge != "never")
        if huge != "never":
            assert failure.value.filename == str(point / "out.bin")


# proc(5)'s /proc/pid/mountinfo lines: ID, parent ID, major:minor, root, mount point, options, optional fields,
# "-", filesystem type, source, super options. Mount points escape space, tab, newline and backslash as octal;
# other bytes come as they are, UTF-8 or not.
MOUNTINFO = (
    b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    b"25 22 0:21 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,inode64\n"
    b"40 25 0:33 / /dev/shm/sllm rw,relatime shared:20 - tmpfs sllm rw,size=4194304k,inode64,huge=within_size\n"
    b"41 22 0:34 / /mnt/my\\040tier\xff\xc2\xa0x rw,relatime - tmpfs tier rw,huge=always\n"
    b"42 40 0:35 / /dev/shm/sllm rw,relatime - tmpfs over rw,inode64\n"
    b"43 22 0:33 /models /srv/models rw - tmpfs sllm rw,size=4194304k,inode64,huge=within_size\n"
)


@pytest.mark.parametrize(("device", "options"), [
    ((0, 21), ["rw", "inode64"]),
    ((0, 33), ["rw", "size=4194304k", "inode64", "huge=within_size"]),  # hidden under 42, bound at /srv/models
    ((0, 34), ["rw", "huge=always"]),  # a mount point that is not UTF-8, with a no-break space in it
    ((0, 35), ["rw", "inode64"]),
    ((8, 1), ["rw"]),
    ((0, 99), []),
])
def test_mount_options_are_those_of_the_paths_device(device, options):
    assert mount_options(MOUNTINFO, os.makedev(*device)) == options


def test_shmem_enabled_force_makes_every_tmpfs_huge(tmp_path, monkeypatch):
    setting = tmp_path / "shmem_enabled"
    setting.write_text("always within_size advise never deny [force]\n")
    monkeypatch.setattr(tiers_module, "SHMEM_ENABLED", setting)
    if Path("/dev/shm").is_dir():
        assert tmpfs_huge_pages("/dev/shm") == "always"
    assert tmpfs_huge_pages(disk_dir(tmp_path)) == "never"  # not a tmpfs


def test_shmem_enabled_deny_overrides_a_huge_mount(tmp_path, monkeypatch, huge_tmpfs):
    setting = tmp_path / "shmem_enabled"
    setting.write_text("always within_size advise never [deny] force\n")
    monkeypatch.setattr(tiers_module, "SHMEM_ENABLED", setting)
    assert tmpfs_huge_pages(huge_tmpfs) == "never"


@pytest.mark.parametrize("size", [0, 1, 511, PAGE - 1, PAGE, PAGE + 1, CHUNK - 1, CHUNK, CHUNK + 1,
                                  7 * CHUNK + 3 * PAGE + 17])
@pytest.mark.parametrize("threads", [1, 3])
def test_copy_is_byte_identical_with_odd_sizes_and_tails(source_dir, target_dir, size, threads):
    source, data = write_source(source_dir, size)
    target = target_dir / "out.bin"
    progress = Progress()
    copy_file(source, target, progress, chunk=CHUNK, threads=threads)
    assert target.read_bytes() == data
    assert sum(progress.calls) == size
    assert all(0 < n <= CHUNK for n in progress.calls)
    assert progress.threads <= {threading.get_ident()}  # progress is reported from the caller's thread only
    assert os.stat(target).st_mtime == pytest.approx(os.stat(source).st_mtime)


def test_default_chunking_copies_a_multi_chunk_file(source_dir, tmp_path):
    source, data = write_source(source_dir, (40 << 20) + 12345)  # 3 default chunks, unaligned tail
    copy_file(source, tmp_path / "out.bin", Progress())
    assert (tmp_path / "out.bin").read_bytes() == data


def test_overwrites_a_longer_destination(source_dir, target_dir):
    source, data = write_source(source_dir, CHUNK + 5)
    target = target_dir / "out.bin"
    target.write_bytes(b"x" * (5 * CHUNK))
    copy_file(source, target, Progress(), chunk=CHUNK)
    assert target.read_bytes() == data


def test_source_refusing_o_direct_is_copied_buffered(source_dir, tmp_path, monkeypatch):
    """Some filesystems refuse O_DIRECT at open (EINVAL): the same plan then runs buffered, unaligned reads
    included."""
    opened = []
    real_open_regular = direct_module.open_regular

    def refuse_direct(path, field_name="file", flags=0):
        opened.append(flags)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open_regular(path, field_name, flags)

    monkeypatch.setattr(direct_module, "open_regular", refuse_direct)
    source, data = write_source(source_dir, 5 * CHUNK + 777)
    copy_file(source, tmp_path / "out.bin", Progress(), chunk=CHUNK, threads=2)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert opened[0] & os.O_DIRECT and not opened[-1] & os.O_DIRECT


def test_tmpfs_source_is_copied(tmp_path):
    """/dev/shm is the DRAM tier's kind of filesystem: whether or not this kernel's tmpfs takes O_DIRECT, the
    copy is exact."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        pytest.skip("no writable /dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="sllm-copy-test-", dir=shm))
    try:
        source, data = write_source(directory, 3 * CHUNK + 1)
        copy_file(source, tmp_path / "out.bin", Progress(), chunk=CHUNK, threads=2)
        assert (tmp_path / "out.bin").read_bytes() == data
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_short_direct_read_mid_file_continues_buffered(source_dir, target_dir, monkeypatch):
    """A direct read that returns less than asked, not at the end of the file, leaves an unaligned offset that
    O_DIRECT cannot continue from: the rest of that chunk comes from the buffered descriptor."""
    source, data = write_source(source_dir, 3 * CHUNK)
    real_preadv = os.preadv
    shortened = []

    def short_read(fd, buffers, offset):
        view = memoryview(buffers[0])
        if not shortened and offset == CHUNK and len(view) == CHUNK:
            shortened.append(fd)
            got = real_preadv(fd, [view[:PAGE]], offset)  # aligned, then pretend only 100 bytes arrived
            return min(got, 100)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", short_read)
    copy_file(source, target_dir / "out.bin", Progress(), chunk=CHUNK, threads=1)
    assert shortened, "the injected short read never happened"
    assert (target_dir / "out.bin").read_bytes() == data


def test_truncated_source_fails_and_reports_the_file(source_dir, target_dir, monkeypatch):
    source, _ = write_source(source_dir, 3 * CHUNK)
    real_fstat = os.fstat

    def larger(fd):  # the size the copy plans for is more than the file holds: it must not pad with zeros
        result = real_fstat(fd)
        return os.stat_result((*result[:6], result.st_size + CHUNK, *result[7:]))

    monkeypatch.setattr(os, "fstat", larger)
    with pytest.raises(OSError, match="unexpected end of file"):
        copy_file(source, target_dir / "out.bin", Progress(), chunk=CHUNK, threads=2)


def test_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError):
        copy_file(fifo, tmp_path / "out.bin", Progress())


def test_chunk_must_be_page_aligned(source_dir, tmp_path):
    source, _ = write_source(source_dir, 10)
    with pytest.raises(ValueError, match="multiple"):
        copy_file(source, tmp_path / "out.bin", Progress(), chunk=PAGE + 1)


def test_several_files_are_copied_two_at_a_time_with_progress_on_the_callers_thread(source_dir, target_dir):
    sizes = [0, 1, PAGE + 3, 5 * (16 << 20) // 4 + 7, 3 << 20]
    sources = [write_source(source_dir, size) for size in sizes]
    progress: list[tuple[int, int]] = []
    pairs = [(path, target_dir / path.name) for path, _ in sources]
    copy_files(pairs, lambda n: progress.append((threading.get_ident(), n)))
    for (path, data), (_, destination) in zip(sources, pairs, strict=True):
        assert destination.read_bytes() == data, path
    assert sum(n for _, n in progress) == sum(sizes)
    assert {ident for ident, _ in progress} == {threading.get_ident()}


def test_a_failed_file_fails_the_copy_and_names_it(source_dir, target_dir):
    good, _ = write_source(source_dir, 3 << 20)
    missing = source_dir / "missing.bin"
    with pytest.raises(OSError) as failure:
        copy_files([(good, target_dir / good.name), (missing, target_dir / missing.name)], lambda n: None,
                   files=1)
    assert "missing.bin" in str(failure.value)
