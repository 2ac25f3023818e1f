"""JWT and API-key authentication, including the attacks the gateway must refuse."""

import base64
import hashlib
import hmac
import json

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from gateway_support import (
    base_config,
    problem_of,
    raw_request,
    running_gateway,
    url,
    write_config,
)

from atoll.determinism import SystemClock
from atoll.gateway import mint_token

SECRET = "a-development-secret-of-32-bytes!!"
ISS = "https://id.example"
AUD = "shop"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk(key, kid):
    data = json.loads(jwt.algorithms.get_default_algorithms()[_alg(key)].to_jwk(key.public_key()))
    data["kid"] = kid
    return data


def _alg(key):
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    return "EdDSA"


class Keys:
    def __init__(self, tmp_path):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.jwks = tmp_path / "jwks.json"
        self.publish({"rsa-1": self.rsa, "ec-1": self.ec, "ed-1": self.ed})

    def publish(self, keys):
        self.jwks.write_text(json.dumps({"keys": [_jwk(k, kid) for kid, k in keys.items()]}))

    def token(self, key, kid, *, alg=None, **claims):
        now = int(SystemClock().time())
        payload = {"sub": "alice", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 300}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key, algorithm=alg or _alg(key), headers={"kid": kid})


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path)


@pytest.fixture
def auth_config(tmp_path, stub, keys):
    return write_config(
        tmp_path / "gateway.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [
                {
                    "name": "read",
                    "match": {"prefix": "/read"},
                    "upstream": "a",
                    "auth": "jwt",
                    "scopes": ["orders:read"],
                },
                {
                    "name": "any",
                    "match": {"prefix": "/any"},
                    "upstream": "a",
                    "auth": ["jwt", "api_key"],
                },
                {
                    "name": "keys",
                    "match": {"prefix": "/keys"},
                    "upstream": "a",
                    "auth": "api_key",
                    "scopes": ["partner"],
                },
                {"name": "open", "match": {"prefix": "/open"}, "upstream": "a"},
                {
                    "name": "staff",
                    "match": {"prefix": "/staff"},
                    "upstream": "a",
                    "auth": "jwt",
                    # bob only as a client certificate's subject, carol only by token
                    "allow_subjects": ["alice", "ops-*", "client_cert:bob", "jwt:carol"],
                },
                {
                    "name": "ruled",
                    "match": {"prefix": "/ruled"},
                    "upstream": "a",
                    "auth": "jwt",
                    "request_headers": {
                        "set": {"x-auth-method": "gateway"},
                        "remove": ["x-auth-client"],
                    },
                },
            ],
            auth={
                "jwt": {
                    "issuer": ISS,
                    "audience": AUD,
                    "algorithms": ["RS256", "ES256", "EdDSA", "HS256"],
                    "jwks_file": str(keys.jwks),
                    "hs256_secret": SECRET,
                    "leeway": 5,
                    "jwks_min_refetch_interval": 0,
                },
                "api_keys": {
                    "keys": [
                        {"name": "partner-a", "key": "pk-0123456789abcdef", "scopes": ["partner"]},
                        {
                            "name": "partner-b",
                            "sha256": hashlib.sha256(b"pk-fedcba9876543210").hexdigest(),
                        },
                    ]
                },
            },
        ),
    )


def bearer(token):
    return {"authorization": f"Bearer {token}"}


async def test_valid_tokens_of_every_algorithm_are_accepted_and_identity_forwarded(
    auth_config, keys, stub
):
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        for key, kid in ((keys.rsa, "rsa-1"), (keys.ec, "ec-1"), (keys.ed, "ed-1")):
            r = await client.get(
                url(gw, "/read/x"), headers=bearer(keys.token(key, kid, scope="orders:read"))
            )
            assert r.status_code == 200, (kid, r.text)
        hs = mint_token(
            subject="bob", scopes=["orders:read"], secret=SECRET.encode(), issuer=ISS, audience=AUD
        )
        r = await client.get(
            url(gw, "/read/x"),
            headers=bearer(hs) | {"x-auth-subject": "root", "X-Auth-Scopes": "admin"},
        )
        assert r.status_code == 200
        seen = stub.hits[-1]["headers"]
        assert seen["x-auth-subject"] == "bob"  # the forged copy was dropped
        assert seen["x-auth-scopes"] == "orders:read"
        assert seen["x-auth-method"] == "jwt"
        # A route without auth still strips forged identity headers.
        await client.get(url(gw, "/open/x"), headers={"x-auth-subject": "root"})
        assert "x-auth-subject" not in stub.hits[-1]["headers"]


