"""Tokens in, identities or stable refusal reasons out (DESIGN.md, wire protocol v1).

Keys live in pytest's temporary dirs (the dev pair is made once per module);
time is the fake `NOW`, passed in, never patched.
Forged tokens (HS256 keyed with the public PEM, `alg: none`) are built by hand
because pyjwt rightly refuses to make them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm

from rounds.auth import (
    AuthError,
    Identity,
    TokenVerifier,
    ensure_dev_keys,
    mint_token,
    parse_ttl,
    private_key_for_dev,
)
from rounds.auth import _reason as reason_for
from rounds.config import JwtSettings, Settings

NOW = 1_700_000_000.0
HOUR_S = 3_600


# --- helpers ------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _segment(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _craft(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": "usr_1", "role": "surgeon", "iat": int(NOW), "exp": int(NOW) + HOUR_S}
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def _sign_rs256(private_pem: bytes, claims: dict[str, Any]) -> str:
    """A token with exactly these claims, for shapes `mint_token` will not make."""
    return jwt.encode(claims, private_pem, algorithm="RS256")


def _pem_private(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _reason(verifier: TokenVerifier, token: str | None, now: float = NOW) -> str:
    with pytest.raises(AuthError) as refused:
        verifier.verify(token, now=now)
    return refused.value.reason


def _settings(var_dir: Path, **jwt_fields: Any) -> Settings:
    return Settings(var_dir=str(var_dir), jwt=JwtSettings(**jwt_fields))


@pytest.fixture(scope="module")
def other_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """Two RSA keys besides the dev pair: a production key, or a JWKS pair."""
    return (
        rsa.generate_private_key(public_exponent=65_537, key_size=2048),
        rsa.generate_private_key(public_exponent=65_537, key_size=2048),
    )


@pytest.fixture(scope="module")
def dev_var(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A var dir whose dev pair is made once: RSA key generation is the slow part."""
    return tmp_path_factory.mktemp("var")


@pytest.fixture(scope="module")
def dev_private(dev_var: Path) -> bytes:
    return private_key_for_dev(_settings(dev_var))


@pytest.fixture(scope="module")
def verifier(dev_var: Path, dev_private: bytes) -> TokenVerifier:
    return TokenVerifier(_settings(dev_var))


# --- valid tokens -------------------------------------------------------------


def test_a_minted_token_yields_the_identity_it_was_minted_for(
    verifier: TokenVerifier, dev_private: bytes
) -> None:
    token = mint_token(
        dev_private, user_id="usr_12345", role="surgeon", username="Dr. Grey", ttl_s=HOUR_S, now=NOW
    )

    identity = verifier.verify(token, now=NOW + 60)

    assert identity == Identity(
        user_id="usr_12345", role="surgeon", username="Dr. Grey", expires_at=NOW + HOUR_S
    )


def test_the_username_defaults_to_the_user_id(verifier: TokenVerifier, dev_private: bytes) -> None:
    token = mint_token(dev_private, user_id="usr_7", role="nurse", now=NOW)

    assert verifier.verify(token, now=NOW).username == "usr_7"


def test_a_user_id_claim_alone_is_enough(verifier: TokenVerifier, dev_private: bytes) -> None:
    token = _sign_rs256(dev_private, _claims(sub=None, userId="usr_42"))

    assert verifier.verify(token, now=NOW).user_id == "usr_42"


def test_a_sub_claim_alone_is_enough(verifier: TokenVerifier, dev_private: bytes) -> None:
    token = _sign_rs256(dev_private, _claims(sub="usr_43"))

    assert verifier.verify(token, now=NOW).user_id == "usr_43"


def test_the_user_id_claim_wins_over_sub_as_in_the_seed(verifier: TokenVerifier, dev_private: bytes) -> None:
    token = _sign_rs256(dev_private, _claims(sub="idp|abc", userId="usr_44"))

    assert verifier.verify(token, now=NOW).user_id == "usr_44"


def test_a_token_is_checked_against_the_real_clock_when_no_now_is_given(
    dev_private: bytes, dev_var: Path
) -> None:
    token = mint_token(dev_private, user_id="usr_1", role="surgeon")

    assert TokenVerifier(_settings(dev_var)).verify(token).user_id == "usr_1"


def test_mint_token_puts_the_kid_in_the_header(dev_private: bytes) -> None:
    token = mint_token(dev_private, user_id="usr_1", role="surgeon", kid="2025-01", now=NOW)

    assert jwt.get_unverified_header(token) == {"alg": "RS256", "typ": "JWT", "kid": "2025-01"}


