"""JWT verification (raafd.security.jwt) with real keys of every supported family, and the
refusals of the auth matrix at the verifier: alg=none, HS/RS confusion, expired, not yet
valid, wrong aud/iss, unknown kid, tampered signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from raafd.config import parse_config
from raafd.security.jwt import JwtError, JwtKeys, load_jwt_keys

SECRET = "an-hmac-secret-of-at-least-32-bytes!!"


def _pem(public: Any) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def keys(jwt_section: dict[str, Any], environ: dict[str, str] | None = None) -> JwtKeys:
    cfg = parse_config({"auth": {"jwt": jwt_section}}, environ or {})
    loaded, problems = load_jwt_keys(cfg.auth.jwt, environ or {})
    assert problems == []
    return loaded


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 600, **extra}


def test_an_hs256_token_gives_its_subject_and_roles() -> None:
    k = keys({"main": {"algorithms": ["HS256"], "secret_env": "S"}}, {"S": SECRET})
    token = jwt.encode(claims(roles=["reader", "writer"]), SECRET, algorithm="HS256")
    identity = k.verify(token)
    assert identity.subject == "alice"
    assert identity.roles == {"reader", "writer"}
    spaced = jwt.encode(claims(roles="a b"), SECRET, algorithm="HS256")
    assert k.verify(spaced).roles == {"a", "b"}
    assert k.verify(jwt.encode(claims(), SECRET, algorithm="HS256")).roles is None


@pytest.mark.parametrize("family", ["RS256", "ES256", "EdDSA"])
def test_public_key_algorithms_verify_from_a_pem_key_or_file(
    family: str, rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    private: Any = {
        "RS256": rsa_key,
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }[family]
    pem = _pem(private.public_key())
    (tmp_path / "key.pem").write_text(pem)
    token = jwt.encode(claims(), private, algorithm=family)
    assert keys({"k": {"algorithms": [family], "key": pem}}).verify(token).subject == "alice"
    from_file = keys({"k": {"algorithms": [family], "key_file": str(tmp_path / "key.pem")}})
    assert from_file.verify(token).subject == "alice"


def test_a_jwks_file_picks_the_key_by_kid(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk.update(kid="k1", alg="RS256")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    k = keys({"idp": {"algorithms": ["RS256"], "jwks_file": str(path)}})
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert k.verify(token).subject == "alice"
    other = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k2"})
    with pytest.raises(JwtError, match=r"key id \(kid\) is not known"):
        k.verify(other)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_the_refusals_of_the_auth_matrix(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = _pem(rsa_key.public_key())
    k = keys(
        {
            "rs": {
                "algorithms": ["RS256"],
                "key": pem,
                "audience": "raafd",
                "issuer": "https://idp.example",
            }
        }
    )
    good = claims(aud="raafd", iss="https://idp.example")
    assert k.verify(jwt.encode(good, rsa_key, algorithm="RS256")).subject == "alice"

    def refused(token: str, reason: str) -> None:
        with pytest.raises(JwtError) as err:
            k.verify(token)
        assert reason in str(err.value)

    none_header = _b64(b'{"alg":"none","typ":"JWT"}')
    none = f"{none_header}.{_b64(json.dumps(good).encode())}."
    refused(none, "algorithm is not allowed")
    # HS/RS confusion: the public key used as an HMAC secret.
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64(json.dumps(good).encode())
    mac = hmac.new(pem.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    refused(f"{header}.{body}.{_b64(mac)}", "algorithm is not allowed")
    refused(jwt.encode({**good, "exp": int(time.time()) - 3600}, rsa_key, "RS256"), "expired")
    refused(jwt.encode({**good, "nbf": int(time.time()) + 3600}, rsa_key, "RS256"), "not valid yet")
    refused(jwt.encode({**good, "aud": "other"}, rsa_key, "RS256"), "audience")
    refused(jwt.encode({**good, "iss": "https://evil.example"}, rsa_key, "RS256"), "issuer")
    no_exp = {key: v for key, v in good.items() if key != "exp"}
    refused(jwt.encode(no_exp, rsa_key, "RS256"), "no exp claim")
    refused(jwt.encode(good, rsa_key, "RS256", headers={"kid": "nope"}), "kid")
    token = jwt.encode(good, rsa_key, algorithm="RS256")
    head, _, signature = token.split(".")
    tampered_payload = _b64(json.dumps({**good, "sub": "root"}).encode())
    refused(f"{head}.{tampered_payload}.{signature}", "signature is not valid")
    refused("not.a.jwt", "not valid")


def test_a_small_leeway_forgives_a_little_clock_skew() -> None:
    k = keys({"m": {"algorithms": ["HS256"], "secret_env": "S", "leeway": 30}}, {"S": SECRET})
    just_expired = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert k.verify(just_expired).subject == "alice"


def test_key_configs_that_invite_mistakes_are_config_problems(tmp_path: Path) -> None:
    from raafd.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "auth": {
                    "jwt": {
                        "mixed": {"algorithms": ["HS256", "RS256"], "key": "x"},
                        "none": {"algorithms": ["none"], "key": "x"},
                        "empty": {"algorithms": [], "key": "x"},
                    }
                }
            },
            {},
        )
    assert err.value.problems == [
        "auth.jwt.mixed.algorithms: HS* and public-key algorithms on one key invite algorithm"
        " confusion",
        "auth.jwt.none.algorithms: 'none' is not allowed; use one of HS256, HS384, HS512, RS256,"
        " RS384, RS512, ES256, ES384, EdDSA",
        "auth.jwt.empty.algorithms: name at least one algorithm (an explicit allowlist)",
    ]
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "auth": {
                    "jwt": {
                        "two": {"algorithms": ["HS256"], "secret_env": "S", "key_file": "/x"},
                        "unset": {"algorithms": ["HS256"], "secret_env": "UNSET"},
                        "missing": {"algorithms": ["RS256"], "key_file": str(tmp_path / "no")},
                    }
                }
            },
            {},
        )
    assert err.value.problems == [
        "auth.jwt.two: give exactly one of secret_env, key, key_file or jwks_file (got 2)",
        "auth.jwt.unset.secret_env: the environment variable UNSET is not set or empty",
        f"auth.jwt.missing.key_file: {tmp_path / 'no'} is not a readable file",
    ]


def test_keys_that_do_not_load_are_listed_without_the_key(rsa_key: rsa.RSAPrivateKey) -> None:
    private_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    cfg = parse_config(
        {
            "auth": {
                "jwt": {
                    "short": {"algorithms": ["HS256"], "secret_env": "S"},
                    "garbage": {"algorithms": ["ES256"], "key": "-----BEGIN nothing"},
                    "private": {"algorithms": ["RS256"], "key": private_pem},
                }
            }
        },
        {"S": "short"},
    )
    _, problems = load_jwt_keys(cfg.auth.jwt, {"S": "short"})
    assert [p.split(":")[0] for p in problems] == [
        "auth.jwt.short",
        "auth.jwt.garbage",
        "auth.jwt.private",
    ]
    assert "at least 32 bytes" in problems[0]
    assert "private key" in problems[2]
    assert all("BEGIN" not in p and "short" not in p.split(": ", 1)[1] for p in problems)
