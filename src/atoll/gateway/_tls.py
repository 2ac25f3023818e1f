"""TLS termination on the public listener (``server.tls``), and client certificates.

One :class:`ssl.SSLContext` per gateway process, made at start. A reload that finds new
certificate or key files (a renewal) loads them into the same context, which new
handshakes use from then on; connections already open keep the session they have.
A pair that does not load (a key that does not match, a file that is not PEM) refuses
the configuration, at start or on reload, naming ``server.tls``.

With ``client_ca``, clients are asked for a certificate chaining to those CAs (mutual
TLS): :func:`client_subject` reads the verified one into the caller's identity. A reload
adds the CAs of a changed file to those trusted; one removed from it stays trusted until
a restart (OpenSSL's store only grows).
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
    if settings.client_ca is None:
        context.verify_mode = ssl.CERT_NONE
        return
    try:
        context.load_verify_locations(cafile=str(settings.client_ca))
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            source,
            "server.tls.client_ca",
            f"cannot load the CA certificates {settings.client_ca}: {reason}",
        ) from None
    context.verify_mode = (
        ssl.CERT_REQUIRED if settings.client_auth == "required" else ssl.CERT_OPTIONAL
    )


#: Short names of subject attributes, as RFC 4514 (and OpenSSL) write them.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
_SPECIAL = str.maketrans({c: "\\" + c for c in ',+"\\<>;='})


def client_subject(peercert: object) -> tuple[str, str] | None:
    """(subject DN as RFC 4514 writes it, its common name or the DN) of a verified client
    certificate, from ``getpeercert()``'s dict; ``None`` for no certificate."""
    if not isinstance(peercert, dict) or not peercert.get("subject"):
        return None
    rdns = []
    common = ""
    for rdn in reversed(peercert["subject"]):  # RFC 4514: the most specific first
        parts = []
        for name, value in rdn:
            if name == "commonName" and not common:
                common = value
            escaped = value.translate(_SPECIAL)
            if escaped.startswith((" ", "#")):
                escaped = "\\" + escaped
            if escaped.endswith(" "):
                escaped = escaped[:-1] + "\\ "
            parts.append(f"{_SHORT_NAMES.get(name, name)}={escaped}")
        rdns.append("+".join(parts))
    subject = ",".join(rdns)
    return subject, common or subject


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