async def test_header_rules_apply_to_the_identity_headers_too(auth_config, stub):
    # Without rules the identity's headers go upstream pre-joined; with rules they are
    # forwarded as separate headers so that the rules can set and remove them.
    hs = mint_token(subject="eve", scopes=["s1"], secret=SECRET.encode(), issuer=ISS, audience=AUD)
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/ruled/x"), headers=bearer(hs) | {"x-auth-subject": "root"})
        assert r.status_code == 200, r.text
        seen = stub.hits[-1]["headers"]
        assert seen["x-auth-subject"] == "eve"
        assert seen["x-auth-scopes"] == "s1"
        assert seen["x-auth-method"] == "gateway"
        assert "x-auth-client" not in seen
        names = [n for n, _ in stub.hits[-1]["header_list"] if n.startswith("x-auth-")]
        assert sorted(names) == ["x-auth-method", "x-auth-scopes", "x-auth-subject"]
        r = await client.get(url(gw, "/read/x"), headers=bearer(hs))
        assert r.status_code == 403
        r = await client.get(url(gw, "/any/x"), headers=bearer(hs) | {"x-auth-subject": "root"})
        assert r.status_code == 200, r.text
        identity = [(n, v) for n, v in stub.hits[-1]["header_list"] if n.startswith("x-auth-")]
        assert sorted(identity) == [
            ("x-auth-client", "eve"),
            ("x-auth-method", "jwt"),
            ("x-auth-scopes", "s1"),
            ("x-auth-subject", "eve"),
        ]


async def test_alg_none_is_refused(auth_config, keys):
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(
        json.dumps(
            {"sub": "alice", "iss": ISS, "aud": AUD, "exp": 4102444800, "scope": "orders:read"}
        ).encode()
    )
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        for token in (f"{header}.{payload}.", f"{header}.{payload}.c2ln"):
            r = await client.get(url(gw, "/read/x"), headers=bearer(token))
            assert r.status_code == 401
            assert "alg 'none'" in r.json()["detail"]
            assert r.headers["www-authenticate"].startswith("Bearer")


def assert_invalid_token(r, detail, case):
    assert r.status_code == 401, (case, r.text)
    assert r.headers["content-type"] == "application/problem+json", case
    assert r.headers["www-authenticate"] == 'Bearer realm="atoll", error="invalid_token"', case
    assert detail in r.json()["detail"], (case, r.json())


