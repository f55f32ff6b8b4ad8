"""Who a bearer token stands for: static tokens (``[auth] tokens``, ``[auth.users.*]``; plain
or ``sha256:`` hashed) and JWTs (``[auth.jwt.*]``, :mod:`raafd.security.jwt`), each resolving
to a :class:`~raafd.auth.Principal`.

One :class:`Authenticator` is built per accepted configuration (start, SIGHUP); building reads
the keys and fails with every problem listed, so a reload that would break authentication keeps
the running one. A token is compared with every static token's SHA-256 digest in constant time
(neither which token matched nor how much of one shows in the time taken), then, when it has
the shape of a JWT (three dot-separated parts), checked as one. Refusals are
:class:`~raafd.errors.Unauthorized` with a sentence that names no secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from raafd.auth import ANONYMOUS, Principal
from raafd.config import AuthConfig, ConfigError
from raafd.errors import Unauthorized
from raafd.security.jwt import JwtError, JwtKeys, load_jwt_keys
from raafd.security.policy import Policy

__all__ = ["Authenticator", "build_authenticator"]

_SHA256 = "sha256:"


def _digest(entry: str) -> bytes:
    """A configured token as the SHA-256 digest it is compared by."""
    if entry.startswith(_SHA256):
        return bytes.fromhex(entry[len(_SHA256) :])
    return hashlib.sha256(entry.encode()).digest()


def _anonymous_user(digest: bytes) -> str:
    # As before principals had names: stable, and not the token.
    return "token-" + digest.hex()[:12]


class Authenticator:
    """The running configuration's tokens, keys and policy (see the module docstring)."""

    __slots__ = ("_jwt", "_static", "enabled", "policy", "query_token")

    def __init__(
        self,
        static: Mapping[bytes, Principal],
        jwt: JwtKeys,
        policy: Policy,
        *,
        query_token: bool = True,
    ) -> None:
        self._static = tuple(static.items())
        self._jwt = jwt
        self.policy = policy
        self.query_token = query_token
        self.enabled = bool(self._static) or bool(jwt)

    def authenticate(self, token: str) -> Principal:
        """The principal ``token`` stands for, or :class:`~raafd.errors.Unauthorized`."""
        digest = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for candidate, principal in self._static:  # every one compared: constant time
            if hmac.compare_digest(digest, candidate):
                found = principal
        if found is not None:
            return found
        if self._jwt and token.count(".") == 2:
            try:
                identity = self._jwt.verify(token)
            except JwtError as err:
                raise Unauthorized(str(err)) from None
            return Principal(identity.subject, identity.roles or frozenset())
        raise Unauthorized("the token is not valid")

    def principal_when_off(self) -> Principal:
        """Who everyone is while auth is off."""
        return ANONYMOUS


def build_authenticator(
    config: AuthConfig, environ: Mapping[str, str] | None = None
) -> Authenticator:
    """The authenticator of ``config``, or :class:`~raafd.config.ConfigError` with every
    problem (sources that yield nothing, keys that do not load)."""
    problems = config.problems(environ)
    jwt_keys, jwt_problems = load_jwt_keys(config.jwt, environ)
    problems += jwt_problems
    if problems:
        raise ConfigError(problems)
    static: dict[bytes, Principal] = {}
    for token in config.all_tokens(environ):
        digest = _digest(token.strip())
        static[digest] = Principal(_anonymous_user(digest))
    for name, user in config.users.items():
        static[_digest(config.user_token(name, environ))] = Principal(name, frozenset(user.roles))
    return Authenticator(
        static,
        jwt_keys,
        Policy(config.roles, config.default_roles),
        query_token=config.query_token,
    )
