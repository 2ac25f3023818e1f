"""Development tokens (``atoll token``): JWTs the gateway's configuration accepts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt

from atoll.determinism import Clock, SystemClock


def mint_token(
    *,
    subject: str,
    scopes: Sequence[str] = (),
    ttl: float = 3600.0,
    secret: bytes | None = None,
    private_key: str | Path | None = None,
    algorithm: str | None = None,
    kid: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    claims: Mapping[str, Any] | None = None,
    clock: Clock | None = None,
) -> str:
    """A signed JWT: HS256 with ``secret``, or RS256/ES256/EdDSA with a PEM ``private_key``.

    For development and tests. Production tokens come from an identity provider.
    """
    now = int((clock or SystemClock()).time())
    payload: dict[str, Any] = {"sub": subject, "iat": now, "nbf": now, "exp": now + int(ttl)}
    if scopes:
        payload["scope"] = " ".join(scopes)
    if issuer:
        payload["iss"] = issuer
    if audience:
        payload["aud"] = audience
    payload.update(claims or {})
    headers = {"kid": kid} if kid else None
    if private_key is not None:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
        alg = algorithm or _algorithm_for(key)
        return jwt.encode(payload, key, algorithm=alg, headers=headers)  # type: ignore[arg-type]
    if secret is None:
        raise ValueError("give a secret (HS256) or a private key")
    return jwt.encode(payload, secret, algorithm=algorithm or "HS256", headers=headers)


def _algorithm_for(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: PLC0415

    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        # RFC 7518 3.4: the curve names the algorithm (P-256 ES256, P-384 ES384, P-521 ES512).
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if key.curve.name not in by_curve:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return by_curve[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(key).__name__}")
