"""The alarm gate's queries, pure: Alertmanager label matchers built from configured
templates and an element's attributes, and what the answers say.

A template is one matcher in Alertmanager's own syntax, `label="value"` (or `!=`, `=~`,
`!~`), whose value may name the element's attributes: `instance="{vnfName}"`,
`site="{site}"`. A query is a list of matchers, ANDed (one `filter` parameter each); the
element is held when any query finds an active alert. The attribute values are put into the
template's value as they are (regex operators: with regex metacharacters escaped, as Go's
regexp.QuoteMeta does), then the whole value is written back as Alertmanager reads a quoted
string (`\\`, `\"` and `\n` escaped).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cmsod.wire.alertmanager import GettableAlert

MATCHER = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)(=|!=|=~|!~)"((?:[^"\\]|\\.)*)"$')
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
QUOTE_META = re.compile(r"([\\.+*?()|\[\]{}^$])")
MAX_NAMES = 5  # alerts named in a hold's reason

Query = tuple[str, ...]  # matchers, ready to send


def _unquote(text: str) -> str:
    """A quoted matcher value as Alertmanager reads it: `\\n`, `\\"` and `\\\\` are escapes, any
    other backslash is itself (so a regex's `\\d` stays)."""
    escapes = {"n": "\n", '"': '"', "\\": "\\"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), m.group(0)), text)


def quote(value: str) -> str:
    """A value as Alertmanager's matcher parser reads a double-quoted string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def check_template(template: str) -> None:
    """ValueError unless it is one matcher (configuration checks it at load)."""
    if MATCHER.match(template) is None:
        raise ValueError(f'not a matcher like site="{{site}}": {template!r}')


def build(template: str, attributes: dict[str, str]) -> str | None:
    """The matcher for these attributes; None when it names one the element lacks."""
    m = MATCHER.match(template)
    if m is None:
        raise ValueError(f"not a matcher: {template!r}")
    label, op, raw = m.groups()
    regex = op in ("=~", "!~")
    missing = False

    def fill(found: re.Match[str]) -> str:
        nonlocal missing
        value = attributes.get(found.group(1))
        if value is None:
            missing = True
            return ""
        return QUOTE_META.sub(r"\\\1", value) if regex else value

    value = PLACEHOLDER.sub(fill, _unquote(raw))
    return None if missing else f"{label}{op}{quote(value)}"


def queries(
    templates: Sequence[Sequence[str]], name: str, attributes: dict[str, str]
) -> list[Query]:
    """The queries to ask about one element (`vnfName` is its name); a query that names an
    attribute the element lacks is left out."""
    attrs = {**attributes, "vnfName": name}
    out = []
    for query in templates:
        built = [build(t, attrs) for t in query]
        if all(b is not None for b in built):
            out.append(tuple(b for b in built if b is not None))
    return out


def firing(alerts: Sequence[GettableAlert]) -> str | None:
    """What fires, in a hold's words (None: nothing active): the alert names and since when."""
    active = [a for a in alerts if a.status.state == "active"]
    if not active:
        return None
    names = [
        f"{a.labels.get('alertname', a.fingerprint)} since {a.startsAt}" for a in active[:MAX_NAMES]
    ]
    more = f" and {len(active) - MAX_NAMES} more" if len(active) > MAX_NAMES else ""
    return "alerts firing: " + ", ".join(names) + more
