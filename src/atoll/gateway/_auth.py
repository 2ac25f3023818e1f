"""Authentication: JWT (JWKS with rotation, or an HS256 secret) and API keys.

What is refused, and why it cannot slip through:

* ``alg: none`` and every algorithm not listed in ``auth.jwt.algorithms``: the token's
  header is checked against the list before any key is looked up.
* Algorithm confusion (an HS256 token "signed" with the RSA public key): HS256 tokens
  are verified only with the configured secret, never with a JWKS key, and a JWKS key is
  used only for the algorithm family of its key type (RSA for RS/PS, EC for ES, OKP for
  EdDSA) and for its own ``alg`` when it names one.
* Unknown ``kid``: the key set is fetched again (at most once per
  ``jwks_min_refetch_interval``, one fetch at a time), then the token is refused.
* ``crit`` header extensions (none are understood), and tokens without a ``sub``.
* ``exp``, ``nbf`` (with ``leeway``), ``iss``, ``aud``; ``exp`` is required.

The key set is loaded before a configuration is used: if that first load fails (or
yields no usable key), the configuration is refused with a :class:`ConfigError`, so a
wrong ``jwks_url`` cannot put in place a gateway that refuses every token. A failed
refresh later keeps the last good keys.

Verified tokens are cached by their exact text (signature included) for at most
``cache_ttl`` seconds; ``exp``/``nbf`` are checked again on every hit, and the cache is
emptied whenever the key set changes, so a key removed from the JWKS stops working
within one refresh.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt

from atoll.config import ConfigError
from atoll.determinism import Clock
from atoll.gateway._config import AuthConfig, JwtConfig
from atoll.gateway._tls import client_subject

log = logging.getLogger("atoll.gateway")

_FAMILY = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "EdDSA": "OKP",
}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who made a request, as verified by the gateway."""

    method: str  # "jwt" or "api_key"
    subject: str
    client: str
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)
    #: The identity headers sent upstream, made once per identity (cached with it).
    headers: tuple[tuple[bytes, bytes], ...] = ()
    #: :attr:`headers` as they go on the wire (``name: value\r\n`` each), joined once.
    header_block: bytes = b""

    def with_headers(self, prefix: str, **extra: str) -> Identity:
        """This identity with its :attr:`headers` under ``prefix`` (``X-Auth-``), and
        ``extra`` ones (``cert_sha256=...`` is ``X-Auth-Cert-Sha256``)."""
        base = prefix.lower().encode()
        headers = (
            (base + b"subject", _header_value(self.subject)),
            (base + b"client", _header_value(self.client)),
            (base + b"method", self.method.encode()),
            (base + b"scopes", _header_value(" ".join(sorted(self.scopes)))),
            *(
                (base + name.replace("_", "-").encode(), _header_value(value))
                for name, value in extra.items()
            ),
        )
        return Identity(
            self.method,
            self.subject,
            self.client,
            self.scopes,
            self.claims,
            headers,
            b"".join(b"%b: %b\r\n" % pair for pair in headers),
        )


def _header_value(text: str) -> bytes:
    """``text`` safe as a header value: control characters (CR, LF, NUL...) removed."""
    return "".join(c for c in text if c >= " " and c != "\x7f").encode("utf-8", "replace")