# --- missing, garbage and expired ---------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_a_missing_or_empty_token_is_refused_as_missing(verifier: TokenVerifier, token: str | None) -> None:
    assert _reason(verifier, token) == "missing_token"


@pytest.mark.parametrize("token", ["garbage", "a.b", "a.b.c", "!!!.???.***", "bnVsbA.e30.c2ln"])
def test_garbage_is_refused_as_malformed(verifier: TokenVerifier, token: str) -> None:
    assert _reason(verifier, token) == "malformed"


@given(text=st.text(min_size=1, max_size=200))
def test_no_text_is_accepted_and_the_reason_never_quotes_it(verifier: TokenVerifier, text: str) -> None:
    with pytest.raises(AuthError) as refused:
        verifier.verify(text, now=NOW)

    assert refused.value.reason in {"malformed", "bad_algorithm", "bad_signature", "unknown_kid"}
    assert str(refused.value) == refused.value.reason


@pytest.mark.parametrize("error", [jwt.PyJWTError, jwt.InvalidKeyError, jwt.PyJWKError, jwt.PyJWKSetError])
def test_a_pyjwt_error_outside_invalid_token_is_still_told_as_malformed(error: type[Exception]) -> None:
    # `decode` raises none of these with our options and an RSA key today;
    # a future pyjwt that did must still give the client a stable reason.
    assert reason_for(error("pyjwt's wording")) == "malformed"


def test_an_expired_token_is_refused(verifier: TokenVerifier, dev_private: bytes) -> None:
    token = mint_token(dev_private, user_id="usr_1", role="surgeon", ttl_s=HOUR_S, now=NOW)

    assert _reason(verifier, token, now=NOW + HOUR_S) == "expired"


def test_leeway_accepts_a_token_just_past_its_expiry(dev_var: Path, dev_private: bytes) -> None:
    verifier = TokenVerifier(_settings(dev_var, leeway_s=30))
    token = mint_token(dev_private, user_id="usr_1", role="surgeon", ttl_s=HOUR_S, now=NOW)

    assert verifier.verify(token, now=NOW + HOUR_S + 29).user_id == "usr_1"
    assert _reason(verifier, token, now=NOW + HOUR_S + 30) == "expired"


def test_a_token_without_exp_is_refused(verifier: TokenVerifier, dev_private: bytes) -> None:
    assert _reason(verifier, _sign_rs256(dev_private, _claims(exp=None))) == "missing_claim"


def test_a_token_whose_exp_is_not_a_number_is_refused(verifier: TokenVerifier, dev_private: bytes) -> None:
    assert _reason(verifier, _sign_rs256(dev_private, _claims(exp=str(int(NOW) + HOUR_S)))) == "malformed"


@pytest.mark.parametrize("exp", [float("nan"), float("inf"), 10**400, True])
def test_a_token_whose_exp_is_not_a_finite_number_is_refused(
    verifier: TokenVerifier, dev_private: bytes, exp: Any
) -> None:
    assert _reason(verifier, _sign_rs256(dev_private, _claims(exp=exp))) == "malformed"


def test_a_token_not_yet_valid_is_refused(verifier: TokenVerifier, dev_private: bytes) -> None:
    token = _sign_rs256(dev_private, _claims(nbf=int(NOW) + 60))

    assert _reason(verifier, token) == "not_yet_valid"


# --- forged and tampered --------------------------------------------------------


def test_a_tampered_payload_is_refused(verifier: TokenVerifier, dev_private: bytes) -> None:
    header, _, signature = mint_token(dev_private, user_id="usr_1", role="observer", now=NOW).split(".")
    promoted = _segment(_claims(sub="usr_1", role="surgeon"))

    assert _reason(verifier, f"{header}.{promoted}.{signature}") == "bad_signature"


