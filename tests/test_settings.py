"""One settings mechanism (sllm_faas/common/settings.py) for serve, loader, controller, up and status/place:
flags > env > file > default per service, errors that name the flag, the source and the value, sizes and durations,
one default node id, no environment read at import time, and the README listing every setting."""

from __future__ import annotations

import argparse
import ast
import os
import re
import socket
from pathlib import Path

import pytest

from sllm_faas.common import settings as common
from sllm_faas.common.http_server import HttpSettings
from sllm_faas.common.settings import Conflict, SettingsError
from sllm_faas.common.units import parse_duration, parse_seconds, parse_size
from sllm_faas.controller.cli import PlaceSettings, StatusSettings
from sllm_faas.controller.config import ControllerConfig
from sllm_faas.runtime.local.up import UpSettings
from sllm_faas.runtime.node_loader.config import LoaderConfig
from sllm_faas.runtime.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
EVERY = [Settings, LoaderConfig, ControllerConfig, UpSettings, StatusSettings, PlaceSettings, HttpSettings]
LOADER_REQUIRED = {"remote": "/store", "ssd_dir": "/tmp/ssd"}


def flags(cls: type, argv: list[str]) -> dict[str, str]:
    """What the service's own command line gives `resolve` for `argv`."""
    parser = argparse.ArgumentParser()
    common.add_arguments(parser, cls)
    return common.given(parser.parse_args(argv), cls)


# -- precedence: flag > env > file > default, per service ------------------------------------------------------------

def test_runtime_flag_beats_env_beats_default():
    settings = Settings.resolve(flags(Settings, ["m", "--max-num-seqs", "3"]),
                                env={"SLLM_MAX_BATCH": "5", "SLLM_MAX_SEQ": "100", "SLLM_MODEL": "other"})
    assert settings.model == "m"                 # the positional argument is a flag too
    assert settings.max_batch == 3               # flag over env
    assert settings.max_seq == 100               # env over default
    assert settings.max_tokens == 1024           # documented default


def test_loader_flag_beats_env_beats_file_beats_default():
    config = common.resolve(LoaderConfig, flags(LoaderConfig, ["--lease-ttl-s", "5s"]),
                            env={"SLLM_LOADER_LEASE_TTL_S": "6", "SLLM_LOADER_DRAM_BUDGET": "3GiB"},
                            file={**LOADER_REQUIRED, "lease_ttl_s": 7, "dram_budget": "2GiB", "slots": 4},
                            file_name="loader.toml")
    assert config.lease_ttl_s == 5.0             # flag
    assert config.dram_budget == 3 << 30         # env over file
    assert config.slots == 4                     # file over default
    assert config.ssd_budget == 100 << 30        # default
    assert config.remote == "/store" and config.ssd_dir == "/tmp/ssd"


def test_controller_flag_beats_env_beats_fallback_env_beats_default():
    env = {"SLLM_CONTROLLER_TOKEN": "t", "SLLM_CONTROLLER_PORT": "9000", "SLLM_CONTROLLER_WORKERS": "3",
           "REDIS_URL": "redis://fallback:6379/0"}
    config = common.resolve(ControllerConfig, flags(ControllerConfig, ["--port", "9100"]), env=env)
    assert config.port == 9100                   # flag over env
    assert config.workers == 3                   # env over default
    assert config.redis_url == "redis://fallback:6379/0"   # REDIS_URL when SLLM_CONTROLLER_REDIS_URL is unset
    assert common.resolve(ControllerConfig, env={**env, "SLLM_CONTROLLER_REDIS_URL": "redis://own:1/0"}).redis_url \
        == "redis://own:1/0"
    assert config.booking_ttl_s == 120.0         # default


