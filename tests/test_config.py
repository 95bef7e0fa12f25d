"""Configuration: the shipped file documents every key, mistakes name the key path, the
environment overrides the file, and `cmsod --check-config` exits 78 on a bad file."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cmsod import config
from cmsod.errors import ConfigError

SHIPPED = Path(__file__).parent.parent / "etc" / "cmsod" / "cmsod.toml"


def test_shipped_file_lists_every_key_with_its_default() -> None:
    data = tomllib.loads(SHIPPED.read_text())
    defaults = config.Config()
    for section in config.Config.__struct_fields__:
        keys = getattr(defaults, section).__struct_fields__
        assert set(data[section]) == set(keys), section
    assert config.load(SHIPPED, env={}) == defaults


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "[poller]\ninterval_s = 'often'\n",
            "Expected `float`, got `str` - at `$.poller.interval_s`",
        ),
        ("[poller]\nintervall_s = 5\n", "unknown field `intervall_s` - at `$.poller`"),
        ("[polller]\n", "unknown field `polller`"),
        ("[poller]\ninterval_s = -1\n", "Expected `float` > 0.0 - at `$.poller.interval_s`"),
        ("[so]\nmode = 'carrier-pigeon'\n", "at `$.so.mode`"),
        ("[control]\nsocket_mode = '0999'\n", "at `$.control.socket_mode`"),
        ("[daemon\n", "not valid TOML"),
        ("poller = 3\n", "at `$.poller`"),
        ("[poller]\ninterval_s = 1\ninterval_s = 2\n", "not valid TOML"),
        ("[dispatcher]\nmax_concurrent = 1.5\n", "at `$.dispatcher.max_concurrent`"),
        ("[dispatcher]\nmax_concurrent = 0\n", "at `$.dispatcher.max_concurrent`"),
        ("[optimizer]\nallow_partial = 'yes'\n", "at `$.optimizer.allow_partial`"),
        ("[control]\nmax_message_bytes = 10\n", "at `$.control.max_message_bytes`"),
        ("[so]\nmode = 'http'\n", "so.url must be an http:// or https:// URL"),
        ("[events]\nsink = 'http'\nurl = 'ftp://x'\n", "events.url must be an http(s):// URL"),
        ("[events]\ntopic = 'has spaces'\n", "at `$.events.topic`"),
        (
            "[events]\nsink = 'kafka'\nurl = 'http://u:secret@proxy:8082'\n",
            "events.url must not carry user:password (http://proxy:8082): it would show in"
            " logs, status and /health; put the line user:password in a file named by"
            " events.credentials_file",
        ),
        (
            "[alarms]\nurl = 'https://u:secret@am:9093/'\n",
            "alarms.url must not carry user:password (https://am:9093)",
        ),
        (
            "[so]\nmode = 'http'\nurl = 'https://u:secret@so:8443/onap/so/infra/v7'\n",
            "so.url must not carry user:password (https://so:8443/onap/so/infra/v7): it would"
            " show in logs, status and /health; put the line user:password in a file named by"
            " so.credentials_file",
        ),
        (
            "[tickets]\nmode = 'http'\nurl = 'http://u@tm:8080'\n",
            "tickets.url must not carry user:password (http://tm:8080)",
        ),
        ("[poller]\njitter = 2\n", "at `$.poller.jitter`"),
        ("\xff\xfe", "not valid TOML"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ConfigError) as info:
        config.load(path, env={})
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[poller]\ninterval_s = 7\n")
    cfg = config.load(
        path, env={"CMSOD_POLLER__INTERVAL_S": "2.5", "CMSOD_OPTIMIZER__ALLOW_PARTIAL": "true"}
    )
    assert cfg.poller.interval_s == 2.5
    assert cfg.optimizer.allow_partial is True
    with pytest.raises(ConfigError) as info:
        config.load(path, env={"CMSOD_POLLER__INTERVAL_S": "soon"})
    assert "CMSOD_POLLER__INTERVAL_S" in str(info.value) and "$.poller.interval_s" in str(
        info.value
    )


def test_state_dir_places_everything_under_it(tmp_path: Path) -> None:
    cfg = config.load(None, env={}, state_dir=str(tmp_path))
    assert cfg.store_path == tmp_path / "cmsod.sqlite3"
    assert cfg.socket_path == tmp_path / "control.sock"
    assert cfg.events_dir == tmp_path / "events"


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "cmsod", "--check-config", "--config", str(SHIPPED)],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[dispatcher]\nlead_time_s = 'x'\n")
    result = subprocess.run(
        [sys.executable, "-m", "cmsod", "--check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 78
    assert "$.dispatcher.lead_time_s" in result.stderr


def test_files_that_are_not_there_or_not_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "missing.toml", env={})
    assert "missing.toml: cannot read" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path, env={})
    assert "cannot read" in str(info.value)


def test_bad_companion_files_fail_check_config(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "Night.toml").write_text(
        '[[allowed]]\ndays = ["someday"]\nstart = "00:00"\nend = "06:00"\n'
    )
    conf = tmp_path / "c.toml"
    conf.write_text(f'[optimizer]\npolicies = "{policies}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "cmsod", "--check-config", "--config", str(conf)],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 78
        and "Night.toml" in result.stderr
        and "$.allowed[0].days[0]" in result.stderr
    )
    conf.write_text(
        '[so]\nmode = "http"\nurl = "http://so"\ncredentials_file = "/nonexistent/secret"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "cmsod", "--check-config", "--config", str(conf)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 78 and "credentials_file" in result.stderr
    conf.write_text('[tls]\nca_file = "/nonexistent/ca.pem"\n')
    result = subprocess.run(
        [sys.executable, "-m", "cmsod", "--check-config", "--config", str(conf)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 78 and "tls.ca_file /nonexistent/ca.pem" in result.stderr
    inventory = tmp_path / "inventory.toml"
    inventory.write_text('[elements."n1"]\ntimezone = 5\n')
    conf.write_text(f'[optimizer]\ninventory = "{inventory}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "cmsod", "--check-config", "--config", str(conf)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 78 and "inventory.toml" in result.stderr
    inventory.write_text(
        '[elements."n1"]\ntimezone = "UTC"\n[elements."n2"]\ntimeZone = "Mars/X"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "cmsod", "--check-config", "--config", str(conf)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 78
    assert "element 'n2': unknown time zone 'Mars/X'" in result.stderr


def test_directories_from_systemd(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path / "etc"))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "cmsod.toml").write_text("[poller]\ninterval_s = 3\n")
    assert config.default_config_path() == tmp_path / "etc" / "cmsod.toml"
    cfg = config.load(config.default_config_path(), env={})
    assert cfg.poller.interval_s == 3
    assert cfg.store_path == tmp_path / "state" / "cmsod.sqlite3"
    assert cfg.socket_path == tmp_path / "run" / "control.sock"
    assert cfg.events_dir == tmp_path / "state" / "events"


def test_reload_refuses_what_the_peers_were_built_from(tmp_path: Path) -> None:
    """The orchestrator's and ticket system's clients are built at start: a reload that changes
    how to reach them is refused (and says which keys), not half applied."""
    from cmsod import daemon
    from cmsod.clock import WallClock
    from cmsod.executor import InlineExecutor

    path = tmp_path / "cmsod.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    ctx = daemon.build_context(config.load(path), WallClock(), InlineExecutor())
    reload = daemon.make_reload(ctx, path, None)
    before = ctx.config
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        '[tickets]\nmode = "http"\nurl = "http://tm:8080"\n[poller]\ninterval_s = 2.0\n'
    )
    with pytest.raises(ConfigError, match="tickets.mode, tickets.url cannot change"):
        reload()
    assert ctx.config is before
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[tls]\nverify = false\n')
    with pytest.raises(ConfigError, match="tls cannot change"):
        reload()
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        '[events]\nsink = "kafka"\nurl = "http://proxy:8082"\ntimeout_s = 3.0\n'
        'credentials_file = "/etc/cmsod/kafka"\n'
    )
    with pytest.raises(
        ConfigError,
        match="events.sink, events.url, events.timeout_s, events.credentials_file cannot change",
    ):
        reload()
    assert ctx.config is before
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[poller]\ninterval_s = 2.0\n')
    assert reload() == ["poller.interval_s"]


def test_the_store_url_from_the_file_a_credential_or_the_command_line(
    monkeypatch, tmp_path: Path
) -> None:
    from cmsod.store.backend import redact

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = config.load(None, env={}, state_dir=str(tmp_path))
    assert cfg.store_url == "" and cfg.store_location == str(tmp_path / "cmsod.sqlite3")
    url = "postgresql://cmsod:s3cret@db:5432/cmsod"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "store-url").write_text(url + "\n")
    cfg = config.load(None, env={}, state_dir=str(tmp_path))
    assert cfg.store_location == url
    assert cfg.store_shown == "postgresql://cmsod:***@db:5432/cmsod"  # what is logged, shown
    other = "postgresql://cmsod@db2/cmsod"
    assert config.load(None, env={}, store_url=other).store_url == other  # cmsod --store
    assert redact(other) == other
    (tmp_path / "store-url").write_text("mysql://x\n")
    with pytest.raises(ConfigError, match="not a postgresql:// URL"):
        _ = config.load(None, env={}, state_dir=str(tmp_path)).store_url
    with pytest.raises(ConfigError, match=r"store.url must be a postgresql:// URL"):
        config.load(None, env={"CMSOD_STORE__URL": "sqlite:///x"})


def test_urls_are_shown_without_credentials_or_query() -> None:
    assert config.shown_url("https://u:p@am:9093/x/?token=s#f") == "https://am:9093/x"
    assert config.shown_url("http://[::1]:8082") == "http://[::1]:8082"
    assert config.shown_url("http://proxy") == "http://proxy"
