"""TLS on the mirror itself (`server.tls_cert` / `server.tls_key`), for small setups without a front."""

from __future__ import annotations

import ssl

from cratemirror.config.schema import Config, ConfigError


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The context to serve https with, or None for plain http. A missing half or a certificate and key
    that do not load are config errors (exit 2), found before any worker starts."""
    cert, key = config.server.tls_cert, config.server.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "server.tls_cert" if cert is None else "server.tls_key"
        raise ConfigError(
            f"{config.source}: {missing}: expected a PEM file path too (tls_cert and tls_key go together)"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # aiohttp speaks HTTP/1.1; a front is the place for h2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
        raise ConfigError(
            f"{config.source}: server.tls_cert: expected a PEM certificate matching server.tls_key, "
            f"got {str(cert)!r} ({reason})"
        ) from None
    return context
