"""End-user tokens: signed, expiring, scoped to one user id (JWT).

An app that puts the server in front of its users gives each of them a token instead of the
service key. Whoever holds a token is that one user: requests are answered with that user's
adapter only (naming another user is 403), and the user endpoints act on that user only (build,
replace or delete their own adapter, read their own record). The service key keeps its trusted
backend behaviour (it may name any user).

Two ways to sign, both through PyJWT:
- HS256 with the server's secrets (`P2P_TOKEN_SECRET`, comma-separated: the first signs, every one
  verifies, so a secret can be rotated without logging anyone out): `p2p token issue` and the admin
  endpoint `POST /v1/tokens` issue them.
- RS256 from a company's own identity provider (`P2P_TOKEN_PUBLIC_KEY`: a PEM public key, or a file
  holding one): the server only verifies; the user is the `sub` claim.

Claims: `sub` (the user id), `iat`, `exp`, `iss` ("p2p" for the tokens issued here; with a public
key, `P2P_TOKEN_ISSUER` if set), and `scope: "user"`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import jwt

from p2p.errors import P2PError
from p2p.userkey import canonical_user_id

SECRET_ENV, PUBLIC_KEY_ENV, ISSUER_ENV = "P2P_TOKEN_SECRET", "P2P_TOKEN_PUBLIC_KEY", "P2P_TOKEN_ISSUER"
ISSUER = "p2p"
MAX_TTL_S = 30 * 24 * 3600  # a token longer-lived than a month is a key; use the service key instead
MIN_SECRET_BYTES = 32  # HS256 wants a key at least as long as its hash


class TokenError(P2PError):
    """A token that does not verify (bad signature, expired, no user): the request is 401."""


@dataclass(frozen=True)
class Tokens:
    secrets: tuple[str, ...] = ()  # HS256: the first signs, all verify
    public_key: str | None = None  # RS256: verify only
    issuer: str = ISSUER

    @classmethod
    def resolve(cls, env: Mapping[str, str] = os.environ) -> Tokens:
        secrets = tuple(s.strip() for s in env.get(SECRET_ENV, "").split(",") if s.strip())
        short = [s for s in secrets if len(s.encode()) < MIN_SECRET_BYTES]
        if short:
            raise P2PError(f"{SECRET_ENV}: each secret needs at least {MIN_SECRET_BYTES} bytes "
                           f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        key = env.get(PUBLIC_KEY_ENV) or None
        if key and not key.lstrip().startswith("-----BEGIN"):
            try:
                with open(key) as f:
                    key = f.read()
            except OSError as exc:
                raise P2PError(f"{PUBLIC_KEY_ENV}: neither a PEM key nor a readable file ({exc.strerror})") from None
        return cls(secrets, key, env.get(ISSUER_ENV) or (ISSUER if not key else ""))

    @property
    def enabled(self) -> bool:
        return bool(self.secrets or self.public_key)

    def issue(self, user_id: str, ttl_s: float, now: float | None = None) -> tuple[str, int]:
        """(token, expiry as a unix time) for `user_id`, signed with the first secret."""
        if not self.secrets:
            raise P2PError(f"no token secret: set {SECRET_ENV} (tokens of an identity provider are issued there)")
        if not user_id:
            raise P2PError("a token needs a user id")
        if not 0 < ttl_s <= MAX_TTL_S:
            raise P2PError(f"--ttl must be in (0, {MAX_TTL_S}] seconds, got {ttl_s}")
        now = int(time.time() if now is None else now)
        expires = now + int(ttl_s)
        claims = {"sub": canonical_user_id(user_id), "iat": now, "exp": expires, "iss": ISSUER, "scope": "user"}
        return jwt.encode(claims, self.secrets[0], algorithm="HS256"), expires

    def user_of(self, token: str) -> str:
        """The user id a valid token names; anything else is a `TokenError` saying why."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("not a valid token") from None
        options = {"require": ["exp", "sub"]}
        try:
            if header.get("alg") == "HS256" and self.secrets:
                claims = self._hs256(token, options)
            elif header.get("alg") == "RS256" and self.public_key:
                claims = jwt.decode(token, self.public_key, algorithms=["RS256"], options=options,
                                    issuer=self.issuer or None)
            else:
                raise TokenError(f"tokens signed with {header.get('alg')!r} are not accepted here")
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"token rejected: {exc}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise TokenError("token names no user (claim 'sub')")
        return canonical_user_id(claims["sub"])

    def _hs256(self, token: str, options: dict) -> dict:
        last: jwt.PyJWTError | None = None
        for secret in self.secrets:
            try:
                return jwt.decode(token, secret, algorithms=["HS256"], options=options, issuer=self.issuer)
            except jwt.InvalidSignatureError as exc:
                last = exc  # another secret of the rotation may have signed it
        raise last or jwt.InvalidSignatureError("no secret")
