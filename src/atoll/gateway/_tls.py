"""TLS termination on the public listener (``server.tls``), and client certificates.

One :class:`ssl.SSLContext` per gateway process, made at start. A reload that finds new
certificate or key files (a renewal) loads them into the same context, which new
handshakes use from then on; connections already open keep the session they have.
A pair that does not load (a key that does not match, a file that is not PEM) refuses
the configuration, at start or on reload, naming ``server.tls``.

With ``client_ca``, clients are asked for a certificate chaining to those CAs (mutual
TLS): :func:`client_subject` reads the verified one into the caller's identity.

With ``client_crl``, a client certificate its issuer's revocation list names fails the
handshake (OpenSSL's leaf check: the list of the CA that issued the client's certificate
must be there). :func:`check_crls` refuses a file with no list in it, a list whose
signature a CA of ``client_ca`` with its issuer's name does not verify, and (given the
time) a list past its next update, which OpenSSL would take as every certificate of
that CA refused.

Reloads: OpenSSL's CA store only grows, so loading a changed ``client_ca`` into the live
context would keep a removed CA trusted. Instead :class:`ListenerTls` makes a fresh
context for each configuration and switches every new handshake to it from the
listener's context's SNI callback (which OpenSSL calls with or without a server name).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from atoll.config import ConfigError
from atoll.gateway._config import TlsSettings, UpstreamTlsConfig

if TYPE_CHECKING:
    from cryptography.x509 import Certificate, CertificateRevocationList

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(settings: TlsSettings, source: str) -> ssl.SSLContext:
    """A server context for ``settings``, or :class:`ConfigError` if its files do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols(["http/1.1"])  # no HTTP/2: the gateway speaks HTTP/1.1 only
    # A connection's client certificate is read once, after the handshake: no TLS 1.2
    # renegotiation may bring another one (TLS 1.3 has none).
    context.options |= ssl.OP_NO_RENEGOTIATION
    apply(context, settings, source)
    return context


def apply(context: ssl.SSLContext, settings: TlsSettings, source: str) -> None:
    """Load ``settings`` into ``context`` (new handshakes use them)."""
    try:
        context.load_cert_chain(settings.cert, settings.key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = _reason(exc)
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
        reason = _reason(exc)
        raise ConfigError(
            source,
            "server.tls.client_ca",
            f"cannot load the CA certificates {settings.client_ca}: {reason}",
        ) from None
    context.verify_mode = (
        ssl.CERT_REQUIRED if settings.client_auth == "required" else ssl.CERT_OPTIONAL
    )
    if settings.client_crl is None:
        context.verify_flags &= ~ssl.VERIFY_CRL_CHECK_LEAF
        return
    check_crls(settings, source)
    try:
        context.load_verify_locations(cafile=str(settings.client_crl))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            source,
            "server.tls.client_crl",
            f"cannot load the revocation lists {settings.client_crl}: {_reason(exc)}",
        ) from None
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


_CRL_PEM = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class CrlInfo:
    """What :func:`check_crls` read from ``server.tls.client_crl``."""

    #: Each list's issuer, as RFC 4514 writes it.
    issuers: tuple[str, ...]
    #: The earliest next update of the lists (Unix time), or ``None`` if none says.
    next_update: float | None
    #: CAs of ``client_ca`` with no list in the file: a certificate one of them issued
    #: directly fails the handshake ("unable to get certificate CRL").
    uncovered: tuple[str, ...]


