"""TLS termination on the public listener (``server.tls``).

One :class:`ssl.SSLContext` per gateway process, made at start. A reload that finds new
certificate or key files (a renewal) loads them into the same context, which new
handshakes use from then on; connections already open keep the session they have.
A pair that does not load (a key that does not match, a file that is not PEM) refuses
the configuration, at start or on reload, naming ``server.tls``.
"""

from __future__ import annotations

import ssl

from atoll.config import ConfigError
from atoll.gateway._config import TlsSettings, UpstreamTlsConfig

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(settings: TlsSettings, source: str) -> ssl.SSLContext:
    """A server context for ``settings``, or :class:`ConfigError` if its files do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols(["http/1.1"])  # no HTTP/2: the gateway speaks HTTP/1.1 only
    apply(context, settings, source)
    return context


def apply(context: ssl.SSLContext, settings: TlsSettings, source: str) -> None:
    """Load ``settings`` into ``context`` (new handshakes use them)."""
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        # ssl.SSLError has a short reason (KEY_VALUES_MISMATCH), other OSErrors a strerror.
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            source,
            "server.tls",
            f"cannot load the certificate {settings.cert} with the key {settings.key}: {reason}",
        ) from None
    context.minimum_version = _VERSIONS[settings.min_version]


def not_after(settings: TlsSettings) -> float | None:
    """When the listener's certificate expires (Unix time), for the admin port and the
    metrics; ``None`` if it cannot be read (it loaded, so that is only a race)."""
    from cryptography import x509  # noqa: PLC0415 - the gateway extra brings it (PyJWT's)

    try:
        certificate = x509.load_pem_x509_certificate(settings.cert.read_bytes())
    except (OSError, ValueError):
        return None
    return certificate.not_valid_after_utc.timestamp()


def client_context(settings: UpstreamTlsConfig, key: str, source: str) -> ssl.SSLContext:
    """A client context for HTTPS to an upstream's instances, or :class:`ConfigError`
    (naming ``key``) if its files do not load."""
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ca) if settings.ca is not None else None
        )
        if settings.cert is not None and settings.key is not None:
            context.load_cert_chain(settings.cert, settings.key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(source, key, f"cannot load the TLS files: {reason}") from None
    context.set_alpn_protocols(["http/1.1"])
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
