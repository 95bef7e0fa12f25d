"""The REST API's credentials: the hash format, the file, the `cmsod http-user` command and
the [http] section's checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmsod import config
from cmsod.errors import ConfigError
from cmsod.rest.auth import Credentials, Level, check_password, hash_password, parse_credentials


def test_hash_is_salted_scrypt_in_phc_format() -> None:
    first, second = hash_password("pw", 4), hash_password("pw", 4)
    assert first.startswith("$scrypt$ln=4,r=8,p=1$") and first != second  # salted
    assert "pw" not in first
    assert check_password(b"pw", first) and check_password(b"pw", second)
    assert not check_password(b"pW", first)
    assert not check_password(b"pw", "$scrypt$garbage")


def test_credentials_file_lines() -> None:
    users = parse_credentials(
        f"# comment\n\nann:read:{hash_password('a', 4)}\nbob:approve:!\n", "users"
    )
    assert users["ann"].level is Level.read and users["bob"].hash == "!"
    assert Level.read < Level.operate < Level.approve


@pytest.mark.parametrize(
    "line,message",
    [
        ("ann:root:!", "level must be"),
        ("a n:read:!", "user name"),
        ("ann:read:secret", r"not a \$scrypt\$ hash"),  # a clear password is refused
        ("ann:read:$scrypt$ln=30,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43, "cost"),
        ("ann:read:!\nann:operate:!", "given twice"),
    ],
)
def test_bad_credentials_lines_name_the_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_credentials(line, "users")
    assert "users:" in str(caught.value)


def test_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("ann:read:!\n")
    credentials = Credentials(path)
    credentials.load()
    assert credentials.user("ann") is not None and credentials.user("bob") is None
    path.write_text("ann:read:!\nbob:operate:!\n")
    os.utime(path, ns=(1, 1))  # a different stamp even within the clock's resolution
    credentials.load()
    assert credentials.user("bob") is not None
    path.unlink()
    with pytest.raises(ConfigError, match="credentials_file"):
        credentials.load()
    credentials.refresh(now=100.0)  # logged, and the users last read are kept
    assert credentials.user("bob") is not None
    path.write_text("carl:read:!\n")
    credentials.refresh(now=100.5)  # looked at once a second at most
    assert credentials.user("carl") is None
    credentials.refresh(now=101.0)
    assert credentials.user("carl") is not None


def test_a_verified_password_is_remembered_only_as_a_mac(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"ann:read:{hash_password('right', 4)}\n")
    credentials = Credentials(path)
    credentials.load()
    ann = credentials.user("ann")
    assert ann is not None and not credentials.remembered(ann, b"right")
    credentials.remember(ann, b"right")
    assert credentials.remembered(ann, b"right") and not credentials.remembered(ann, b"wrong")
    assert b"right" not in b"".join(credentials._verified.values())


def test_http_user_command_prints_a_line_that_checks(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cmsod", "http-user", "ops", "operate"],
        input="hunter22\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "hunter22" not in line
    users = parse_credentials(line, "stdout")
    assert users["ops"].level is Level.operate
    assert check_password(b"hunter22", users["ops"].hash)
    refused = subprocess.run(
        [sys.executable, "-m", "cmsod", "http-user", "ops", "operate"],
        input="\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "password" in refused.stderr


@pytest.mark.parametrize(
    "env,message",
    [
        ({"CMSOD_HTTP__LISTEN": "nowhere"}, "host:port"),
        ({"CMSOD_HTTP__LISTEN": "127.0.0.1:8080"}, "credentials_file is needed"),
        (
            {
                "CMSOD_HTTP__LISTEN": "127.0.0.1:8080",
                "CMSOD_HTTP__CREDENTIALS_FILE": "/x",
                "CMSOD_HTTP__CERTFILE": "/c",
            },
            "go together",
        ),
        (
            {
                "CMSOD_HTTP__LISTEN": "127.0.0.1:8080",
                "CMSOD_HTTP__CREDENTIALS_FILE": "/x",
                "CMSOD_HTTP__CLIENT_CA": "/ca",
            },
            "needs http.certfile",
        ),
    ],
)
def test_http_section_checks(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, env=env)


def test_http_is_off_by_default() -> None:
    assert config.load(None, env={}).http.listen == ""


def test_reload_refuses_a_changed_http_section(tmp_path: Path) -> None:
    """The listener (socket, TLS, hypercorn's limits) is built at start: a reload that changes
    [http] is refused, naming the keys."""
    from cmsod import daemon
    from cmsod.clock import WallClock
    from cmsod.executor import InlineExecutor

    path = tmp_path / "cmsod.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    ctx = daemon.build_context(config.load(path), WallClock(), InlineExecutor())
    reload = daemon.make_reload(ctx, path, None)
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n'
        '[http]\nlisten = "127.0.0.1:8080"\ncredentials_file = "/x"\n'
    )
    with pytest.raises(ConfigError, match="http.listen, http.credentials_file cannot change"):
        reload()


def test_check_config_reads_the_credentials_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("ann:read:password-in-clear\n")
    env = {
        **os.environ,
        "CMSOD_HTTP__LISTEN": "127.0.0.1:0",
        "CMSOD_HTTP__CREDENTIALS_FILE": str(users),
    }
    command = [sys.executable, "-m", "cmsod", "--state-dir", str(tmp_path), "--check-config"]
    bad = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 78 and f"{users}:1: not a $scrypt$ hash" in bad.stderr
    users.write_text("ann:read:!\n")
    good = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
