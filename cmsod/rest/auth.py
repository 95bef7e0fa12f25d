"""Who is calling the REST API, and what they may do.

The credentials file has one user per line, `name:level:hash`, where `level` is `read`
(queries only), `operate` (also create and delete schedules) or `approve` (also approvals, and
immediate schedules, which CMSO approves as they are created); `hash` is a salted scrypt hash
in the PHC string format, `$scrypt$ln=15,r=8,p=1$<salt>$<key>` (base64 without padding), as
`cmsod http-user NAME LEVEL` prints it; `!` means no password (the user can only come by a
client certificate whose common name is `name`). `#` starts a comment. No clear password is
ever stored, logged or kept in memory past the check: a verified password is remembered only
as an HMAC under a key that lives in this process, so the costly KDF runs once per user.
The file is read again when it changes (looked at once a second at most), so adding a user
needs no restart.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from cmsod import log
from cmsod.errors import ConfigError


class Level(IntEnum):
    read = 1
    operate = 2
    approve = 3


NAME = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")
PHC = re.compile(
    r"^\$scrypt\$ln=(?P<ln>\d{1,2}),r=(?P<r>\d{1,2}),p=(?P<p>\d{1,2})"
    r"\$(?P<salt>[A-Za-z0-9+/]{16,})\$(?P<key>[A-Za-z0-9+/]{43,})$"
)
NO_PASSWORD = "!"
DEFAULT_LOG2_N = 15  # 32 MiB of memory and ~0.1 s per check: costly to guess, paid once per user
MAX_PASSWORD_BYTES = 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: bytes, salt: bytes, log2_n: int, r: int, p: int, size: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * n * r * p, dklen=size
    )


def hash_password(password: str, log2_n: int = DEFAULT_LOG2_N) -> str:
    salt = secrets.token_bytes(16)
    key = _scrypt(password.encode(), salt, log2_n, 8, 1, 32)
    return f"$scrypt$ln={log2_n},r=8,p=1${_b64(salt)}${_b64(key)}"


def check_password(password: bytes, stored: str) -> bool:
    """Blocking (the KDF): run it off the event loop."""
    match = PHC.match(stored)
    if match is None:
        return False
    expected = _unb64(match["key"])
    actual = _scrypt(
        password,
        _unb64(match["salt"]),
        int(match["ln"]),
        int(match["r"]),
        int(match["p"]),
        len(expected),
    )
    return hmac.compare_digest(actual, expected)


@dataclass(frozen=True)
class User:
    name: str
    level: Level
    hash: str


def parse_credentials(text: str, where: str) -> dict[str, User]:
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        level, _, stored = rest.partition(":")
        if not NAME.match(name):
            raise ConfigError(f"{where}:{number}: a user name is letters, digits and ._@-")
        if level not in Level.__members__:
            raise ConfigError(f"{where}:{number}: level must be read, operate or approve")
        if stored != NO_PASSWORD:
            match = PHC.match(stored)
            if match is None:
                raise ConfigError(f"{where}:{number}: not a $scrypt$ hash (see cmsod http-user)")
            if int(match["ln"]) > 20:  # a hash that would take seconds to check per request
                raise ConfigError(f"{where}:{number}: scrypt cost ln above 20")
        if name in users:
            raise ConfigError(f"{where}:{number}: user {name!r} given twice")
        users[name] = User(name, Level[level], stored)
    return users


@dataclass
class Credentials:
    """The users of the credentials file, read again whenever the file changes."""

    path: Path
    users: dict[str, User] = field(default_factory=dict)
    stamp: tuple[int, int] | None = None
    checked: float = float("-inf")
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _verified: dict[str, bytes] = field(default_factory=dict, repr=False)

    def load(self) -> None:
        """Read the file if it changed since; raises ConfigError."""
        try:
            info = os.stat(self.path)
            if self.stamp == (info.st_mtime_ns, info.st_size):
                return
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"http.credentials_file {self.path}: {exc}") from None
        self.users = parse_credentials(text, str(self.path))
        self.stamp = (info.st_mtime_ns, info.st_size)
        self._verified.clear()

    def refresh(self, now: float) -> None:
        """`load` at most once a second: a stat per request would cost more than the rest of
        the check. A file that turned bad keeps the users last read (and says so)."""
        if now - self.checked < 1.0:
            return
        self.checked = now
        try:
            self.load()
        except ConfigError as exc:
            log.error("http.credentials_unreadable", reason=str(exc))

    def user(self, name: str) -> User | None:
        return self.users.get(name)

    def remembered(self, user: User, password: bytes) -> bool:
        return hmac.compare_digest(self._verified.get(user.name, b""), self._mac(user, password))

    def remember(self, user: User, password: bytes) -> None:
        self._verified[user.name] = self._mac(user, password)

    def _mac(self, user: User, password: bytes) -> bytes:
        return hmac.digest(self._key, user.hash.encode() + b"\0" + password, "sha256")


def main(argv: list[str]) -> int:
    """`cmsod http-user NAME LEVEL`: print a credentials-file line (password from the terminal,
    or the first line of standard input)."""
    parser = argparse.ArgumentParser(
        prog="cmsod http-user",
        description="Print a line for [http] credentials_file; append it to the file.",
    )
    parser.add_argument("name")
    parser.add_argument("level", choices=list(Level.__members__))
    parser.add_argument(
        "--no-password",
        action="store_true",
        help="a user who can only come by a client certificate with this common name",
    )
    args = parser.parse_args(argv)
    if not NAME.match(args.name):
        parser.error("a user name is letters, digits and ._@-")
    if args.no_password:
        stored = NO_PASSWORD
    else:
        if sys.stdin.isatty():
            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                print("cmsod http-user: the passwords differ", file=sys.stderr)
                return 1
        else:
            password = sys.stdin.readline().rstrip("\n")
        if not password or len(password.encode()) > MAX_PASSWORD_BYTES:
            print("cmsod http-user: a password of 1 to 1024 bytes is needed", file=sys.stderr)
            return 1
        stored = hash_password(password)
    print(f"{args.name}:{args.level}:{stored}")
    return 0
