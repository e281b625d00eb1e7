"""Remote stores (directory and HTTP with resume) and the loader's layered configuration."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest
import torch
from flask import Flask, Response, request, send_file
from werkzeug.serving import make_server

from sllm_faas.common.settings import SettingsError
from sllm_faas.runtime.checkpoint import read_manifest, save_state_dict
from sllm_faas.runtime.node_loader import config as loader_config
from sllm_faas.runtime.node_loader.store import HttpStore, StoreError, open_store


class FlakyModelServer:
    """A real HTTP server for BASE/MODEL/FILE with Range support; the first full GET of each partition
    is cut off halfway, as a dropped connection would be."""

    def __init__(self, root: Path) -> None:
        self.root, self.cut, self.ranges = root, set(), []
        app = Flask("store")

        @app.get("/<model>/<name>")
        def serve(model: str, name: str):
            path = root / model / name
            if not path.is_file():
                return "missing", 404
            if request.headers.get("Range"):
                self.ranges.append((name, request.headers["Range"]))
            elif name.startswith("part-") and name not in self.cut:
                self.cut.add(name)
                data = path.read_bytes()

                def half():
                    yield data[: len(data) // 2]
                    raise ConnectionAbortedError("dropped")

                return Response(half(), headers={"Content-Length": str(len(data))})
            return send_file(path, conditional=True)

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def http_store(tmp_path):
    manifest = save_state_dict({"w": torch.randn(300_000)}, tmp_path / "store" / "m")
    server = FlakyModelServer(tmp_path / "store")
    yield server, manifest
    server.close()


def test_http_download_resumes_with_range(tmp_path, http_store):
    server, manifest = http_store
    store = open_store(server.url)
    assert isinstance(store, HttpStore)
    assert store.read_manifest("m") == (tmp_path / "store" / "m" / "manifest.json").read_bytes()
    part = manifest.partitions[0]
    received = []
    target = tmp_path / "out.bin"
    store.fetch("m", part.file, target, part.size, received.append)
    assert target.read_bytes() == (tmp_path / "store" / "m" / part.file).read_bytes()
    assert server.ranges and server.ranges[0][0] == part.file  # the second attempt asked for the rest only
    assert sum(received) == part.size


def test_http_missing_model(http_store):
    server, _ = http_store
    with pytest.raises(StoreError, match="not in the store"):
        open_store(server.url).read_manifest("nope")


def test_directory_store_and_bad_location(tmp_path):
    save_state_dict({"w": torch.ones(10)}, tmp_path / "store" / "m")
    store = open_store(str(tmp_path / "store"))
    assert read_manifest(tmp_path / "store" / "m").partitions[0].file in store.read_manifest("m").decode()
    with pytest.raises(StoreError, match="neither"):
        open_store(str(tmp_path / "missing"))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loader_config.add_arguments(parser)
    return parser.parse_args(argv)


def test_config_precedence_flags_env_file_defaults(tmp_path, monkeypatch):
    config_file = tmp_path / "loader.toml"
    config_file.write_text('remote = "/from/file"\nssd_dir = "/tmp/ssd"\ndram_budget = "2GiB"\nnode_id = "file-node"\n'
                           'lease_ttl_s = 12\n')
    monkeypatch.setenv("SLLM_LOADER_DRAM_BUDGET", "3GiB")
    monkeypatch.setenv("SLLM_LOADER_NODE_ID", "env-node")
    config = loader_config.resolve(parse(["--config", str(config_file), "--node-id", "flag-node"]))
    assert config.node_id == "flag-node"           # flag beats env and file
    assert config.dram_budget == 3 << 30           # env beats file
    assert config.remote == "/from/file" and config.lease_ttl_s == 12.0
    assert config.dram_dir == "/dev/shm/sllm"      # documented default
    assert config.ssd_budget == 100 << 30


def test_config_errors_name_the_setting(tmp_path, monkeypatch):
    for name in ("SLLM_LOADER_REMOTE", "SLLM_LOADER_SSD_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError, match="--remote"):
        loader_config.resolve(parse([]))
    bad = tmp_path / "bad.toml"
    bad.write_text('remote = "/x"\nssd_dir = "/y"\nturbo = true\n')
    with pytest.raises(SettingsError, match="unknown settings turbo"):
        loader_config.resolve(parse(["--config", str(bad)]))
    with pytest.raises(ValueError, match="invalid node id"):
        loader_config.resolve(parse(["--remote", "/x", "--ssd-dir", "/y", "--node-id", "Bad Node!"]))


def test_first_real_transfer_replaces_the_probe_then_a_moving_average():
    from sllm_faas.runtime.node_loader.bandwidth import SMOOTHING, Bandwidths

    rates = Bandwidths()
    rates.observe("ssd", 100 << 20, 0.01, probe=True)       # 10 GB/s: a read-only probe
    rates.observe("ssd", 100 << 20, 0.1)                    # a staging: 1 GB/s replaces it
    assert rates.get("ssd") == pytest.approx((100 << 20) / 0.1)
    rates.observe("ssd", 100 << 20, 0.05)
    assert rates.get("ssd") == pytest.approx((1 - SMOOTHING) * (100 << 20) / 0.1 + SMOOTHING * (100 << 20) / 0.05)
    rates.observe("ssd", 1 << 20, 10.0)                     # too small to measure bandwidth: ignored
    assert rates.get("ssd") == pytest.approx((1 - SMOOTHING) * (100 << 20) / 0.1 + SMOOTHING * (100 << 20) / 0.05)
