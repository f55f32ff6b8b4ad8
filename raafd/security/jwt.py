"""JWT bearer tokens (pyjwt): the keys of ``[auth.jwt.*]``, loaded once per configuration, and
the check of one token against them.

The rules, each a refusal with its own sentence (never the token, never a key):

- the header's ``alg`` must be in the allowlist of the key that checks it (``none`` never is;
  one key never mixes HS* with public-key algorithms, so a public key is never used as an HMAC
  secret: no HS/RS confusion);
- a header ``kid`` picks the key (``kid`` of the config entry, or of a JWKS file's key); a kid
  no key has is refused. Without a kid, every key allowing the ``alg`` is tried;
- ``exp`` and ``sub`` are required; ``nbf`` and ``iat`` are checked when present; ``aud`` and
  ``iss`` when the key's config names them; all with the key's ``leeway`` seconds;
- the roles are the ``roles_claim`` (a list of strings, or one space-separated string).

Keys are read from the config, an environment variable, a PEM file or a JWKS file when a
configuration is loaded (start, SIGHUP), so a rotated JWKS file is picked up by a reload; a key
that does not load is a configuration problem and a reload keeps the running keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from attrs import frozen

from raafd.config import JwtKeyConfig

__all__ = ["JwtError", "JwtIdentity", "JwtKeys", "load_jwt_keys"]


class JwtError(Exception):
    """A token was refused; the message is safe to show (it names no secret)."""


@frozen
class JwtIdentity:
    """Who a good token stands for: ``sub`` and the roles it carries (None: no roles claim)."""

    subject: str
    roles: frozenset[str] | None


@frozen
class _Key:
    name: str  # the config entry, for logs
    kid: str  # "" when the entry names none
    key: Any  # what pyjwt verifies with: a prepared key object, or HMAC bytes
    algorithms: tuple[str, ...]
    config: JwtKeyConfig


class JwtKeys:
    """Every configured key, ready to verify."""

    def __init__(self, keys: Sequence[_Key]) -> None:
        self._keys = tuple(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def verify(self, token: str) -> JwtIdentity:
        """The identity ``token`` proves, or :class:`JwtError`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise JwtError("the token is not valid") from None
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise JwtError("the token's algorithm is not allowed")
        if kid is not None:
            candidates = [k for k in self._keys if k.kid == kid]
            if not candidates:
                raise JwtError("the token's key id (kid) is not known")
        else:
            candidates = list(self._keys)
        candidates = [k for k in candidates if alg in k.algorithms]
        if not candidates:
            raise JwtError("the token's algorithm is not allowed")
        failure: JwtError | None = None
        for key in candidates:
            try:
                return _decode(token, key, alg)
            except JwtError as err:
                # A signature that fits another key is tried there; a token that is expired
                # or for another audience under a key it fits says so.
                if failure is None or str(failure) == _BAD_SIGNATURE:
                    failure = err
        assert failure is not None
        raise failure


_BAD_SIGNATURE = "the token's signature is not valid"


def _decode(token: str, key: _Key, alg: str) -> JwtIdentity:
    cfg = key.config
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=cfg.audience or None,
            issuer=cfg.issuer or None,
            leeway=cfg.leeway,
            options={"require": ["exp", "sub"], "verify_aud": bool(cfg.audience)},
        )
    except jwt.ExpiredSignatureError:
        raise JwtError("the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise JwtError("the token is not valid yet (nbf or iat in the future)") from None
    except jwt.InvalidAudienceError:
        raise JwtError("the token is not for this audience (aud)") from None
    except jwt.InvalidIssuerError:
        raise JwtError("the token's issuer (iss) is not accepted") from None
    except jwt.MissingRequiredClaimError as exc:
        raise JwtError(f"the token has no {exc.claim} claim") from None
    except jwt.InvalidSignatureError:
        raise JwtError(_BAD_SIGNATURE) from None
    except jwt.PyJWTError:
        raise JwtError("the token is not valid") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise JwtError("the token's sub claim is not a string")
    return JwtIdentity(subject, _roles(claims.get(cfg.roles_claim)))


def _roles(value: Any) -> frozenset[str] | None:
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(r for r in value if isinstance(r, str))
    return None


def load_jwt_keys(
    configs: Mapping[str, JwtKeyConfig], environ: Mapping[str, str] | None = None
) -> tuple[JwtKeys, list[str]]:
    """The keys of ``configs`` and one ``auth.jwt.NAME...: reason`` line per key that did not
    load (the keys are usable only when that list is empty)."""
    env = os.environ if environ is None else environ
    keys: list[_Key] = []
    problems: list[str] = []
    for name, cfg in configs.items():
        where = f"auth.jwt.{name}"
        algorithms = tuple(cfg.algorithms)
        try:
            if cfg.jwks_file:
                keys.extend(_jwks(name, cfg, algorithms))
                continue
            if cfg.secret_env:
                raw = env.get(cfg.secret_env, "").strip().encode()
                if not raw:
                    raise ValueError(f"the environment variable {cfg.secret_env} is empty")
            elif cfg.key_file:
                raw = Path(cfg.key_file).read_bytes()
                if algorithms[0].startswith("HS"):
                    raw = raw.strip()
            elif cfg.key:
                raw = cfg.key.encode()
            else:
                raise ValueError("no key source")
            prepared = _prepare(raw, algorithms)
            keys.append(_Key(name, cfg.kid, prepared, algorithms, cfg))
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            problems.append(f"{where}: the key does not load: {_reason(exc)}")
    return JwtKeys(keys), problems


def _prepare(raw: bytes, algorithms: tuple[str, ...]) -> Any:
    """The key in the form pyjwt verifies with, checked against every allowed algorithm."""
    prepared: Any = None
    for alg in algorithms:
        algorithm = jwt.get_algorithm_by_name(alg)
        key = algorithm.prepare_key(raw)
        if alg.startswith("HS"):
            if len(raw) < 32:
                raise ValueError("an HS* secret must be at least 32 bytes")
        elif _is_private(key):
            raise ValueError("give the public key: a private key does not belong on a server")
        prepared = key
    return prepared


def _is_private(key: Any) -> bool:
    return hasattr(key, "private_bytes") or hasattr(key, "sign")


def _jwks(name: str, cfg: JwtKeyConfig, algorithms: tuple[str, ...]) -> list[_Key]:
    data = json.loads(Path(cfg.jwks_file).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("a JWKS file is a JSON object with a keys array")
    out = []
    for i, jwk in enumerate(data["keys"]):
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            raise ValueError(f"key {i} has no kid")
        if "d" in jwk:
            raise ValueError(f"key {i} is a private key")
        allowed = algorithms
        if isinstance(jwk.get("alg"), str):
            if jwk["alg"] not in algorithms:
                continue  # a key for an algorithm this entry does not allow is not used
            allowed = (jwk["alg"],)
        parsed = jwt.PyJWK(jwk, algorithm=allowed[0])
        out.append(_Key(name, jwk["kid"], parsed.key, allowed, cfg))
    return out


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg})"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