class AuthError(Exception):
    """Authentication failed (401) or the identity may not use the route (403)."""

    def __init__(
        self, status: int, detail: str, *, error: str = "invalid_token", scope: str = ""
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error = error
        self.scope = scope

    def www_authenticate(self, scheme: str) -> bytes:
        """The ``WWW-Authenticate`` challenge (RFC 6750)."""
        if scheme == "ApiKey":
            return b'ApiKey realm="atoll"'
        if self.error in ("missing", ""):
            return b'Bearer realm="atoll"'
        value = f'Bearer realm="atoll", error="{self.error}"'
        if self.scope:
            value += f', scope="{self.scope}"'
        return value.encode()


#: The longest JOSE header read (an ``x5c`` chain of a few certificates fits): a
#: longer one is refused before decoding, so a token cannot make JSON parsing costly.
_MAX_HEADER_SEGMENT: Final = 16 * 1024


def _b64json(segment: str) -> dict[str, Any]:
    if len(segment) > _MAX_HEADER_SEGMENT:
        raise ValueError("the header is too long")
    padded = segment + "=" * (-len(segment) % 4)
    data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    return data


class _JwksError(ValueError):
    """The JWKS answer is not usable; the message says why."""


def _reason(exc: Exception) -> str:
    """``exc`` in a few words for a log line or a configuration error."""
    if isinstance(exc, _JwksError):
        return str(exc)
    # httpx's messages alone can be empty (timeouts) or vague ("All connection attempts
    # failed"): the type says which failure it was.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class KeySet:
    """The JWKS keys by ``kid``, fetched and refreshed (URL) or read (file)."""

    def __init__(self, config: JwtConfig, clock: Clock, *, source: str) -> None:
        self.config = config
        self.clock = clock
        self.source = source
        self.keys: dict[str, jwt.PyJWK] = {}
        self.version = 0
        self._last_fetch = float("-inf")
        self._fetching: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0
        self.errors = 0

    @property
    def where(self) -> str:
        """The URL or file the keys come from."""
        return self.config.jwks_url or self.config.jwks_file or ""

    async def start(self) -> None:
        """Load the keys once, then refresh them in the background.

        Raises :class:`ConfigError` if this first load fails or yields no usable key:
        nothing could be verified, so the configuration is wrong (a reload keeps the
        configuration that serves). Later refreshes only log their failures.
        """
        self._last_fetch = self.clock.monotonic()
        self.fetches += 1
        try:
            keys = await self._load_keys()
        except Exception as exc:
            raise self._refused(_reason(exc)) from None
        if not keys:
            raise self._refused("it holds no usable signing key (RSA, EC or OKP with a kid)")
        self._install(keys)
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    def _refused(self, reason: str) -> ConfigError:
        self.errors += 1
        key = "auth.jwt.jwks_url" if self.config.jwks_url else "auth.jwt.jwks_file"
        return ConfigError(
            self.source, key, f"the JWKS could not be loaded from {self.where}: {reason}"
        )

    async def stop(self) -> None:
        """Stop refreshing."""
        for task in (self._task, self._fetching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _refresh_forever(self) -> None:
        while True:
            await self.clock.sleep(self.config.jwks_refresh_interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Fetch the key set now (one fetch at a time; concurrent callers share it)."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())
        await asyncio.shield(self._fetching)

    async def refetch_for_unknown_kid(self) -> bool:
        """Fetch again for an unknown ``kid``, unless one was fetched too recently."""
        now = self.clock.monotonic()
        if now - self._last_fetch < self.config.jwks_min_refetch_interval:
            return False
        await self.refresh()
        return True

    async def _fetch(self) -> None:
        self._last_fetch = self.clock.monotonic()
        self.fetches += 1
        try:
            keys = await self._load_keys()
        except Exception as exc:
            # The provider being down must not lock everyone out: the keys it published
            # last stay valid until it answers again. A valid, emptier set is installed
            # (below): that is how a provider revokes keys.
            self.errors += 1
            log.warning(
                "JWKS from %s could not be loaded (%s); keeping the last %d key(s)",
                self.where,
                _reason(exc),
                len(self.keys),
            )
            return
        self._install(keys)

    def _install(self, keys: dict[str, jwt.PyJWK]) -> None:
        # A key replaced under the same kid (a leaked one rotated out) counts as a change:
        # tokens it verified must not stay accepted from the cache.
        if set(keys) != set(self.keys) or any(
            keys[k].key_type != self.keys[k].key_type or keys[k].key != self.keys[k].key
            for k in keys
        ):
            self.version += 1
        self.keys = keys

    async def _load_keys(self) -> dict[str, jwt.PyJWK]:
        return _parse_jwks(await self._load())

    async def _load(self) -> Any:
        if self.config.jwks_file is not None:
            # A small local file, read rarely: not worth a thread.
            return json.loads(Path(self.config.jwks_file).read_text(encoding="utf-8"))  # noqa: ASYNC240
        import httpx  # noqa: PLC0415 - only for JWKS fetches, off the hot path

        assert self.config.jwks_url is not None
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.get(self.config.jwks_url)
            if not response.is_success:
                # httpx's own message is several lines with a link; the status is enough.
                raise _JwksError(f"HTTP {response.status_code} {response.reason_phrase}")
            return response.json()


def _parse_jwks(data: Any) -> dict[str, jwt.PyJWK]:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise _JwksError("not a JWK set (no 'keys' list)")
    keys: dict[str, jwt.PyJWK] = {}
    for raw in data["keys"]:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        kid = raw.get("kid")
        if not isinstance(kid, str) or raw.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # symmetric keys never come from a key set
        try:
            keys[kid] = jwt.PyJWK(raw)
        # PyJWT raises InvalidKeyError (not a PyJWKError) for a curve it cannot use (an
        # X25519 key) or a bad member; one such key must not cost the whole set.
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            log.warning("JWKS key %r skipped: %s", kid, exc)
    return keys


class Authenticator:
    """Checks credentials for routes; one per configuration generation.

    ``source`` names the configuration in the :class:`ConfigError` that :meth:`start`
    raises when the key set cannot be loaded.
    """

    def __init__(
        self, config: AuthConfig, clock: Clock, *, source: str = "gateway configuration"
    ) -> None:
        self.config = config
        self.clock = clock
        self.jwt = config.jwt
        self.keyset = (
            KeySet(config.jwt, clock, source=source)
            if config.jwt is not None and (config.jwt.jwks_url or config.jwt.jwks_file)
            else None
        )
        self._cache: dict[str, tuple[Identity, float, float, float, int]] = {}
        #: The same entries by the exact ``Authorization`` value that carried the token:
        #: a client's every request after its first then costs one lookup, with no
        #: splitting, stripping or decoding of a 1 KB field (see :meth:`cached_header`).
        self._by_header: dict[bytes, tuple[Identity, float, float, float, int]] = {}
        self._api_keys = {
            k.sha256: Identity("api_key", k.name, k.name, frozenset(k.scopes)).with_headers(
                config.identity_prefix
            )
            for k in config.api_keys
        }
        self.api_key_header = config.api_key_header
        self.failures: dict[str, int] = {}

    async def start(self) -> None:
        """Load the JWKS; :class:`ConfigError` if it cannot be loaded."""
        if self.keyset is not None:
            await self.keyset.start()

    async def stop(self) -> None:
        """Stop refreshing the JWKS."""
        if self.keyset is not None:
            await self.keyset.stop()

    def _fail(self, status: int, detail: str, reason: str, **kw: Any) -> AuthError:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        return AuthError(status, detail, **kw)

    # -- client certificates ------------------------------------------------------------

    def client_certificate(self, peercert: object, sha256: str) -> Identity:
        """The identity of a client certificate the TLS handshake verified: its subject
        DN (RFC 4514) as the subject, its common name as the client, no scopes; its
        SHA-256 fingerprint (hex of the DER) goes upstream too, for pinning."""
        found = client_subject(peercert)
        if found is None:
            raise self._fail(403, "the client certificate has no subject", "bad_client_cert")
        subject, common = found
        return Identity("client_cert", subject, common).with_headers(
            self.config.identity_prefix, cert_sha256=sha256
        )

    # -- API keys -------------------------------------------------------------------------

    def api_key(self, value: bytes) -> Identity:
        """The identity of an API key, or :class:`AuthError`."""
        identity = self._api_keys.get(hashlib.sha256(value).digest())
        if identity is None:
            raise self._fail(401, "the API key is not valid", "bad_api_key")
        return identity

    # -- JWT ------------------------------------------------------------------------------

    def cached(self, token: str) -> Identity | None:
        """The identity of a token verified recently (``exp``/``nbf`` checked again), if any.

        Raises :class:`AuthError` for a cached token that has expired since.
        """
        cached = self._cache.get(token)
        if cached is None:
            return None
        now = self.clock.time()
        identity, exp, nbf, until, version = cached
        keyset_version = self.keyset.version if self.keyset is not None else 0
        if now < until and version == keyset_version:
            self._check_times(exp, nbf, now)
            return identity
        del self._cache[token]
        return None

    def cached_header(self, value: bytes) -> Identity | None:
        """:meth:`cached` for the whole ``Authorization`` value (``b"Bearer <token>"``)
        that carried a token verified recently, as :meth:`remember_header` recorded it.

        The same checks hold: ``exp``/``nbf`` against the clock, the entry's age, and
        the key set's version (a rotated or replaced key voids it). Raises
        :class:`AuthError` for a cached token that has expired since.
        """
        entry = self._by_header.get(value)
        if entry is None:
            return None
        identity, exp, nbf, until, version = entry
        now = self.clock.time()
        if now < until and version == (self.keyset.version if self.keyset is not None else 0):
            self._check_times(exp, nbf, now)
            return identity
        del self._by_header[value]
        return None

    def remember_header(self, value: bytes, token: str) -> None:
        """Let :meth:`cached_header` find ``token``'s cached entry by ``value``, the
        ``Authorization`` field it came in; nothing if the token is not cached."""
        entry = self._cache.get(token)
        if entry is None:
            return
        by_header = self._by_header
        if len(by_header) >= len(self._cache) and value not in by_header:
            del by_header[next(iter(by_header))]  # no more entries than the cache holds
        by_header[value] = entry

    async def bearer(self, token: str) -> Identity:
        """The identity of a bearer token, or :class:`AuthError` saying what is wrong."""
        identity = self.cached(token)
        if identity is not None:
            return identity
        now = self.clock.time()
        identity, exp, nbf = await self._verify(token, now)
        cache = self._cache
        assert self.jwt is not None
        if self.jwt.cache_size and self.jwt.cache_ttl > 0:
            if len(cache) >= self.jwt.cache_size:
                del cache[next(iter(cache))]
            cache[token] = (
                identity,
                exp,
                nbf,
                now + self.jwt.cache_ttl,
                self.keyset.version if self.keyset is not None else 0,
            )
        return identity

    def _check_times(self, exp: float, nbf: float, now: float) -> None:
        assert self.jwt is not None
        leeway = self.jwt.leeway
        if now > exp + leeway:
            raise self._fail(401, "the token has expired", "expired")
        if now + leeway < nbf:
            raise self._fail(401, "the token is not valid yet (nbf)", "not_yet_valid")

    async def _verify(  # noqa: C901, PLR0912 - one check after another, each with its reason
        self, token: str, now: float
    ) -> tuple[Identity, float, float]:
        config = self.jwt
        if config is None:
            raise self._fail(401, "bearer tokens are not accepted here", "no_jwt")
        parts = token.split(".")
        if len(parts) != 3:
            raise self._fail(401, "the token is not a JWS compact serialization", "malformed")
        try:
            header = _b64json(parts[0])
        # RecursionError: JSON nested a thousand deep fits in 3 KB.
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
            raise self._fail(
                401, "the token's header is not valid base64url JSON", "malformed"
            ) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise self._fail(401, "unsigned tokens (alg 'none') are not accepted", "alg_none")
        if alg not in config.algorithms:
            raise self._fail(401, f"algorithm {alg!r} is not accepted", "bad_alg")
        if "crit" in header:
            raise self._fail(401, "tokens with critical header extensions are not accepted", "crit")
        key: Any
        if alg == "HS256":
            key = config.hs256_secret
        else:
            key = await self._public_key(header, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={
                    "verify_signature": True,
                    "verify_exp": False,  # checked below on the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise self._fail(401, "the token's signature is not valid", "bad_signature") from None
        except jwt.InvalidTokenError as exc:
            raise self._fail(401, f"the token is not valid: {exc}", "invalid") from None
        except RecursionError:  # claims nested past the parser's depth (signed, though)
            raise self._fail(401, "the token's claims are nested too deep", "invalid") from None
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise self._fail(401, "the token has no numeric 'exp' claim", "no_exp")
        nbf = claims.get("nbf", 0)
        if isinstance(nbf, bool) or not isinstance(nbf, int | float):
            raise self._fail(401, "the token's 'nbf' claim is not a number", "invalid")
        self._check_times(float(exp), float(nbf), now)
        if config.issuer and claims.get("iss") not in config.issuer:
            raise self._fail(401, "the token's issuer is not accepted", "bad_issuer")
        if config.audience:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(a in config.audience for a in audiences):
                raise self._fail(401, "the token is not meant for this audience", "bad_audience")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise self._fail(401, "the token has no 'sub' claim", "no_sub")
        client = claims.get("azp") or claims.get("client_id") or subject
        identity = Identity(
            "jwt", subject, str(client), _scopes(claims, config.scope_claim), claims
        ).with_headers(self.config.identity_prefix)
        return identity, float(exp), float(nbf)

    async def _public_key(self, header: dict[str, Any], alg: str) -> Any:
        keyset = self.keyset
        if keyset is None:
            raise self._fail(401, f"no keys are configured for {alg}", "bad_alg")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise self._fail(401, "the token names no key ('kid')", "no_kid")
        jwk = keyset.keys.get(kid)
        if jwk is None and await keyset.refetch_for_unknown_kid():
            jwk = keyset.keys.get(kid)
        if jwk is None:
            raise self._fail(401, "the token's key id is unknown", "unknown_kid")
        if jwk.key_type != _FAMILY[alg]:
            raise self._fail(
                401, f"key {kid!r} is a {jwk.key_type} key and cannot verify {alg}", "alg_mismatch"
            )
        declared = jwk._jwk_data.get("alg")
        if declared is not None and declared != alg:
            raise self._fail(401, f"key {kid!r} is for {declared}, not {alg}", "alg_mismatch")
        return jwk.key


def _scopes(claims: Mapping[str, Any], claim: str) -> frozenset[str]:
    value = claims.get(claim)
    if value is None and claim == "scope":
        value = claims.get("scp")
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(str(v) for v in value)
    return frozenset()