def test_up_and_status_flag_beats_env_beats_default():
    env = {"SLLM_GATEWAY_PORT": "8111", "SLLM_UP_NODES": "3", "SLLM_UP_POOL_SIZE": "0"}
    up = common.resolve(UpSettings, flags(UpSettings, ["--nodes", "1", "--cold-start-timeout", "2m"]), env=env)
    assert (up.nodes, up.port, up.pool_size, up.slots) == (1, 8111, 0, 2)
    assert up.cold_start_timeout == 120.0 and up.dram_budget == 4 << 30 and up.build_root == Path("build")
    status = common.resolve(StatusSettings, flags(StatusSettings, ["--key-prefix", "x:"]),
                            env={"SLLM_KEY_PREFIX": "y:", "REDIS_URL": "redis://r:1/0"})
    assert (status.key_prefix, status.redis_url) == ("x:", "redis://r:1/0")


def test_an_empty_variable_counts_as_unset():
    assert Settings.resolve(env={"SLLM_MAX_BATCH": ""}).max_batch == 8
    assert common.resolve(LoaderConfig, env={"SLLM_LOADER_TOKEN": ""}, file=LOADER_REQUIRED).token is None


# -- errors name the field, the source and the value ------------------------------------------------------------------

@pytest.mark.parametrize("how, expected", [
    ({"flags": {"dram_budget": "lots"}}, "--dram-budget='lots' (from flag --dram-budget): 'lots' is not a size"),
    ({"env": {"SLLM_LOADER_STAGE_WORKERS": "0"}}, "--stage-workers='0' (from env SLLM_LOADER_STAGE_WORKERS): must "
                                                  "be at least 1"),
    ({"file": {"heartbeat_s": "soon"}}, "--heartbeat-s='soon' (from file loader.toml): 'soon' is not a duration"),
    ({"file": {"node_id": "My_Host"}}, "--node-id='My_Host' (from file loader.toml): invalid node id 'My_Host'"),
    ({"env": {"SLLM_LOADER_INSECURE_NO_AUTH": "maybe"}}, "--insecure-no-auth='maybe' (from env "
                                                        "SLLM_LOADER_INSECURE_NO_AUTH): not a boolean"),
])
def test_a_refused_loader_value_names_flag_source_and_value(how, expected):
    with pytest.raises(SettingsError) as refused:
        common.resolve(LoaderConfig, how.get("flags"), how.get("env", {}), {**LOADER_REQUIRED, **how.get("file", {})},
                       file_name="loader.toml")
    assert str(refused.value).startswith(expected), str(refused.value)


@pytest.mark.parametrize("root, expected", [
    ("/var/tmp", "not on a tmpfs or ramfs: the DRAM tiers must be memory"),
    ("/no/such/dir", "No such file or directory"),
])
def test_up_takes_a_dram_root_only_in_memory(root, expected):
    with pytest.raises(SettingsError) as refused:
        common.resolve(UpSettings, env={"SLLM_UP_DRAM_ROOT": root})
    assert str(refused.value) == f"--dram-root={root!r} (from env SLLM_UP_DRAM_ROOT): {expected}"


def test_settings_refused_together_name_each_source():
    with pytest.raises(Conflict) as refused:
        common.resolve(LoaderConfig, {"heartbeat_s": "20"}, env={}, file=LOADER_REQUIRED, file_name="l.toml")
    assert str(refused.value) == ("--heartbeat-ttl-s=10.0 (from default) must be longer than --heartbeat-s=20.0 "
                                  "(from flag --heartbeat-s)")
    with pytest.raises(Conflict) as refused:
        common.resolve(ControllerConfig, env={"SLLM_CONTROLLER_TOKEN": "t", "SLLM_CONTROLLER_TLS_CERT": "/c.pem"})
    assert str(refused.value).startswith("--tls-cert=/c.pem (from env SLLM_CONTROLLER_TLS_CERT) and --tls-key= "
                                         "(from default) go together")


def test_secrets_are_not_shown_in_errors():
    with pytest.raises(Conflict) as refused:
        common.resolve(ControllerConfig, env={"SLLM_CONTROLLER_TOKEN": "s3cret", "SLLM_CONTROLLER_TLS_KEY": "/k"})
    assert "s3cret" not in str(refused.value)