def test_a_tampered_signature_is_refused(verifier: TokenVerifier, dev_private: bytes) -> None:
    header, payload, signature = mint_token(dev_private, user_id="usr_1", role="surgeon", now=NOW).split(".")
    raw = bytearray(_unb64(signature))
    raw[len(raw) // 2] ^= 0x01

    assert _reason(verifier, f"{header}.{payload}.{_b64(bytes(raw))}") == "bad_signature"


def test_a_token_signed_by_another_key_is_refused(
    verifier: TokenVerifier, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    token = mint_token(_pem_private(other_keys[0]), user_id="usr_1", role="surgeon", now=NOW)

    assert _reason(verifier, token) == "bad_signature"


def test_a_token_signed_hs256_with_the_public_key_is_refused(verifier: TokenVerifier, dev_var: Path) -> None:
    public_pem = (dev_var / "keys" / "jwt-public.pem").read_bytes()
    forged = _craft(
        {"alg": "HS256", "typ": "JWT"},
        _claims(role="admin"),
        lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
    )

    assert _reason(verifier, forged) == "bad_algorithm"


def test_an_unsigned_alg_none_token_is_refused(verifier: TokenVerifier) -> None:
    forged = _craft({"alg": "none", "typ": "JWT"}, _claims(role="admin"), lambda data: b"")

    assert _reason(verifier, forged) == "bad_algorithm"


def test_a_token_whose_header_names_no_algorithm_is_refused(verifier: TokenVerifier) -> None:
    assert _reason(verifier, f"{_segment({'typ': 'JWT'})}.{_segment(_claims())}.c2ln") == "bad_algorithm"


def test_a_token_signed_rs512_with_the_right_key_is_refused(
    verifier: TokenVerifier, dev_private: bytes
) -> None:
    token = jwt.encode(_claims(), dev_private, algorithm="RS512")

    assert _reason(verifier, token) == "bad_algorithm"


# --- claims ---------------------------------------------------------------------


def test_a_token_without_role_is_refused(verifier: TokenVerifier, dev_private: bytes) -> None:
    assert _reason(verifier, _sign_rs256(dev_private, _claims(role=None))) == "missing_claim"


def test_a_token_without_sub_or_user_id_is_refused(verifier: TokenVerifier, dev_private: bytes) -> None:
    assert _reason(verifier, _sign_rs256(dev_private, _claims(sub=None))) == "missing_claim"


@pytest.mark.parametrize("claims", [_claims(role=7), _claims(sub=None, userId=12), _claims(username=["x"])])
def test_a_claim_of_the_wrong_type_is_refused(
    verifier: TokenVerifier, dev_private: bytes, claims: dict[str, Any]
) -> None:
    assert _reason(verifier, _sign_rs256(dev_private, claims)) == "malformed"


def test_a_token_from_another_issuer_is_refused(dev_var: Path, dev_private: bytes) -> None:
    verifier = TokenVerifier(_settings(dev_var, issuer="https://idp.hospital"))
    token = mint_token(dev_private, user_id="usr_1", role="surgeon", issuer="https://evil", now=NOW)

    assert _reason(verifier, token) == "bad_issuer"


def test_a_token_without_issuer_is_refused_when_one_is_configured(dev_var: Path, dev_private: bytes) -> None:
    verifier = TokenVerifier(_settings(dev_var, issuer="https://idp.hospital"))

    token = mint_token(dev_private, user_id="usr_1", role="surgeon", now=NOW)

    assert _reason(verifier, token) == "missing_claim"


def test_a_token_from_the_configured_issuer_is_accepted(dev_var: Path, dev_private: bytes) -> None:
    verifier = TokenVerifier(_settings(dev_var, issuer="https://idp.hospital"))
    token = mint_token(dev_private, user_id="usr_1", role="surgeon", issuer="https://idp.hospital", now=NOW)

    assert verifier.verify(token, now=NOW).user_id == "usr_1"


def test_a_token_for_another_audience_is_refused(dev_var: Path, dev_private: bytes) -> None:
    verifier = TokenVerifier(_settings(dev_var, audience="rounds"))
    token = mint_token(dev_private, user_id="usr_1", role="surgeon", audience="billing", now=NOW)

    assert _reason(verifier, token) == "bad_audience"


def test_a_token_for_the_configured_audience_is_accepted(dev_var: Path, dev_private: bytes) -> None:
    verifier = TokenVerifier(_settings(dev_var, audience="rounds"))
    token = mint_token(dev_private, user_id="usr_1", role="surgeon", audience="rounds", now=NOW)

    assert verifier.verify(token, now=NOW).user_id == "usr_1"


def test_a_token_with_an_audience_is_accepted_when_none_is_configured(
    verifier: TokenVerifier, dev_private: bytes
) -> None:
    token = mint_token(dev_private, user_id="usr_1", role="surgeon", audience="anything", now=NOW)

    assert verifier.verify(token, now=NOW).user_id == "usr_1"


# --- key sources ----------------------------------------------------------------


def _write_jwks(path: Path, keys: dict[str, rsa.RSAPrivateKey]) -> Path:
    entries = [
        {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid} for kid, key in keys.items()
    ]
    path.write_text(json.dumps({"keys": entries}))
    return path


@pytest.fixture
def jwks_verifier(tmp_path: Path, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> TokenVerifier:
    jwks = _write_jwks(tmp_path / "jwks.json", {"2024": other_keys[0], "2025": other_keys[1]})
    return TokenVerifier(_settings(tmp_path, jwks_path=str(jwks)))


def test_a_jwks_verifies_tokens_from_the_old_and_the_new_key_during_rotation(
    jwks_verifier: TokenVerifier, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    old, new = (_pem_private(key) for key in other_keys)
    old_token = mint_token(old, user_id="usr_old", role="surgeon", kid="2024", now=NOW)
    new_token = mint_token(new, user_id="usr_new", role="surgeon", kid="2025", now=NOW)

    assert jwks_verifier.verify(old_token, now=NOW).user_id == "usr_old"
    assert jwks_verifier.verify(new_token, now=NOW).user_id == "usr_new"


def test_a_token_naming_the_wrong_kid_is_refused(
    jwks_verifier: TokenVerifier, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    token = mint_token(_pem_private(other_keys[0]), user_id="usr_1", role="surgeon", kid="2025", now=NOW)

    assert _reason(jwks_verifier, token) == "bad_signature"


def test_a_token_with_an_unknown_kid_is_refused(
    jwks_verifier: TokenVerifier, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    token = mint_token(_pem_private(other_keys[0]), user_id="usr_1", role="surgeon", kid="1999", now=NOW)

    assert _reason(jwks_verifier, token) == "unknown_kid"


def test_a_token_without_kid_is_refused_by_a_jwks_of_several_keys(
    jwks_verifier: TokenVerifier, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    token = mint_token(_pem_private(other_keys[0]), user_id="usr_1", role="surgeon", now=NOW)

    assert _reason(jwks_verifier, token) == "unknown_kid"


def test_a_token_without_kid_is_accepted_by_a_jwks_of_one_key(
    tmp_path: Path, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    jwks = _write_jwks(tmp_path / "jwks.json", {"only": other_keys[0]})
    verifier = TokenVerifier(_settings(tmp_path, jwks_path=str(jwks)))
    token = mint_token(_pem_private(other_keys[0]), user_id="usr_1", role="surgeon", now=NOW)

    assert verifier.verify(token, now=NOW).user_id == "usr_1"


def test_a_jwks_of_several_keys_must_give_each_a_kid(
    tmp_path: Path, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    entries = [RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) for key in other_keys]
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": entries}))

    with pytest.raises(ValueError, match="kid"):
        TokenVerifier(_settings(tmp_path, jwks_path=str(tmp_path / "jwks.json")))


def test_a_production_public_key_replaces_the_dev_pair(
    tmp_path: Path, dev_private: bytes, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    production = other_keys[0]
    (tmp_path / "prod.pem").write_bytes(_pem_public(production))
    verifier = TokenVerifier(_settings(tmp_path, public_key_path=str(tmp_path / "prod.pem")))
    good = mint_token(_pem_private(production), user_id="usr_1", role="surgeon", kid="any", now=NOW)
    dev = mint_token(dev_private, user_id="usr_1", role="surgeon", now=NOW)

    assert verifier.verify(good, now=NOW).user_id == "usr_1"
    assert _reason(verifier, dev) == "bad_signature"


def test_a_verifier_with_a_production_key_creates_no_dev_keys(
    tmp_path: Path, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    (tmp_path / "prod.pem").write_bytes(_pem_public(other_keys[0]))

    TokenVerifier(_settings(tmp_path, public_key_path=str(tmp_path / "prod.pem")))

    assert not (tmp_path / "keys").exists()


def test_a_public_key_file_that_is_not_rsa_is_refused_at_start(tmp_path: Path) -> None:
    ec_public = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "ec.pem").write_bytes(
        ec_public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    with pytest.raises(ValueError, match="must be an RSA key"):
        TokenVerifier(_settings(tmp_path, public_key_path=str(tmp_path / "ec.pem")))


@pytest.mark.parametrize("document", [[], {"keys": {}}, {"kid": "2025"}, "keys"])
def test_a_jwks_file_that_is_not_an_object_with_a_keys_list_is_refused_at_start(
    tmp_path: Path, document: Any
) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(document))

    with pytest.raises(ValueError, match="`keys` list"):
        TokenVerifier(_settings(tmp_path, jwks_path=str(tmp_path / "jwks.json")))


def test_a_jwks_without_an_rs256_rsa_key_is_refused_at_start(
    tmp_path: Path, other_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> None:
    rs512 = {**RSAAlgorithm.to_jwk(other_keys[0].public_key(), as_dict=True), "kid": "a", "alg": "RS512"}
    ec_key = {"kty": "EC", "crv": "P-256", "kid": "b", "x": "AA", "y": "AA"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [rs512, ec_key, "not a key"]}))

    with pytest.raises(ValueError, match="no RS256 RSA key"):
        TokenVerifier(_settings(tmp_path, jwks_path=str(tmp_path / "jwks.json")))


# --- dev keys -------------------------------------------------------------------


def _pair_matches(private_path: Path, public_path: Path) -> bool:
    private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    return _pem_public(private) == public_path.read_bytes()


def test_ensure_dev_keys_creates_a_matching_pair_with_a_private_key_only_we_can_read(tmp_path: Path) -> None:
    private_path, public_path = ensure_dev_keys(tmp_path / "var" / "keys")

    assert (private_path.name, public_path.name) == ("jwt-private.pem", "jwt-public.pem")
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert _pair_matches(private_path, public_path)


def test_ensure_dev_keys_is_idempotent(tmp_path: Path) -> None:
    first = ensure_dev_keys(tmp_path)
    contents = [path.read_bytes() for path in first]

    second = ensure_dev_keys(tmp_path)

    assert second == first
    assert [path.read_bytes() for path in second] == contents


def test_ensure_dev_keys_restores_a_missing_public_key_from_the_private_one(tmp_path: Path) -> None:
    private_path, public_path = ensure_dev_keys(tmp_path)
    public_path.unlink()

    ensure_dev_keys(tmp_path)

    assert _pair_matches(private_path, public_path)


def test_ensure_dev_keys_called_at_once_from_many_threads_leaves_one_matching_pair(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: ensure_dev_keys(tmp_path), range(8)))

    private_path, public_path = results[0]
    assert set(results) == {(private_path, public_path)}
    assert _pair_matches(private_path, public_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jwt-private.pem", "jwt-public.pem"]


def test_a_dev_private_key_that_is_not_rsa_is_refused_rather_than_given_a_public_key(tmp_path: Path) -> None:
    ec_private = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "jwt-private.pem").write_bytes(ec_private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))

    with pytest.raises(ValueError, match="must be an RSA key"):
        ensure_dev_keys(tmp_path)

    assert not (tmp_path / "jwt-public.pem").exists()


# In a child process: a file size limit on this one would also cap pytest's
# own output and every other thread's files while it holds.
_WRITE_CAPPED = """
import errno, resource, signal, sys
from pathlib import Path
from rounds.auth import ensure_dev_keys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal ends the process
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # a PKCS8 PEM of a 2048-bit key is about 1,700 bytes
try:
    ensure_dev_keys(Path(sys.argv[1]))
except OSError as exc:
    print(errno.errorcode[exc.errno])
finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
"""


def test_a_dev_key_that_cannot_be_written_leaves_no_partial_file_behind(tmp_path: Path) -> None:
    """A disk that fills while the key is written (`ulimit -f` here)."""
    done = subprocess.run([sys.executable, "-c", _WRITE_CAPPED, str(tmp_path)], capture_output=True, text=True,
                          timeout=60)

    assert done.returncode == 0 and done.stdout.strip() == "EFBIG", done.stderr
    assert list(tmp_path.iterdir()) == []


def test_private_key_for_dev_returns_the_pem_in_the_keys_dir(tmp_path: Path) -> None:
    pem = private_key_for_dev(_settings(tmp_path))

    assert pem == (tmp_path / "keys" / "jwt-private.pem").read_bytes()


# --- TTLs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("24h", 86_400), ("7d", 604_800), (" 1h ", 3_600)],
)
def test_parse_ttl_reads_seconds_minutes_hours_and_days(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "0", "0s", "-5m", "1.5h", "5w", "24 h", "1h30m", "24H", "ten"])
def test_parse_ttl_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)


def test_mint_token_refuses_a_ttl_that_is_not_positive(dev_private: bytes) -> None:
    with pytest.raises(ValueError):
        mint_token(dev_private, user_id="usr_1", role="surgeon", ttl_s=0)
