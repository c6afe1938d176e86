"""End-user tokens without a server: issue, verify, rotate, expire, RS256, and the `p2p token` command."""

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from p2p.errors import P2PError
from pipelines.cli import main
from pipelines.serve.auth import ADMIN, SERVICE, USER, Keys, allowed
from pipelines.serve.tokens import SECRET_ENV, TokenError, Tokens

OLD, NEW = "o" * 32, "n" * 32


def test_a_token_names_its_user_and_survives_rotation_but_not_tampering_or_expiry():
    token, expires = Tokens((OLD,)).issue("alice", 60)
    assert expires - time.time() <= 60
    assert Tokens((OLD,)).user_of(token) == "alice"
    assert Tokens((NEW, OLD)).user_of(token) == "alice"  # rotation: the old secret still verifies
    with pytest.raises(TokenError, match="rejected"):
        Tokens((NEW,)).user_of(token)  # the old secret retired
    header, claims, signature = token.split(".")
    forged = jwt.encode({**jwt.decode(token, OLD, algorithms=["HS256"], issuer="p2p"), "sub": "bob"}, NEW,
                        algorithm="HS256")
    with pytest.raises(TokenError):
        Tokens((OLD,)).user_of(forged)  # signed with a secret the server does not hold
    with pytest.raises(TokenError):
        Tokens((OLD,)).user_of(".".join([header, forged.split(".")[1], signature]))  # bob's claims, alice's signature
    unsigned = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(TokenError, match="'none'"):
        Tokens((OLD,)).user_of(unsigned)
    old, _ = Tokens((OLD,)).issue("alice", 1, now=time.time() - 10)
    with pytest.raises(TokenError, match="expired"):
        Tokens((OLD,)).user_of(old)
    with pytest.raises(TokenError, match="not a valid token"):
        Tokens((OLD,)).user_of("a.b.c")
    for bad in ((-1,), (0,), (31 * 24 * 3600,)):
        with pytest.raises(P2PError, match="ttl"):
            Tokens((OLD,)).issue("alice", *bad)
    with pytest.raises(P2PError, match=SECRET_ENV):
        Tokens().issue("alice", 60)


def test_secrets_and_public_keys_resolve_from_the_environment(tmp_path):
    assert Tokens.resolve({}) == Tokens() and not Tokens().enabled
    assert Tokens.resolve({SECRET_ENV: f"{NEW}, {OLD}"}).secrets == (NEW, OLD)
    with pytest.raises(P2PError, match="32 bytes"):
        Tokens.resolve({SECRET_ENV: "short"})
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    (tmp_path / "idp.pem").write_text(pem)
    for value in (pem, str(tmp_path / "idp.pem")):
        idp = Tokens.resolve({"P2P_TOKEN_PUBLIC_KEY": value, "P2P_TOKEN_ISSUER": "https://id.example"})
        token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60, "iss": "https://id.example"}, private,
                           algorithm="RS256")
        assert idp.user_of(token) == "carol"
        wrong_issuer = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60, "iss": "evil"}, private,
                                  algorithm="RS256")
        with pytest.raises(TokenError):
            idp.user_of(wrong_issuer)
        with pytest.raises(TokenError, match="HS256"):  # a verify-only server accepts no HS256 token
            idp.user_of(jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, OLD, algorithm="HS256"))
    with pytest.raises(P2PError, match="PEM"):
        Tokens.resolve({"P2P_TOKEN_PUBLIC_KEY": str(tmp_path / "missing.pem")})


def test_a_user_token_is_the_user_scope_and_reaches_user_paths_only():
    keys = Keys(("s" * 8,), ("a" * 8,), Tokens((OLD,)))
    token, _ = keys.tokens.issue("alice", 60)
    assert keys.grant(f"Bearer {token}") == (frozenset({USER}), "alice")
    assert keys.grant(f"Bearer {'s' * 8}") == (frozenset({SERVICE}), None)
    with pytest.raises(TokenError):
        keys.grant("Bearer x.y.z")
    assert keys.grant("Bearer not-a-key") == (frozenset(), None)
    assert allowed(SERVICE, frozenset({USER}), "/v1/completions")
    assert allowed(ADMIN, frozenset({USER}), "/v1/users/alice")
    assert not allowed(ADMIN, frozenset({USER}), "/v1/tokens")
    assert not allowed(ADMIN, frozenset({SERVICE}), "/v1/users/alice")


def test_the_token_command_prints_a_token_that_verifies(monkeypatch, capsys):
    monkeypatch.setenv(SECRET_ENV, NEW)
    assert main(["token", "issue", "--user", "dave", "--ttl", "120"]) == 0
    out, err = capsys.readouterr()
    assert Tokens((NEW,)).user_of(out.strip()) == "dave" and "dave" in err
    assert main(["token", "issue", "--user", "dave", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["user"] == "dave" and Tokens((NEW,)).user_of(body["token"]) == "dave"
    monkeypatch.delenv(SECRET_ENV)
    assert main(["token", "issue", "--user", "dave"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and SECRET_ENV in err