def test_missing_required_settings_and_unknown_file_keys_are_named():
    with pytest.raises(SettingsError, match=r"missing --remote \(or env SLLM_LOADER_REMOTE\), --ssd-dir"):
        common.resolve(LoaderConfig, env={})
    with pytest.raises(SettingsError, match="loader.toml: unknown settings turbo"):
        common.resolve(LoaderConfig, env={}, file={**LOADER_REQUIRED, "turbo": True}, file_name="loader.toml")


def test_settings_built_directly_are_checked_too():
    with pytest.raises(SettingsError, match=r"--stage-workers=0 \(from constructor\): must be at least 1"):
        LoaderConfig(**LOADER_REQUIRED, stage_workers=0)
    with pytest.raises(SettingsError, match=r"--nodes=0 \(from constructor\)"):
        UpSettings(nodes=0)


def test_handed_over_settings_come_back_equal_and_checked():
    config = common.resolve(LoaderConfig, env={"SLLM_LOADER_TCP": "127.0.0.1:1", "SLLM_LOADER_TOKEN": "t"},
                            file=LOADER_REQUIRED)
    assert LoaderConfig.from_json(config.to_env()) == config
    controller = ControllerConfig(token="t", port=9000)
    assert ControllerConfig.from_json(controller.to_env()) == controller
    with pytest.raises(SettingsError, match=r"--port=70000 \(from file \$SLLM_CONTROLLER_CONFIG\): must be at most"):
        ControllerConfig.from_json(controller.to_env().replace("9000", "70000"))


# -- sizes, durations ------------------------------------------------------------------------------------------------

def test_a_setting_without_a_flag_is_named_by_its_variable():
    with pytest.raises(SettingsError, match=r"^SLLM_HTTP_BODY_TIMEOUT_S='0' \(from env SLLM_HTTP_BODY_TIMEOUT_S\): "
                                            r"must be above 0"):
        common.resolve(HttpSettings, env={"SLLM_HTTP_BODY_TIMEOUT_S": "0"})
    assert common.resolve(HttpSettings, env={"SLLM_HTTP_HEADER_TIMEOUT_S": "1m"}).header_timeout_s == 60.0


