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

import logging
import math
import re
import ssl
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from atoll.config import ConfigError
from atoll.determinism import Clock, SystemClock
from atoll.gateway._config import TlsSettings, UpstreamTlsConfig

if TYPE_CHECKING:
    from cryptography.x509 import Certificate, CertificateRevocationList, Name

log = logging.getLogger("atoll.gateway")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(settings: TlsSettings, source: str, *, http2: bool = False) -> ssl.SSLContext:
    """A server context for ``settings``, or :class:`ConfigError` if its files do not load.

    ALPN offers ``h2`` before ``http/1.1`` with ``http2`` (the server's preference wins).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    # A connection's client certificate is read once, after the handshake: no TLS 1.2
    # renegotiation may bring another one (TLS 1.3 has none).
    context.options |= ssl.OP_NO_RENEGOTIATION
    apply(context, settings, source)
    return context


def apply(context: ssl.SSLContext, settings: TlsSettings, source: str) -> None:
    """Load ``settings`` into ``context`` (new handshakes use them)."""
    certificate = f"the certificate {settings.cert} with the key {settings.key}"
    with _refusing(source, "server.tls", certificate):
        context.load_cert_chain(settings.cert, settings.key)
    context.minimum_version = _VERSIONS[settings.min_version]
    if settings.client_ca is None:
        context.verify_mode = ssl.CERT_NONE
        return
    with _refusing(source, "server.tls.client_ca", f"the CA certificates {settings.client_ca}"):
        context.load_verify_locations(cafile=str(settings.client_ca))
    context.verify_mode = (
        ssl.CERT_REQUIRED if settings.client_auth == "required" else ssl.CERT_OPTIONAL
    )
    # A resumed session skips the certificate checks. TLS 1.3 resumes only with tickets:
    # none are issued, so a revoked or untrusted certificate cannot come back that way.
    # TLS 1.2 session ids are checked by ListenerTls (its SNI callback).
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    if settings.client_crl is None:
        context.verify_flags &= ~ssl.VERIFY_CRL_CHECK_LEAF
        return
    check_crls(settings, source)
    with _refusing(source, "server.tls.client_crl", f"the revocation lists {settings.client_crl}"):
        context.load_verify_locations(cafile=str(settings.client_crl))
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


#: TLS 1.2 sessions remembered for resumption checks: OpenSSL's own cache size.
_MAX_SESSIONS = 20 * 1024
#: Distinct handshake failure reasons counted apart (the rest are "other").
_MAX_REASONS = 50
#: Seconds between two log lines about handshakes failing for the same reason.
_LOG_EVERY = 60.0
_CRL_PEM = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
_PEM_LABEL = re.compile(rb"-----BEGIN ([^-\r\n]+)-----")


def _canonical(name: Name) -> tuple[tuple[str, str], ...]:
    """A distinguished name as OpenSSL compares them: each value case-folded, with
    leading, trailing and repeated spaces dropped."""
    return tuple(
        (attribute.oid.dotted_string, " ".join(str(attribute.value).split()).casefold())
        for attribute in name
    )


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
    others = sorted({label.decode() for label in _PEM_LABEL.findall(data)} - {"X509 CRL"})
    if others:
        # load_verify_locations would take a CERTIFICATE block here as a trusted CA.
        raise ConfigError(
            source,
            key,
            f"{settings.client_crl} holds a {others[0]} block: only revocation lists"
            " (X509 CRL) may be in it (put CA certificates in server.tls.client_ca)",
        )
    blocks = _CRL_PEM.findall(data)
    if not blocks:
        raise ConfigError(
            source,
            key,
            f"{settings.client_crl} holds no revocation list (PEM '-----BEGIN X509 CRL-----')",
        )
    issuers: list[str] = []
    covered: set[tuple[tuple[str, str], ...]] = set()
    updates: list[float] = []
    for number, block in enumerate(blocks, 1):
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError as exc:
            raise ConfigError(
                source, key, f"revocation list {number} of {settings.client_crl}: {exc}"
            ) from None
        issuer = crl.issuer.rfc4514_string()
        # OpenSSL matches names ignoring case and runs of spaces (its canonical form).
        named = [ca for ca in cas if _canonical(ca.subject) == _canonical(crl.issuer)]
        if named and not any(_signed_by(crl, ca) for ca in named):
            raise ConfigError(
                source,
                key,
                f"the revocation list of {issuer} in {settings.client_crl} is not signed by"
                f" the key of that CA in {settings.client_ca}",
            )
        last_update = crl.last_update_utc
        if now is not None and last_update.timestamp() > now:
            raise ConfigError(
                source,
                key,
                f"the revocation list of {issuer} is not valid before"
                f" {last_update.isoformat()} (its last update is in the future): OpenSSL"
                " would refuse every certificate that CA issued until then",
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
        covered.add(_canonical(crl.issuer))
    uncovered = tuple(
        dict.fromkeys(
            ca.subject.rfc4514_string() for ca in cas if _canonical(ca.subject) not in covered
        )
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
                # A name with control characters would read as another once they are
                # stripped from a header ("bill\ring" as "billing"): the subject instead.
                common = value if _printable(value) else ""
            parts.append(f"{_SHORT_NAMES.get(name, name)}={escape_dn_value(value)}")
        rdns.append("+".join(parts))
    if rdns:
        subject = ",".join(rdns)
        return subject, common or subject
    for kind in _SAN_KINDS:
        for value in alternative_names(peercert, kind):
            return value, value
    return None


def _printable(value: str) -> bool:
    return all(" " <= char != "\x7f" for char in value)


def alternative_names(peercert: dict[str, object], kind: str) -> list[str]:
    """The certificate's alternative names of ``kind`` (``URI``, ``DNS``, ``email``),
    leaving out any holding a control character: such a name cannot be written in a
    header without either dropping the character (so ``bill\\ring`` would read as
    ``billing``) or an escape that a genuine name could also spell, so it names no one."""
    names = peercert.get("subjectAltName") or ()
    assert isinstance(names, tuple)
    return [value for found, value in names if found == kind and value and _printable(value)]


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
            parts += [f"{kind}={_xfcc_value(value)}" for value in alternative_names(peercert, kind)]
    # The subject's control characters are hex-escaped, other names' left out: none remain.
    return ";".join(parts).encode("utf-8", "replace")


@contextmanager
def _refusing(source: str, key: str, what: str) -> Iterator[None]:
    """Turn a TLS file that does not load into :class:`ConfigError` naming ``key``."""
    try:
        yield
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(source, key, f"cannot load {what}: {_reason(exc)}") from None


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
    with _refusing(source, key, "the TLS files"):
        context = ssl.create_default_context(
            cafile=str(settings.ca) if settings.ca is not None else None
        )
        if settings.cert is not None and settings.key is not None:
            context.load_cert_chain(settings.cert, settings.key)
    context.set_alpn_protocols(["http/1.1"])
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ListenerTls:
    """The listener's TLS: the context the server was started with, and the one new
    handshakes use, swapped in by its SNI callback; a reload replaces the latter."""

    def __init__(
        self,
        settings: TlsSettings,
        source: str,
        *,
        clock: Clock | None = None,
        http2: bool = False,
    ) -> None:
        #: ALPN's offer, fixed for the listener's life (a change takes a restart).
        self.http2 = http2
        self.listener = server_context(settings, source, http2=http2)
        self.current = self.listener
        self.listener.sni_callback = self._choose
        self.listener.sslobject_class = self._counting_class()
        self.trust = client_trust(settings)
        self.clock: Clock = clock or SystemClock()
        #: Failed handshakes by reason (``certificate revoked``, ``unknown ca``...).
        self.failures: dict[str, int] = {}
        self._logged: dict[str, tuple[float, int]] = {}  # reason: (logged at, since)
        #: Bumped when what client certificates are checked against changes.
        self.generation = 0
        #: TLS 1.2 session ids of full handshakes, with the generation they were checked
        #: under (oldest first, bounded as OpenSSL's own session cache).
        self._sessions: OrderedDict[bytes, int] = OrderedDict()

    def _choose(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> int | None:
        del name  # one certificate for every name
        # OpenSSL has decided on resumption before this callback: a resumed session skips
        # the client certificate's checks, so one checked against other CAs or lists than
        # today's fails the handshake. The fatal alert makes OpenSSL drop the session from
        # its cache, and the client's next handshake is a full one. (TLS 1.3 does not
        # resume here: no tickets are issued.)
        if connection.session_reused and self.listener.verify_mode != ssl.CERT_NONE:
            # (Without client certificates there is nothing a resumption could skip; and
            # a session resumed from a ticket has an id of the client's, never recorded.)
            session = connection.session
            if session is None or self._sessions.get(session.id) != self.generation:
                connection.stale_session = True  # type: ignore[attr-defined]  # read by failed()
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        if self.current is not self.listener:
            connection.context = self.current
        return None

    def _counting_class(self) -> type[ssl.SSLObject]:
        """The listener's SSLObject class: its handshakes' failures are counted (uvloop,
        like asyncio, drops them silently)."""
        failed = self.failed

        class CountingSSLObject(ssl.SSLObject):
            def do_handshake(self) -> None:
                try:
                    super().do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    raise
                except ssl.SSLError as exc:
                    failed(exc, stale_session=getattr(self, "stale_session", False))
                    raise

        return CountingSSLObject

    def failed(self, exc: ssl.SSLError, *, stale_session: bool = False) -> None:
        """Count a failed handshake, and log its reason: the first time, then at most
        once a minute per reason, with how many there were meanwhile."""
        reason = (
            "session resumed after the trusted CAs or revocation lists changed"
            if stale_session
            else handshake_failure_reason(exc)
        )
        if reason not in self.failures and len(self.failures) >= _MAX_REASONS:
            reason = "other"
        self.failures[reason] = self.failures.get(reason, 0) + 1
        now = self.clock.monotonic()
        logged_at, since = self._logged.get(reason, (-math.inf, 0))
        if now - logged_at < _LOG_EVERY:
            self._logged[reason] = (logged_at, since + 1)
            return
        self._logged[reason] = (now, 0)
        more = f" (and {since} more since the last report)" if since else ""
        log.warning("gateway: a TLS handshake failed: %s%s", reason, more)

    def record(self, connection: ssl.SSLObject) -> None:
        """Remember the session of a completed full handshake (for :meth:`_choose`)."""
        if connection.session_reused:
            return
        session = connection.session
        if session is not None and session.id:
            self._sessions[session.id] = self.generation
            if len(self._sessions) > _MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def replace(self, settings: TlsSettings, source: str) -> bool:
        """Use ``settings`` for new handshakes (or :class:`ConfigError`, and keep the old);
        ``True`` if what client certificates are checked against changed.

        The certificate, key and CA store come from the new context; whether a client
        certificate is asked for is read from the listener's own, so it is set there too.
        """
        fresh = server_context(settings, source, http2=self.http2)
        self.listener.verify_mode = fresh.verify_mode
        self.listener.verify_flags = fresh.verify_flags
        self.listener.minimum_version = fresh.minimum_version
        self.listener.num_tickets = fresh.num_tickets
        self.listener.options = fresh.options
        self.current = fresh
        trust = client_trust(settings)
        changed, self.trust = trust != self.trust, trust
        if changed:
            self.generation += 1
            self._sessions.clear()
        return changed


def handshake_failure_reason(exc: ssl.SSLError) -> str:
    """Why a handshake failed, in OpenSSL's words: the certificate check's message
    (``certificate revoked``, ``unable to get local issuer certificate``) or the error's
    reason (``peer did not return a certificate``, ``http request``)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return type(exc).__name__


def client_trust(settings: TlsSettings) -> tuple[object, ...]:
    """What client certificates are checked against: a change ends the connections and
    sessions whose certificates were checked against the old."""
    files = (settings.client_ca, settings.client_crl)
    contents = tuple(None if f is None else _read(f) for f in files)
    return (settings.client_auth if settings.client_ca else None, *contents)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