def check_crls(settings: TlsSettings, source: str, now: float | None = None) -> CrlInfo:
    """The revocation lists of ``settings.client_crl``, checked against ``client_ca``;
    :class:`ConfigError` naming ``server.tls.client_crl`` if the file holds none, a list
    does not parse, a list names a CA of ``client_ca`` whose key did not sign it, or
    (with ``now``, Unix time) a list is past its next update."""
    from cryptography import x509  # noqa: PLC0415 - the gateway extra brings it

    key = "server.tls.client_crl"
    assert settings.client_crl is not None
    assert settings.client_ca is not None
    try:
        data = settings.client_crl.read_bytes()
        cas = x509.load_pem_x509_certificates(settings.client_ca.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(source, key, f"cannot read {settings.client_crl}: {exc}") from None
    blocks = _CRL_PEM.findall(data)
    if not blocks:
        raise ConfigError(
            source,
            key,
            f"{settings.client_crl} holds no revocation list (PEM '-----BEGIN X509 CRL-----')",
        )
    issuers: list[str] = []
    updates: list[float] = []
    for number, block in enumerate(blocks, 1):
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError as exc:
            raise ConfigError(
                source, key, f"revocation list {number} of {settings.client_crl}: {exc}"
            ) from None
        issuer = crl.issuer.rfc4514_string()
        named = [ca for ca in cas if ca.subject == crl.issuer]
        if named and not any(_signed_by(crl, ca) for ca in named):
            raise ConfigError(
                source,
                key,
                f"the revocation list of {issuer} in {settings.client_crl} is not signed by"
                f" the key of that CA in {settings.client_ca}",
            )
        next_update = crl.next_update_utc
        if next_update is not None:
            if now is not None and next_update.timestamp() <= now:
                raise ConfigError(
                    source,
                    key,
                    f"the revocation list of {issuer} expired at {next_update.isoformat()}"
                    " (its next update): OpenSSL would refuse every certificate that CA"
                    " issued; publish a fresh one",
                )
            updates.append(next_update.timestamp())
        issuers.append(issuer)
    uncovered = tuple(
        name
        for name in dict.fromkeys(ca.subject.rfc4514_string() for ca in cas)
        if name not in issuers
    )
    return CrlInfo(tuple(issuers), min(updates) if updates else None, uncovered)


def _signed_by(crl: CertificateRevocationList, ca: Certificate) -> bool:
    try:
        # A CA's key is one that signs (mypy sees every public key type, X25519's too).
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a key type that cannot sign a CRL
        return False


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
_SPECIAL = frozenset(',+"\\<>;=')
#: Subject alternative names that name a client whose subject is empty (SPIFFE ids are
#: URIs), in the order they are looked for.
_SAN_KINDS = ("URI", "DNS", "email")


def escape_dn_value(value: str) -> str:
    """An attribute value escaped as RFC 4514 2.4 says: the special characters with a
    backslash, a leading space or '#' and a trailing space too, and control characters
    as ``\\XX`` hex, so that no two values read the same."""
    out = []
    last = len(value) - 1
    for i, char in enumerate(value):
        if char in _SPECIAL or (i == 0 and char in " #") or (i == last and char == " "):
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append("".join(f"\\{byte:02X}" for byte in char.encode()))
        else:
            out.append(char)
    return "".join(out)


def client_subject(peercert: object) -> tuple[str, str] | None:
    """(who, its short name) of a verified client certificate, from ``getpeercert()``'s
    dict: the subject DN as RFC 4514 writes it and its common name; for a certificate with
    an empty subject (SPIFFE's), its first URI, DNS or email alternative name for both.
    ``None`` for no certificate, or one that names no one."""
    if not isinstance(peercert, dict):
        return None
    rdns = []
    common = ""
    for rdn in reversed(peercert.get("subject") or ()):  # RFC 4514: most specific first
        parts = []
        for name, value in rdn:
            if name == "commonName" and not common:
                common = value
            parts.append(f"{_SHORT_NAMES.get(name, name)}={escape_dn_value(value)}")
        rdns.append("+".join(parts))
    if rdns:
        subject = ",".join(rdns)
        return subject, common or subject
    names = peercert.get("subjectAltName") or ()
    for kind in _SAN_KINDS:
        for found_kind, value in names:
            if found_kind == kind and value:
                return value, value
    return None


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _xfcc_value(value: str) -> str:
    """A value as ``X-Forwarded-Client-Cert`` writes it: quoted (``"`` and ``\\``
    escaped) when it holds a character the header's syntax uses, as Envoy does."""
    if value and not any(char in value for char in ',;="\\ '):
        return value
    return _quoted(value)


def forwarded_client_cert(
    fields: tuple[str, ...], peercert: dict[str, object], sha256: str, der: bytes
) -> bytes:
    """The ``X-Forwarded-Client-Cert`` value for a verified client certificate, as Envoy
    writes it (``Hash=...;Cert="...";Subject="...";URI=...;DNS=...``): ``fields`` say
    which, in that order. ``Cert`` is the PEM, URL-encoded; ``Subject`` the DN as RFC 4514
    writes it (empty for a certificate with none), always quoted; one ``URI`` or ``DNS``
    per alternative name."""
    parts: list[str] = []
    for name in fields:
        if name == "hash":
            parts.append(f"Hash={sha256}")
        elif name == "cert":
            parts.append(f'Cert="{quote(ssl.DER_cert_to_PEM_cert(der), safe="")}"')
        elif name == "subject":
            found = client_subject({"subject": peercert.get("subject")})
            subject = "" if found is None else found[0]
            parts.append(f"Subject={_quoted(subject)}")
        else:
            kind = "URI" if name == "uri" else "DNS"
            alt_names = peercert.get("subjectAltName") or ()
            assert isinstance(alt_names, tuple)
            parts += [
                f"{kind}={_xfcc_value(value)}"
                for found_kind, value in alt_names
                if found_kind == kind
            ]
    text = "".join(c for c in ";".join(parts) if c >= " " and c != "\x7f")
    return text.encode("utf-8", "replace")


def _reason(exc: Exception) -> str:
    # ssl.SSLError has a short reason (KEY_VALUES_MISMATCH), other OSErrors a strerror.
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)


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
        reason = _reason(exc)
        raise ConfigError(source, key, f"cannot load the TLS files: {reason}") from None
    context.set_alpn_protocols(["http/1.1"])
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ListenerTls:
    """The listener's TLS: the context the server was started with, and the one new
    handshakes use, swapped in by its SNI callback; a reload replaces the latter."""

    def __init__(self, settings: TlsSettings, source: str) -> None:
        self.listener = server_context(settings, source)
        self.current = self.listener
        self.listener.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        del name  # one certificate for every name
        if self.current is not self.listener:
            connection.context = self.current

    def replace(self, settings: TlsSettings, source: str) -> None:
        """Use ``settings`` for new handshakes (or :class:`ConfigError`, and keep the old).

        The certificate, key and CA store come from the new context; whether a client
        certificate is asked for is read from the listener's own, so it is set there too.
        """
        fresh = server_context(settings, source)
        self.listener.verify_mode = fresh.verify_mode
        self.listener.verify_flags = fresh.verify_flags
        self.listener.minimum_version = fresh.minimum_version
        self.current = fresh
