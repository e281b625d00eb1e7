"""The CPU strategy of `load(strategy="auto")` is decided by the memory probe's measurements (injected here,
never timed) and by where the files are; the probe itself runs once per process."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import sllm_faas.runtime.loader.direct as direct_module
import sllm_faas.runtime.loader.mapped as mapped_module
import sllm_faas.runtime.loader.policy as policy
from sllm_faas.runtime.checkpoint import read_manifest, save_state_dict
from sllm_faas.runtime.loader import load
from sllm_faas.runtime.loader.policy import MemoryProbe, choose, cpu_strategy
from sllm_faas.runtime.loader.tiers import current_tier, fully_cached, on_memory_filesystem

HOST_BACKED = MemoryProbe(hugepage_gbps=11.6, small_gbps=2.5)  # recycled memory on the development VM
REPORTED = MemoryProbe(hugepage_gbps=0.45, small_gbps=2.4)  # after the balloon handed free memory back
NO_HUGE_PAGES = MemoryProbe(hugepage_gbps=2.5, small_gbps=2.4)  # THP off or fragmented: both probes get 4 KiB


@pytest.mark.parametrize(("probe", "expected"), [(HOST_BACKED, "direct"), (REPORTED, "direct-4k"),
                                                 (NO_HUGE_PAGES, "direct-4k"),
                                                 (MemoryProbe(policy.DIRECT_MARGIN * 3.0, 3.0), "direct"),
                                                 (MemoryProbe(policy.DIRECT_MARGIN * 3.0 - 0.01, 3.0), "direct-4k"),
                                                 (MemoryProbe(0.0, 2.0), "direct-4k")])
def test_choice_follows_the_measurements(probe, expected):
    assert choose(probe) == expected


@pytest.fixture
def disk_checkpoint(tmp_path):
    """A checkpoint on a disk (/var/tmp when writable, else tmp_path), its pages dropped from the cache."""
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else tmp_path
    root = Path(tempfile.mkdtemp(prefix="sllm-policy-test-", dir=base))
    torch.manual_seed(0)
    state = {"w": torch.randn(300, 517), "b": torch.arange(7)}
    directory = root / "model"
    save_state_dict(state, directory)
    if on_memory_filesystem(directory):
        shutil.rmtree(root)
        pytest.skip("no disk-backed directory to test a load from disk")
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    yield directory, state
    shutil.rmtree(root, ignore_errors=True)


def spy_strategies(monkeypatch) -> list[str]:
    """Record which strategy module `load` called, still running the real one."""
    called: list[str] = []
    real_read, real_map = direct_module.read_partitions, mapped_module.map_partitions

    def read(*args, **kwargs):
        if not kwargs.get("direct", True):
            called.append("buffered")
        else:
            called.append("direct" if kwargs.get("hugepages", True) else "direct-4k")
        return real_read(*args, **kwargs)

    def mapped(*args, **kwargs):
        called.append("mmap")
        return real_map(*args, **kwargs)

    monkeypatch.setattr(direct_module, "read_partitions", read)
    monkeypatch.setattr(mapped_module, "map_partitions", mapped)
    return called


def uncached(directory: Path) -> bool:
    return current_tier(directory, read_manifest(directory)) == "ssd"


@pytest.mark.parametrize(("probe", "expected"), [(HOST_BACKED, "direct"), (REPORTED, "direct-4k")])
def test_auto_load_from_disk_uses_the_probes_choice(disk_checkpoint, monkeypatch, probe, expected):
    directory, state = disk_checkpoint
    if not uncached(directory):
        pytest.skip("the page cache kept the files (could not make them cold)")
    monkeypatch.setattr(policy, "memory_probe", lambda: probe)
    called = spy_strategies(monkeypatch)
    tensors = load(directory)
    assert called == [expected]
    assert torch.equal(tensors["w"], state["w"]) and torch.equal(tensors["b"], state["b"])


def test_files_in_memory_are_mapped_whatever_the_probe(tmp_path, monkeypatch):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    root = Path(tempfile.mkdtemp(prefix="sllm-policy-test-", dir=shm))
    try:
        directory = root / "model"
        save_state_dict({"w": torch.ones(1000)}, directory)
        probed = []
        monkeypatch.setattr(policy, "memory_probe", lambda: probed.append(1) or HOST_BACKED)
        assert cpu_strategy(directory, read_manifest(directory)) == "mmap"
        assert not probed  # nothing to copy: no probe
        called = spy_strategies(monkeypatch)
        assert torch.equal(load(directory)["w"], torch.ones(1000)) and called == ["mmap"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_explicit_strategies_skip_the_probe(disk_checkpoint, monkeypatch):
    directory, state = disk_checkpoint
    monkeypatch.setattr(policy, "memory_probe", lambda: pytest.fail("probe ran for an explicit strategy"))
    called = spy_strategies(monkeypatch)
    for strategy in ("mmap", "direct", "direct-4k", "buffered"):
        assert torch.equal(load(directory, strategy=strategy)["w"], state["w"])
    assert called == ["mmap", "direct", "direct-4k", "buffered"]


def test_probe_measures_both_page_sizes_once_per_process(monkeypatch):
    measured = []

    def fake_first_touch(size, hugepages):
        measured.append((size, hugepages))
        return 10.0 if hugepages else 2.0

    monkeypatch.setattr(policy, "first_touch_gbps", fake_first_touch)
    monkeypatch.setattr(policy, "transparent_hugepages_available", lambda: True)
    policy.memory_probe.cache_clear()
    try:
        assert policy.memory_probe() == MemoryProbe(10.0, 2.0)
        assert policy.memory_probe() == MemoryProbe(10.0, 2.0)
        assert measured == [(policy.HUGE_PROBE_BYTES, True), (policy.SMALL_PROBE_BYTES, False)]
    finally:
        policy.memory_probe.cache_clear()


def test_without_transparent_huge_pages_the_probe_picks_small_pages(monkeypatch, tmp_path):
    thp = tmp_path / "enabled"
    thp.write_text("always madvise [never]\n")
    monkeypatch.setattr(policy, "THP_ENABLED", thp)
    monkeypatch.setattr(policy, "first_touch_gbps", lambda size, hugepages: 2.0)
    policy.memory_probe.cache_clear()
    try:
        probe = policy.memory_probe()
        assert probe.hugepage_gbps == 0.0 and choose(probe) == "direct-4k"
    finally:
        policy.memory_probe.cache_clear()


def test_real_probe_returns_positive_rates():
    """The real measurement runs (values are the machine's, not checked beyond being rates)."""
    assert policy.first_touch_gbps(policy.SMALL_PROBE_BYTES, hugepages=False) > 0
    assert policy.first_touch_gbps(policy.HUGE_PROBE_BYTES, hugepages=True) > 0


def read_until_cached(handle, path: Path, attempts: int = 3) -> bool:
    """Read the whole file and ask whether it is cached, up to `attempts` times: on a loaded VM whose kernel pages
    out cold memory (DAMON pageout), a page can go between the read and the question."""
    for _ in range(attempts):
        handle.seek(0)
        handle.read()
        if fully_cached(path):
            return True
    return False


def test_fully_cached_finds_a_missing_page_in_any_part_of_the_file(tmp_path):
    """mincore(2) is asked in 16 MiB steps and stops at the first step with a missing page: pages missing only
    from the last step of a 40 MiB file still make it not cached."""
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else tmp_path
    root = Path(tempfile.mkdtemp(prefix="sllm-policy-test-", dir=base))
    try:
        path = root / "data.bin"
        path.write_bytes(os.urandom(40 << 20))
        if on_memory_filesystem(path):
            pytest.skip("no disk-backed directory: every page is resident")
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
            assert read_until_cached(handle, path)
            os.posix_fadvise(handle.fileno(), 36 << 20, 4 << 20, os.POSIX_FADV_DONTNEED)  # whole large folios
            if fully_cached(path):
                pytest.skip("the page cache kept the last pages (could not evict them)")
            assert read_until_cached(handle, path)
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert not fully_cached(path)
        empty = root / "empty.bin"
        empty.write_bytes(b"")
        assert fully_cached(empty)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _vm_flags(address: int) -> list[str]:
    """VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            current = low <= address < high
        elif current and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize(("floor_gbps", "switched"), [(math.inf, True), (0.0, False)])
def test_a_direct_load_goes_on_in_small_pages_once_huge_pages_come_slow(disk_checkpoint, floor_gbps, switched):
    """Every huge page slower than an infinite floor: after `patience` slow 2 MiB pieces the untouched rest of the
    buffers is advised for 4 KiB pages (VmFlags `nh`), and the bytes read are the same; a zero floor never switches."""
    directory = disk_checkpoint[0].parent / "big"
    state = {"w": torch.randn(1024, 2048), "b": torch.arange(7)}  # 8 MiB: four 2 MiB pieces
    save_state_dict(state, directory)
    manifest = read_manifest(directory)
    watch = direct_module.HugePageWatch(floor_gbps, patience=2)
    buffers = direct_module.read_partitions(directory, manifest, chunk=1 << 20, threads=1, watch=watch)
    assert (watch.small_pages, watch.slow_pieces) == ((True, 2) if switched else (False, 0))
    last = buffers[-1]
    assert ("nh" in _vm_flags(last.data_ptr() + last.numel() - 1)) is switched
    from sllm_faas.runtime.loader.views import tensor_views

    tensors = tensor_views(manifest, buffers)
    assert torch.equal(tensors["w"], state["w"]) and torch.equal(tensors["b"], state["b"])


def test_auto_watches_huge_pages_only_when_the_probe_chose_them(disk_checkpoint, monkeypatch):
    directory, state = disk_checkpoint
    if not uncached(directory):
        pytest.skip("the page cache kept the files (could not make them cold)")
    watches = []
    real_read = direct_module.read_partitions
    monkeypatch.setattr(direct_module, "read_partitions",
                        lambda *a, **kw: watches.append(kw.get("watch")) or real_read(*a, **kw))
    for probe in (HOST_BACKED, REPORTED):
        monkeypatch.setattr(policy, "memory_probe", lambda probe=probe: probe)
        assert torch.equal(load(directory)["w"], state["w"])
    assert watches[0].floor_gbps == policy.DIRECT_MARGIN * HOST_BACKED.small_gbps and watches[1] is None