def _hs512(claims):
    header = _b64(json.dumps({"alg": "HS512", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    mac = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha512).digest()
    return f"{header}.{payload}.{_b64(mac)}"


async def test_alg_none_in_any_case_is_refused(auth_config, keys):
    payload = _b64(
        json.dumps(
            {"sub": "alice", "iss": ISS, "aud": AUD, "exp": 4102444800, "scope": "orders:read"}
        ).encode()
    )
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        for alg in ("None", "NONE", "nOnE", "none"):
            header = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": "rsa-1"}).encode())
            for token in (f"{header}.{payload}.", f"{header}.{payload}.c2ln"):
                r = await client.get(url(gw, "/read/x"), headers=bearer(token))
                assert_invalid_token(r, "alg 'none'", alg)
        assert gw.gen.auth.failures["alg_none"] == 8


async def test_algorithms_not_in_the_allow_list_are_refused(auth_config, keys):
    # The configured list is RS256, ES256, EdDSA and HS256. Each token below is properly
    # signed with a key the gateway has, only its algorithm is not allowed.
    cases = {
        "RS384": keys.token(keys.rsa, "rsa-1", alg="RS384", scope="orders:read"),
        "PS256": keys.token(keys.rsa, "rsa-1", alg="PS256", scope="orders:read"),
        # Signed by hand: PyJWT warns about a 34-byte secret for SHA-512.
        "HS512": _hs512(
            {"sub": "alice", "iss": ISS, "aud": AUD, "exp": 4102444800, "scope": "orders:read"}
        ),
    }
    # Algorithm names are matched exactly: "rs256" is not RS256.
    rs256 = keys.token(keys.rsa, "rsa-1", scope="orders:read")
    header, rest = rs256.split(".", 1)
    header_data = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    cases["rs256"] = _b64(json.dumps(header_data | {"alg": "rs256"}).encode()) + "." + rest
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        for alg, token in cases.items():
            r = await client.get(url(gw, "/read/x"), headers=bearer(token))
            assert_invalid_token(r, f"algorithm {alg!r} is not accepted", alg)
        # The same key with an allowed algorithm passes: the refusals were for the alg.
        r = await client.get(url(gw, "/read/x"), headers=bearer(rs256))
        assert r.status_code == 200, r.text


async def test_tokens_with_crit_headers_are_refused(auth_config, keys):
    claims = {"sub": "alice", "iss": ISS, "aud": AUD, "exp": 4102444800, "scope": "orders:read"}
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        for crit in (
            {"crit": ["x-unknown"], "x-unknown": 1},
            # PyJWT itself understands b64 and would accept this one: the gateway does not.
            {"crit": ["b64"], "b64": True},
            {"crit": []},
        ):
            token = jwt.encode(claims, keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"} | crit)
            r = await client.get(url(gw, "/read/x"), headers=bearer(token))
            assert_invalid_token(r, "critical header extensions", crit)
        assert gw.gen.auth.failures["crit"] == 3
        token = jwt.encode(claims, keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
        assert (await client.get(url(gw, "/read/x"), headers=bearer(token))).status_code == 200


async def test_tokens_without_a_subject_are_refused(auth_config, keys):
    cases = {
        "no sub": keys.token(keys.rsa, "rsa-1", scope="orders:read", sub=None),
        "empty sub": keys.token(keys.rsa, "rsa-1", scope="orders:read", sub=""),
        "numeric sub": jwt.encode(
            {"sub": 42, "iss": ISS, "aud": AUD, "exp": 4102444800, "scope": "orders:read"},
            SECRET,
            algorithm="HS256",
        ),
        "hs256 no sub": jwt.encode(
            {"iss": ISS, "aud": AUD, "exp": 4102444800, "scope": "orders:read"},
            SECRET,
            algorithm="HS256",
        ),
    }
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        for name, token in cases.items():
            r = await client.get(url(gw, "/read/x"), headers=bearer(token))
            # PyJWT refuses a non-string sub itself; either way the token is invalid.
            detail = "'sub'" if name != "numeric sub" else "Subject must be a string"
            assert_invalid_token(r, detail, name)


async def test_algorithm_confusion_hs256_signed_with_the_public_key_is_refused(auth_config, keys):
    public_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = _b64(
        json.dumps(
            {"sub": "mallory", "iss": ISS, "aud": AUD, "exp": 4102444800, "scope": "orders:read"}
        ).encode()
    )
    signature = _b64(hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/read/x"), headers=bearer(f"{header}.{payload}.{signature}"))
        assert r.status_code == 401
        assert r.json()["detail"] == "the token's signature is not valid"
        # And an RS256 header on an EC key's kid is refused by key type.
        forged = keys.token(keys.ec, "rsa-1", scope="orders:read")
        r = await client.get(url(gw, "/read/x"), headers=bearer(forged))
        assert r.status_code == 401


async def test_forged_expired_early_and_misaddressed_tokens(auth_config, keys):
    now = int(SystemClock().time())
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        cases = {
            "forged": keys.token(
                rsa.generate_private_key(public_exponent=65537, key_size=2048),
                "rsa-1",
                scope="orders:read",
            ),
            "expired": keys.token(keys.rsa, "rsa-1", scope="orders:read", exp=now - 60),
            "not yet": keys.token(keys.rsa, "rsa-1", scope="orders:read", nbf=now + 60),
            "issuer": keys.token(
                keys.rsa, "rsa-1", scope="orders:read", iss="https://evil.example"
            ),
            "audience": keys.token(keys.rsa, "rsa-1", scope="orders:read", aud="other"),
            "no exp": keys.token(keys.rsa, "rsa-1", scope="orders:read", exp=None),
            "garbage": "not.a.token",
            "two parts": "abc.def",
            "tampered": keys.token(keys.rsa, "rsa-1", scope="orders:read")[:-6] + "AAAAAA",
        }
        for name, token in cases.items():
            r = await client.get(url(gw, "/read/x"), headers=bearer(token))
            assert r.status_code == 401, name
            assert r.headers["content-type"] == "application/problem+json", name
        # Within the leeway both are still fine.
        ok = keys.token(keys.rsa, "rsa-1", scope="orders:read", exp=now - 2, nbf=now + 2)
        assert (await client.get(url(gw, "/read/x"), headers=bearer(ok))).status_code == 200
        r = await client.get(url(gw, "/read/x"))
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Bearer realm="atoll"'
        r = await client.get(url(gw, "/read/x"), headers={"authorization": "Basic YTpi"})
        assert r.status_code == 401


async def test_missing_scope_is_403(auth_config, keys):
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        r = await client.get(
            url(gw, "/read/x"), headers=bearer(keys.token(keys.rsa, "rsa-1", scope="orders:write"))
        )
        assert r.status_code == 403
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        assert "orders:read" in r.json()["detail"]


async def test_unknown_kid_refetches_the_key_set_once_then_refuses(auth_config, keys):
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        keyset = gw.gen.auth.keyset
        fetches = keyset.fetches
        r = await client.get(
            url(gw, "/read/x"), headers=bearer(keys.token(keys.rsa, "nope", scope="orders:read"))
        )
        assert r.status_code == 401
        assert "key id is unknown" in r.json()["detail"]
        assert keyset.fetches == fetches + 1
        # Rotation: a new key published under a new kid is found by the refetch.
        new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        keys.publish({"rsa-2": new_key, "ec-1": keys.ec})
        r = await client.get(
            url(gw, "/read/x"), headers=bearer(keys.token(new_key, "rsa-2", scope="orders:read"))
        )
        assert r.status_code == 200
        # The retired key no longer verifies (the token cache was emptied on rotation).
        old = keys.token(keys.rsa, "rsa-1", scope="orders:read")
        r = await client.get(url(gw, "/read/x"), headers=bearer(old))
        assert r.status_code == 401


async def test_unknown_kid_refetches_are_rate_limited(tmp_path, auth_config, keys):
    text = auth_config.read_text().replace(
        "jwks_min_refetch_interval: 0", "jwks_min_refetch_interval: 60"
    )
    auth_config.write_text(text)
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        keyset = gw.gen.auth.keyset
        keyset._last_fetch = -1e9  # the start-up load does not count against the interval
        fetches = keyset.fetches
        for i in range(20):
            token = keys.token(keys.rsa, f"random-{i}", scope="orders:read")
            assert (await client.get(url(gw, "/read/x"), headers=bearer(token))).status_code == 401
        assert keyset.fetches == fetches + 1


async def test_api_keys(auth_config, stub):
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/keys/x"), headers={"x-api-key": "pk-0123456789abcdef"})
        assert r.status_code == 200
        seen = stub.hits[-1]["headers"]
        assert seen["x-auth-client"] == "partner-a"
        assert seen["x-auth-method"] == "api_key"
        assert "x-api-key" not in seen  # the key itself is not passed on
        r = await client.get(url(gw, "/keys/x"), headers={"x-api-key": "pk-fedcba9876543210"})
        assert r.status_code == 403  # partner-b lacks the scope
        r = await client.get(url(gw, "/keys/x"), headers={"x-api-key": "wrong"})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("ApiKey")
        r = await client.get(url(gw, "/any/x"), headers={"x-api-key": "pk-fedcba9876543210"})
        assert r.status_code == 200


async def test_a_verified_token_stays_at_the_gateway_unless_forward_token(
    tmp_path, auth_config, stub
):
    # Upstreams get the identity, not a credential they could replay (Envoy's jwt_authn
    # and Istio do the same by default); an Authorization the gateway did not use goes on.
    hs = mint_token(
        subject="bob", scopes=["orders:read"], secret=SECRET.encode(), issuer=ISS, audience=AUD
    )
    basic = {"authorization": "Basic YTpi"}
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/read/x"), headers=bearer(hs))).status_code == 200
        verified = stub.hits[-1]["headers"]
        assert (await client.get(url(gw, "/open/x"), headers=bearer(hs))).status_code == 200
        unprotected = stub.hits[-1]["headers"]
        key = {"x-api-key": "pk-0123456789abcdef"}
        assert (await client.get(url(gw, "/keys/x"), headers=key | basic)).status_code == 200
        beside_a_key = stub.hits[-1]["headers"]
    assert "authorization" not in verified
    assert verified["x-auth-subject"] == "bob"
    assert unprotected["authorization"] == f"Bearer {hs}"
    assert beside_a_key["authorization"] == "Basic YTpi"
    assert beside_a_key["x-auth-method"] == "api_key"
    document = yaml.safe_load(auth_config.read_text())
    document["auth"]["jwt"]["forward_token"] = True
    relaying = write_config(tmp_path / "relay.yaml", document)
    async with running_gateway(relaying) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/read/x"), headers=bearer(hs))).status_code == 200
        assert stub.hits[-1]["headers"]["authorization"] == f"Bearer {hs}"


async def test_a_repeated_authorization_header_is_refused(auth_config, stub):
    # The gateway would verify one and an upstream might read the other.
    hs = mint_token(
        subject="bob", scopes=["orders:read"], secret=SECRET.encode(), issuer=ISS, audience=AUD
    )
    async with running_gateway(auth_config) as gw:
        for path in ("/read/x", "/open/x"):
            raw = await raw_request(
                gw.port,
                f"GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {hs}\r\n"
                "authorization: Bearer forged\r\nconnection: close\r\n\r\n".encode(),
            )
            status, problem = problem_of(raw)
            assert status == 400, raw[:300]
            assert problem["detail"] == "more than one Authorization header"
    assert not stub.hits


async def test_an_api_key_beside_a_non_bearer_authorization_identifies(auth_config, stub):
    # On a route taking either, Basic credentials meant for the upstream do not hide the
    # API key; alone they are still refused.
    basic = {"authorization": "Basic YTpi"}
    key = {"x-api-key": "pk-0123456789abcdef"}
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/any/x"), headers=key | basic)
        assert r.status_code == 200, r.text
        seen = stub.hits[-1]["headers"]
        r = await client.get(url(gw, "/any/x"), headers=basic)
        assert r.status_code == 401
        assert "Bearer" in r.json()["detail"]
    assert seen["x-auth-method"] == "api_key"
    assert seen["x-auth-client"] == "partner-a"
    assert seen["authorization"] == "Basic YTpi"


async def test_allow_subjects_admits_only_the_subjects_named(auth_config, stub):
    def token(subject):
        return mint_token(
            subject=subject, scopes=[], secret=SECRET.encode(), issuer=ISS, audience=AUD
        )

    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        for subject, status in (
            ("alice", 200),
            ("ops-7", 200),
            ("carol", 200),
            ("bob", 403),  # a token's sub does not pass for a certificate's subject
            ("ops", 403),
            ("jwt:carol", 403),
        ):
            # Twice each: a token verified now, then the same one from the cache.
            for _ in range(2):
                r = await client.get(url(gw, "/staff/x"), headers=bearer(token(subject)))
                assert r.status_code == status, (subject, r.text)
        refused = await client.get(url(gw, "/staff/x"), headers=bearer(token("mallory")))
        assert refused.headers["content-type"] == "application/problem+json"
        assert "'mallory' may not use this route" in refused.json()["detail"]


# --- found by a review -------------------------------------------------------------------


async def test_a_deeply_nested_token_header_is_a_401_not_a_500(auth_config):
    header = _b64(b'{"alg":"RS256","x":' + b"[" * 1200 + b"]" * 1200 + b"}")  # 3 KB
    payload = _b64(b'{"sub":"mallory","exp":4102444800}')
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/read/x"), headers=bearer(f"{header}.{payload}.c2ln"))
        assert r.status_code == 401, r.text
        assert r.headers["content-type"] == "application/problem+json"


async def test_one_key_pyjwt_cannot_load_does_not_freeze_the_key_set(auth_config, keys):
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        keys.publish({"rsa-2": new_key, "ec-1": keys.ec})  # rsa-1 out, rsa-2 in
        document = json.loads(keys.jwks.read_text())
        document["keys"].append({"kty": "OKP", "crv": "X25519", "kid": "dh", "x": _b64(bytes(32))})
        keys.jwks.write_text(json.dumps(document))
        await gw.gen.auth.keyset.refresh()
        new = keys.token(new_key, "rsa-2", scope="orders:read")
        assert (await client.get(url(gw, "/read/x"), headers=bearer(new))).status_code == 200
        retired = keys.token(keys.rsa, "rsa-1", scope="orders:read")
        assert (await client.get(url(gw, "/read/x"), headers=bearer(retired))).status_code == 401


async def test_a_key_replaced_under_the_same_kid_empties_the_token_cache(auth_config, keys):
    async with running_gateway(auth_config) as gw, httpx.AsyncClient() as client:
        old = keys.token(keys.rsa, "rsa-1", scope="orders:read")
        assert (await client.get(url(gw, "/read/x"), headers=bearer(old))).status_code == 200
        new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        keys.publish({"rsa-1": new_key, "ec-1": keys.ec, "ed-1": keys.ed})  # leaked key replaced
        await gw.gen.auth.keyset.refresh()
        other = keys.token(keys.rsa, "rsa-1", scope="orders:read", jti="x")
        assert (await client.get(url(gw, "/read/x"), headers=bearer(other))).status_code == 401
        assert (await client.get(url(gw, "/read/x"), headers=bearer(old))).status_code == 401


# --- the cache by Authorization value ---------------------------------------------------


async def test_a_token_found_by_its_authorization_value_is_checked_as_by_its_text():
    from atoll.determinism import VirtualClock  # noqa: PLC0415
    from atoll.gateway._auth import Authenticator, AuthError  # noqa: PLC0415
    from atoll.gateway._config import AuthConfig, JwtConfig  # noqa: PLC0415

    clock = VirtualClock()
    jwt = JwtConfig(
        issuer=(ISS,),
        audience=(AUD,),
        algorithms=("HS256",),
        hs256_secret=SECRET.encode(),
        leeway=0,
        cache_size=2,
        cache_ttl=600,
    )
    auth = Authenticator(AuthConfig(jwt=jwt), clock)
    await auth.start()

    def token(subject, ttl):
        return mint_token(
            subject=subject, ttl=ttl, secret=SECRET.encode(), issuer=ISS, audience=AUD, clock=clock
        )

    short = token("alice", 60)
    header = b"Bearer " + short.encode()
    assert auth.cached_header(header) is None  # nothing verified yet
    auth.remember_header(header, short)
    assert auth.cached_header(header) is None  # nor is a token that is not cached
    assert (await auth.bearer(short)).subject == "alice"
    auth.remember_header(header, short)
    assert auth.cached_header(header).subject == "alice"
    assert auth.cached_header(b"bearer " + short.encode()) is None  # only the exact value
    await clock.advance(61)  # the token expired while cached
    with pytest.raises(AuthError, match="expired"):
        auth.cached_header(header)

    long = token("bob", 3600)
    long_header = b"Bearer " + long.encode()
    await auth.bearer(long)
    auth.remember_header(long_header, long)
    await clock.advance(601)  # past the cache's ttl: verified again, not found here
    assert auth.cached_header(long_header) is None
    assert long_header not in auth._by_header

    # Never more entries by value than the cache holds.
    for n in range(5):
        t = token(f"user-{n}", 3600)
        await auth.bearer(t)
        auth.remember_header(b"Bearer " + t.encode(), t)
    assert len(auth._by_header) <= max(len(auth._cache), jwt.cache_size)
