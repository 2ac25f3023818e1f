"""`atoll token`: errors are one line and exit 2; keys the gateway takes are signed right."""

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from atoll.cli import app
from support import SHOP


def test_a_missing_key_file_is_one_error_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(
        app, ["token", "--config", str(SHOP / "atoll.toml"), "--key", str(tmp_path / "nope.pem")]
    )
    assert result.exit_code == 2, (result.exit_code, repr(result.exception))
    assert "nope.pem" in result.output


def test_a_p384_key_signs_es384(tmp_path):
    """The gateway verifies ES384 (docs/gateway.md); `--key` with a P-384 key must not crash."""
    key = ec.generate_private_key(ec.SECP384R1())
    pem = tmp_path / "p384.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = CliRunner().invoke(
        app, ["token", "--config", str(SHOP / "atoll.toml"), "--key", str(pem)]
    )
    assert result.exit_code == 0, (result.exit_code, repr(result.exception))
    assert jwt.get_unverified_header(result.output.strip())["alg"] == "ES384"
