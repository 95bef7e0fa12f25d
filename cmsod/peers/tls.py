"""The one TLS configuration of every peer: `[tls]` becomes one `ssl.SSLContext`, built once
at start-up and given to the orchestrator's client (peers/http1.py) and to the httpx clients
of the ticket system and the event sinks, so all of them trust the same CAs and show the same
client certificate.

Without `ca_file` the system's trust store is used (OpenSSL's default paths, which honour
SSL_CERT_FILE and SSL_CERT_DIR), for every peer alike: httpx's own default (certifi's bundle) is
not used. Every peer is reached directly: proxy environment variables are ignored by all of
them, so a variable the service happens to inherit can never reroute a peer.
"""

from __future__ import annotations

import ssl

from cmsod.config import TlsConfig
from cmsod.errors import ConfigError


def context(cfg: TlsConfig) -> ssl.SSLContext:
    """The SSL context for every https peer; ConfigError naming the key of an unusable file."""
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    except OSError as exc:  # ssl.SSLError is one too
        raise ConfigError(f"tls.ca_file {cfg.ca_file}: {_why(exc)}") from None
    if cfg.client_cert:
        try:
            ctx.load_cert_chain(cfg.client_cert, cfg.client_key or None)
        except OSError as exc:  # ssl.SSLError is one too
            keys = "tls.client_cert/tls.client_key" if cfg.client_key else "tls.client_cert"
            raise ConfigError(f"{keys} {cfg.client_cert}: {_why(exc)}") from None
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
