"""The settings' declarations (`common.config`): one declaration gives the config object's
defaults, the flags, the values read and the README's table."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from common.config import ConfigError, Setting, Settings
from scripts.settings_table import README, READERS, declared, render, with_table
from services.embedder.config import EMBEDDER_SETTINGS, EmbedderConfig
from services.gateway.config import GATEWAY_SETTINGS, GatewayConfig
from services.indexer.config import INDEXER_SETTINGS, IndexerConfig
from services.web.config import WEB_SETTINGS, WebConfig

EXAMPLE = Settings(
    Setting("EXAMPLE_PORT", "port", int, 8000, minimum=0, maximum=65535, help="a port"),
    Setting("EXAMPLE_RATIO", "ratio", float, 0.5, minimum=0.0, maximum=1.0),
    Setting("EXAMPLE_WAIT_S", "wait_s", float, 1.0, minimum=0.1),
    Setting("EXAMPLE_FSYNC", "fsync", bool, True),
    Setting("EXAMPLE_MODE", "mode", default="auto", choices=("auto", "on", "off")),
    Setting("EXAMPLE_MESSAGE_MB", "message_bytes", int, 4, minimum=1, scale=1024 * 1024, flag="--message-mb"),
    Setting("EXAMPLE_DIR", "directory", Path, required="EXAMPLE_DIR is required: say where"),
    Setting("EXAMPLE_TOKEN", "token", secret=True),
)
NAMES = [setting.env for setting in EXAMPLE]


@pytest.fixture
def env(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EXAMPLE_DIR", "/srv/example")
    return monkeypatch


def parse(argv: list[str]) -> dict:
    return EXAMPLE.parse_args("example", "an example", argv)


def test_defaults_apply_and_an_empty_variable_counts_as_unset(env):
    env.setenv("EXAMPLE_PORT", "")
    values = parse([])
    assert values == {
        "port": 8000,
        "ratio": 0.5,
        "wait_s": 1.0,
        "fsync": True,
        "mode": "auto",
        "message_bytes": 4 * 1024 * 1024,
        "directory": Path("/srv/example"),
        "token": None,
    }


def test_the_environment_sets_values_and_a_flag_overrides_it(env):
    env.setenv("EXAMPLE_PORT", "9000")
    env.setenv("EXAMPLE_FSYNC", "off")
    env.setenv("EXAMPLE_MODE", "ON")
    env.setenv("EXAMPLE_MESSAGE_MB", "2")
    env.setenv("EXAMPLE_TOKEN", "t0ken")
    assert parse([]) | {"directory": None} == {
        "port": 9000,
        "ratio": 0.5,
        "wait_s": 1.0,
        "fsync": False,
        "mode": "on",
        "message_bytes": 2 * 1024 * 1024,
        "directory": None,
        "token": "t0ken",
    }
    overridden = parse(
        ["--port", "9100", "--fsync", "--mode", "off", "--message-mb", "3", "--directory", "/elsewhere"]
    )
    assert (overridden["port"], overridden["fsync"], overridden["mode"]) == (9100, True, "off")
    assert overridden["message_bytes"] == 3 * 1024 * 1024
    assert overridden["directory"] == Path("/elsewhere")


@pytest.mark.parametrize(
    "name, raw, message",
    [
        ("EXAMPLE_PORT", "x", "EXAMPLE_PORT='x' is not an integer"),
        ("EXAMPLE_PORT", "-1", "EXAMPLE_PORT=-1 must be between 0 and 65535"),
        ("EXAMPLE_PORT", "70000", "EXAMPLE_PORT=70000 must be between 0 and 65535"),
        ("EXAMPLE_RATIO", "1.5", "EXAMPLE_RATIO=1.5 must be between 0.0 and 1.0"),
        ("EXAMPLE_RATIO", "half", "EXAMPLE_RATIO='half' is not a number"),
        ("EXAMPLE_RATIO", "nan", "EXAMPLE_RATIO='nan' is not a finite number"),
        ("EXAMPLE_WAIT_S", "0.01", "EXAMPLE_WAIT_S=0.01 must be >= 0.1"),
        ("EXAMPLE_FSYNC", "maybe", "EXAMPLE_FSYNC='maybe' is not a boolean (use true/false)"),
        ("EXAMPLE_MODE", "sometimes", "EXAMPLE_MODE='sometimes' must be one of auto, on, off"),
        ("EXAMPLE_MESSAGE_MB", "0", "EXAMPLE_MESSAGE_MB=0 must be >= 1"),
    ],
)
def test_a_bad_value_stops_the_start_naming_the_variable(env, name, raw, message):
    env.setenv(name, raw)
    with pytest.raises(ConfigError) as raised:
        parse([])
    assert str(raised.value) == f"configuration error: {message}"


def test_a_bad_flag_is_named_and_checked_like_the_variable(env):
    with pytest.raises(ConfigError, match=r"--port=70000 must be between 0 and 65535"):
        parse(["--port", "70000"])
    with pytest.raises(ConfigError, match=r"--message-mb='lots' is not an integer"):
        parse(["--message-mb", "lots"])


def test_a_missing_required_setting_says_what_to_set(env):
    env.delenv("EXAMPLE_DIR")
    with pytest.raises(ConfigError, match="EXAMPLE_DIR is required: say where"):
        parse([])


def test_secrets_have_no_flag():
    parser = EXAMPLE.add_flags(argparse.ArgumentParser())
    flags = {option for action in parser._actions for option in action.option_strings}
    assert "--port" in flags and "--no-fsync" in flags and "--message-mb" in flags
    assert not any("token" in flag for flag in flags)


# ------------------------------------------------------------------ the services' declarations
SERVICES = [
    (EMBEDDER_SETTINGS, EmbedderConfig),
    (INDEXER_SETTINGS, IndexerConfig),
    (GATEWAY_SETTINGS, GatewayConfig),
    (WEB_SETTINGS, WebConfig),
]


RENAMED = Setting("EXAMPLE_BOOTSTRAP_DIR", "bootstrap_dir", Path, deprecated_env=("EXAMPLE_SEED_DIR",))


def test_a_renamed_variable_is_still_read_under_its_former_name_with_a_warning(monkeypatch, caplog):
    monkeypatch.delenv("EXAMPLE_BOOTSTRAP_DIR", raising=False)
    monkeypatch.setenv("EXAMPLE_SEED_DIR", "/srv/old")
    with caplog.at_level("WARNING", logger="common.config"):
        assert Settings(RENAMED).read()["bootstrap_dir"] == Path("/srv/old")
    assert [r.getMessage() for r in caplog.records] == [
        "EXAMPLE_SEED_DIR is deprecated: rename it EXAMPLE_BOOTSTRAP_DIR (the old name is read for one release)"
    ]
    caplog.clear()
    monkeypatch.setenv("EXAMPLE_BOOTSTRAP_DIR", "/srv/new")  # the new name wins, the old is named
    with caplog.at_level("WARNING", logger="common.config"):
        assert Settings(RENAMED).read()["bootstrap_dir"] == Path("/srv/new")
    assert "EXAMPLE_SEED_DIR is ignored: EXAMPLE_BOOTSTRAP_DIR is set" in caplog.text
    caplog.clear()
    monkeypatch.delenv("EXAMPLE_SEED_DIR")
    with caplog.at_level("WARNING", logger="common.config"):
        assert Settings(RENAMED).read()["bootstrap_dir"] == Path("/srv/new")
    assert not caplog.records
    parser = Settings(RENAMED).add_flags(argparse.ArgumentParser())
    assert "--bootstrap-dir" in parser.format_help() and "seed" not in parser.format_help()


def test_a_bad_value_under_the_former_name_is_named_by_it(monkeypatch):
    setting = Setting("EXAMPLE_WORKERS", "workers", int, 1, deprecated_env=("EXAMPLE_THREADS",))
    monkeypatch.delenv("EXAMPLE_WORKERS", raising=False)
    monkeypatch.setenv("EXAMPLE_THREADS", "many")
    with pytest.raises(ConfigError, match="EXAMPLE_THREADS='many' is not an integer"):
        Settings(setting).read()


@pytest.mark.parametrize(
    "config, old, new",
    [
        (GatewayConfig, "GATEWAY_SEED_DIR", "GATEWAY_BOOTSTRAP_DIR"),
        (WebConfig, "WEB_SEED_DIR", "WEB_BOOTSTRAP_DIR"),
    ],
)
def test_the_seed_dir_settings_are_bootstrap_dir_and_read_the_old_name(monkeypatch, caplog, config, old, new):
    monkeypatch.delenv(new, raising=False)
    monkeypatch.setenv(old, "/srv/prepared")
    with caplog.at_level("WARNING", logger="common.config"):
        assert config.from_env([]).bootstrap_dir == Path("/srv/prepared")
    assert f"{old} is deprecated: rename it {new}" in caplog.text
    monkeypatch.delenv(old)
    assert config.from_env(["--bootstrap-dir", "/srv/flag"]).bootstrap_dir == Path("/srv/flag")
    caplog.clear()
    with caplog.at_level("WARNING", logger="common.config"):  # the former flag, for one release
        assert config.from_env(["--seed-dir", "/srv/old-flag"]).bootstrap_dir == Path("/srv/old-flag")
    assert "--seed-dir is deprecated: use --bootstrap-dir" in caplog.text


@pytest.mark.parametrize("settings, config", SERVICES, ids=lambda x: getattr(x, "__name__", ""))
def test_the_config_objects_defaults_are_the_declared_ones(settings, config):
    """One default per setting: the dataclass field's default is the declaration's."""
    checked = 0
    for field in dataclasses.fields(config):
        if field.name not in settings.by_field or field.default is dataclasses.MISSING:
            continue
        if config is IndexerConfig and field.name == "partitions":
            continue  # 0 = no shard's replica; INDEXER_PARTITIONS counts only with INDEXER_SHARD
        assert field.default == settings.default(field.name), field.name
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("settings, config", SERVICES, ids=lambda x: getattr(x, "__name__", ""))
def test_from_env_with_nothing_set_gives_the_defaults(monkeypatch, tmp_path, settings, config):
    for setting in settings:
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.setenv("EMBEDDER_ARTIFACT_DIR", str(tmp_path))
    built = config.from_env([])
    direct = config(artifact_dir=tmp_path) if config is EmbedderConfig else config()
    assert built == direct


def test_a_config_built_directly_is_checked_against_the_bounds(tmp_path):
    with pytest.raises(ConfigError, match="max_k=0 must be >= 1"):
        GatewayConfig.local(max_k=0)
    with pytest.raises(ConfigError, match="similar_text_weight=2 must be between"):
        GatewayConfig.local(similar_text_weight=2)
    with pytest.raises(ConfigError, match="runtime='tf' must be one of"):
        EmbedderConfig.local(tmp_path, runtime="tf")
    with pytest.raises(ConfigError, match="max_message_bytes=0 must be >= 1048576"):
        IndexerConfig.local(max_message_bytes=0)


def test_local_configs_bind_loopback_on_a_free_port_without_metrics(tmp_path):
    for config in (
        GatewayConfig.local(),
        IndexerConfig.local(),
        EmbedderConfig.local(tmp_path),
        WebConfig.local(),
    ):
        assert (config.host, config.port) == ("127.0.0.1", 0)
        assert getattr(config, "metrics_port", 0) == 0


def test_the_readme_table_is_the_declarations():
    readme = README.read_text()
    assert with_table(readme, render()) == readme, (
        "README.md's configuration table differs from the declarations: run "
        "python -m scripts.settings_table --write"
    )


def test_every_declared_variable_is_in_the_table_once_per_declaration():
    rows = declared()
    table = render()
    for setting, readers in rows:
        assert f"| `{setting.env}` |" in table and readers
    assert len(table.splitlines()) == len(rows) + 2
    assert {reader for reader, _, _ in READERS} >= {
        "embedder",
        "indexer",
        "gateway",
        "web",
        "rebalance",
        "reconcile",
        "index_catalogue",
        "load_catalogue",
        "training",
    }


def test_the_commands_read_the_gateways_declarations_with_the_same_flags(monkeypatch, tmp_path):
    from services.gateway.reconcile import RECONCILE_SETTINGS

    for setting in RECONCILE_SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
        assert setting is GATEWAY_SETTINGS.by_field.get(setting.field, setting)
    monkeypatch.setenv("GATEWAY_DB", str(tmp_path / "env.sqlite3"))
    monkeypatch.setenv("INDEXER_ADDRS", "127.0.0.1:1,127.0.0.1:2")
    parser = RECONCILE_SETTINGS.add_flags(argparse.ArgumentParser())
    values = RECONCILE_SETTINGS.read(parser.parse_args(["--db", str(tmp_path / "flag.sqlite3")]))
    assert values["db_path"] == tmp_path / "flag.sqlite3"
    assert values["indexer_addrs"] == ("127.0.0.1:1", "127.0.0.1:2")
    assert values["partitions"] == 256 and values["write_token"] is None