def test_sizes_and_durations():
    assert parse_size("4GiB") == 4 << 30 and parse_size("1.5GB") == 1_500_000_000 and parse_size("512") == 512
    assert parse_duration("30s") == 30.0 and parse_duration("1h30m") == 5400.0 and parse_duration("250ms") == 0.25
    assert parse_seconds("2.5") == 2.5 and parse_seconds("10m") == 600.0
    for bad in ("lots", "4 GiBs", "-1"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)
    for bad in ("30", "1d", "s"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)
    for bad in ("soon", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_seconds(bad)


def test_numbers_are_finite_and_within_bounds_and_reach_the_keep_alive_policy():
    env = {"SLLM_CONTROLLER_KEEPALIVE_EXCHANGE_RATE": "10", "SLLM_CONTROLLER_KEEPALIVE_TAIL_COVERAGE": "0.95",
           "SLLM_CONTROLLER_KEEPALIVE_TAIL_RESTART_S": "30s", "SLLM_CONTROLLER_TOKEN": "t"}
    config = common.resolve(ControllerConfig, env=env)
    assert (config.keepalive_exchange_rate, config.keepalive_tail_coverage, config.keepalive_tail_restart_s) == \
        (10.0, 0.95, 30.0)
    from sllm_faas.controller.service import keepalive_policy

    policy = keepalive_policy(config)
    assert (policy.exchange_rate, policy.tail_coverage, policy.tail_restart_s) == (10.0, 0.95, 30.0)
    for name, value, problem in (("KEEPALIVE_EXCHANGE_RATE", "nan", "not a finite number"),
                                 ("KEEPALIVE_EXCHANGE_RATE", "inf", "not a finite number"),
                                 ("KEEPALIVE_EXCHANGE_RATE", "lots", "not a number"),
                                 ("KEEPALIVE_EXCHANGE_RATE", "0", "must be above 0"),
                                 ("KEEPALIVE_TAIL_COVERAGE", "1.5", "must be at most 1")):
        flag = "--" + name.lower().replace("_", "-")
        with pytest.raises(SettingsError, match=rf"^{flag}='{value}' \(from env SLLM_CONTROLLER_{name}\): {problem}"):
            common.resolve(ControllerConfig, env={**env, f"SLLM_CONTROLLER_{name}": value})


# -- one default node id ---------------------------------------------------------------------------------------------

def test_runtime_and_loader_take_the_same_node_id_on_a_host_named_my_host(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "My_Host")
    runtime = Settings.resolve(env={})
    loader = common.resolve(LoaderConfig, env={}, file=LOADER_REQUIRED)
    assert runtime.node_id == loader.node_id == "my-host"
    assert runtime.instance_id.startswith("my-host-")


# -- no environment read at import time ------------------------------------------------------------------------------

# gunicorn's config file for the runtime: gunicorn executes it at start to read its settings, as a command's main.
ENTRY_POINTS = {"sllm_faas/runtime/server/gunicorn_conf.py"}


def environment_reads_at_import(source: str) -> list[int]:
    """Lines where os.environ / os.getenv is used while the module is imported: at module or class level, in a
    default argument or a decorator; function bodies run later."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for evaluated_now in [*node.args.defaults, *filter(None, node.args.kw_defaults),
                                  *getattr(node, "decorator_list", [])]:
                visit(evaluated_now)
            return
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" and \
                node.attr in ("environ", "environb", "getenv", "getenvb"):
            found.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                {alias.name for alias in node.names} & {"environ", "getenv"}:
            found.append(node.lineno)   # a bare `environ` could be read anywhere; keep the `os.` spelling
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def test_the_scan_finds_reads_at_import():
    assert environment_reads_at_import("import os\nX = os.environ.get('A')\n") == [2]
    assert environment_reads_at_import("import os\ndef f(x=os.getenv('A')):\n    return os.environ['B']\n") == [2]
    assert environment_reads_at_import("import os\nclass C:\n    a = os.environ.get('A')\n") == [3]
    assert environment_reads_at_import("import os\ndef f():\n    return os.environ['B']\n") == []


def test_no_module_of_ours_reads_the_environment_at_import():
    found = {}
    for directory, _, files in os.walk(ROOT / "sllm_faas", followlinks=True):
        for name in files:
            path = Path(directory, name)
            relative = path.relative_to(ROOT).as_posix()
            if name.endswith(".py") and relative not in ENTRY_POINTS:
                lines = environment_reads_at_import(path.read_text())
                if lines:
                    found[relative] = lines
    assert found == {}


# -- documentation ---------------------------------------------------------------------------------------------------

def test_every_setting_is_in_a_readme_table_row_with_its_flag_and_env():
    """README.md for every command; the controller's table is in deploy/README.md (README.md links to it)."""
    missing = []
    for cls in EVERY:
        readme = ROOT / ("deploy/README.md" if cls is ControllerConfig else "README.md")
        table_rows = [line for line in readme.read_text().splitlines() if line.startswith("| `")]
        for flag, env, _, _ in common.rows(cls):
            pattern = rf"`{re.escape(flag)}`.*\| `{re.escape(env)}` \|" if flag else rf"^\|[^|]*`{re.escape(env)}`"
            if not any(re.search(pattern, row) for row in table_rows):
                missing.append(f"{cls.__name__}: {flag} / {env} in {readme.relative_to(ROOT)}")
    assert missing == []


def test_every_env_variable_belongs_to_one_setting_per_service():
    for cls in EVERY:
        names = [spec.env for _, spec in common.specs(cls)]
        assert len(names) == len(set(names)), cls
    for cls, prefix in ((LoaderConfig, "SLLM_LOADER_"), (ControllerConfig, "SLLM_CONTROLLER_")):
        assert all(env == prefix + name.upper() for name, env in common.env_names(cls).items())
