"""Who is on the other end of a connection: an RS256 JWT in, an `Identity` out.

Belongs here: the dev key pair, minting tokens (for `rounds token` and tests),
parsing TTLs such as `24h`, and checking a token against the configured keys
(a PEM public key, a JWKS file, or the dev pair). Must not be here: sockets,
HTTP, asyncio or Ray. The front door turns an `AuthError.reason` into the 401
body `{"type":"UNAUTHORIZED","data":{"reason":...}}` (DESIGN.md, wire protocol
v1), so reasons are short, stable and never contain the token.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from rounds.config import Settings

if TYPE_CHECKING:  # a TypedDict in pyjwt's own type hints only
    from jwt.types import Options

ALGORITHM = "RS256"  # the only one accepted (DESIGN.md, wire protocol v1)
PRIVATE_KEY_FILE = "jwt-private.pem"
PUBLIC_KEY_FILE = "jwt-public.pem"
_RSA_BITS = 2048
_TTL = re.compile(r"(\d+)([smhd]?)")
_TTL_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3_600, "d": 86_400}

# pyjwt's exceptions, most specific first, and the reason a client is told.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidAlgorithmError, "bad_algorithm"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidTokenError, "malformed"),
)


@dataclass(frozen=True, slots=True)
class Identity:
    """The verified user behind a token; `expires_at` is in epoch seconds."""

    user_id: str
    role: str
    username: str
    expires_at: float


class AuthError(Exception):
    """A token was refused. Send `reason` to the client and log it; it holds no token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- keys -------------------------------------------------------------------


def ensure_dev_keys(keys_dir: Path) -> tuple[Path, Path]:
    """Return (private, public) PEM paths in `keys_dir`, creating the pair if missing.

    Several processes may call this at once: the private key is published with
    a hard link, which fails if another process got there first, and the public
    key is always derived from whichever private key won, so the two files match.
    """
    keys_dir.mkdir(parents=True, exist_ok=True)
    private_path = keys_dir / PRIVATE_KEY_FILE
    public_path = keys_dir / PUBLIC_KEY_FILE
    created = not private_path.exists() and _publish_new_private_key(private_path)
    if created or not public_path.exists():
        private_key = _load_private_key(private_path.read_bytes())
        _write_atomically(public_path, _public_pem(private_key.public_key()), mode=0o644)
    return private_path, public_path


def private_key_for_dev(settings: Settings) -> bytes:
    """Return the dev private key PEM (creating the pair if needed) to mint tokens with."""
    private_path, _ = ensure_dev_keys(settings.keys_dir)
    return private_path.read_bytes()


def _publish_new_private_key(path: Path) -> bool:
    """Write a fresh key to `path` unless one appears first; True if ours was kept."""
    key = rsa.generate_private_key(public_exponent=65_537, key_size=_RSA_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temp = _write_temp(path, pem, mode=0o600)
    try:
        os.link(temp, path)  # atomic and never overwrites: the first writer wins
    except FileExistsError:
        return False
    finally:
        os.unlink(temp)
    return True


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    os.replace(_write_temp(path, data, mode), path)


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a new file beside `path` (so a rename stays on one filesystem)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _public_pem(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_private_key(pem: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the JWT private key must be an RSA key")
    return key


def _load_public_pem(path: Path) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{path}: the JWT public key must be an RSA key")
    return key


def _load_jwks(path: Path) -> dict[str, rsa.RSAPublicKey]:
    """Read the RSA keys of a JWKS file by `kid`; other key types are ignored.

    A key without `kid` is allowed only when it is the set's one RSA key (it
    is then filed under ""), since nothing else could select it.
    """
    document = json.loads(path.read_text())
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a JWKS is an object with a `keys` list")
    rsa_entries = [e for e in entries if isinstance(e, dict) and e.get("kty") == "RSA"]
    rsa_entries = [e for e in rsa_entries if e.get("alg", ALGORITHM) == ALGORITHM]
    if not rsa_entries:
        raise ValueError(f"{path}: no RS256 RSA key in the JWKS")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for entry in rsa_entries:
        kid = entry.get("kid", "")
        if not kid and len(rsa_entries) > 1:
            raise ValueError(f"{path}: every key needs a `kid` when the JWKS has several")
        keys[kid] = _as_public(RSAAlgorithm.from_jwk(entry))
    return keys


def _as_public(key: Any) -> rsa.RSAPublicKey:
    return key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key


# --- minting ----------------------------------------------------------------


def mint_token(
    private_key_pem: bytes,
    *,
    user_id: str,
    role: str,
    username: str | None = None,
    ttl_s: int = 86_400,
    issuer: str | None = None,
    audience: str | None = None,
    kid: str | None = None,
    now: float | None = None,
) -> str:
    """Sign an RS256 token for `user_id` valid for `ttl_s` seconds from `now`."""
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    issued_at = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": user_id,
        "userId": user_id,
        "role": role,
        "iat": issued_at,
        "exp": issued_at + ttl_s,
    }
    optional = {"username": username, "iss": issuer, "aud": audience}
    claims.update({name: value for name, value in optional.items() if value is not None})
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims, _signing_key(private_key_pem), algorithm=ALGORITHM, headers=headers)


@functools.lru_cache(maxsize=8)
def _signing_key(private_key_pem: bytes) -> Any:
    """The parsed private key: parsing a PEM costs tens of ms, signing far less."""
    return serialization.load_pem_private_key(private_key_pem, password=None)


def parse_ttl(text: str) -> int:
    """Seconds in `90`, `90s`, `15m`, `24h` or `7d`; ValueError for anything else."""
    match = _TTL.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise ValueError(f"not a positive duration like 90s, 15m, 24h or 7d: {text!r}")
    return int(match[1]) * _TTL_UNIT_S[match[2]]


# --- verifying --------------------------------------------------------------


class TokenVerifier:
    """Checks tokens against keys loaded once from the settings.

    Keys come from `settings.jwt.jwks_path` (several keys chosen by `kid`),
    else `settings.jwt.public_key_path`, else the dev pair in
    `settings.keys_dir`. A bad key file raises at construction: fail at start.
    """

    def __init__(self, settings: Settings) -> None:
        jwt_settings = settings.jwt
        self._issuer = jwt_settings.issuer
        self._audience = jwt_settings.audience
        self._leeway_s = jwt_settings.leeway_s
        # `_by_kid` is empty for a PEM key: a `kid` in the token is then ignored.
        self._by_kid: Mapping[str, rsa.RSAPublicKey] = {}
        self._only_key: rsa.RSAPublicKey | None = None
        if jwt_settings.jwks_path:
            self._by_kid = _load_jwks(Path(jwt_settings.jwks_path))
            if len(self._by_kid) == 1:
                self._only_key = next(iter(self._by_kid.values()))
        elif jwt_settings.public_key_path:
            self._only_key = _load_public_pem(Path(jwt_settings.public_key_path))
        else:
            self._only_key = _load_public_pem(ensure_dev_keys(settings.keys_dir)[1])

    def verify(self, token: str | None, now: float | None = None) -> Identity:
        """Return who the token speaks for, or raise `AuthError` with a reason.

        `now` (epoch seconds) replaces the clock, for tests and replays.
        """
        if not token:
            raise AuthError("missing_token")
        key = self._key_for(_unverified_header(token))
        claims = self._decode(token, key)
        return _identity(claims, time.time() if now is None else now, self._leeway_s)

    def _key_for(self, header: Mapping[str, Any]) -> rsa.RSAPublicKey:
        kid = header.get("kid")
        if kid is not None and self._by_kid:
            if kid not in self._by_kid:
                raise AuthError("unknown_kid")
            return self._by_kid[kid]
        if self._only_key is None:  # a JWKS of several keys and no kid to choose
            raise AuthError("unknown_kid")
        return self._only_key

    def _decode(self, token: str, key: rsa.RSAPublicKey) -> dict[str, Any]:
        # Times are checked by `_identity` against the caller's `now`: pyjwt
        # reads the real clock for exp, nbf and iat alike, so it must check none.
        options: Options = {
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self._audience is not None,
        }
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                options=options,
                issuer=self._issuer,
                audience=self._audience,
            )
        except jwt.PyJWTError as error:
            # pyjwt's wording is not ours to vet for token fragments; the reason says enough.
            raise AuthError(_reason(error)) from None


def _unverified_header(token: str) -> dict[str, Any]:
    """The header, checked for RS256 before any key is chosen."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError("malformed") from None
    # Refused here, before pyjwt, so that `none` and HS256 made with the
    # public key as the secret can never reach a verifier.
    if header.get("alg") != ALGORITHM:
        raise AuthError("bad_algorithm")
    return header


def _reason(error: Exception) -> str:
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return "malformed"


def _identity(claims: Mapping[str, Any], now: float, leeway_s: float) -> Identity:
    expires_at = _check_times(claims, now, leeway_s)
    user_id = _user_id(claims)
    role = claims.get("role")
    if role is None or role == "":
        raise AuthError("missing_claim")
    username = claims.get("username")
    if not isinstance(role, str) or not isinstance(username, str | None):
        raise AuthError("malformed")
    return Identity(user_id=user_id, role=role, username=username or user_id, expires_at=expires_at)


def _user_id(claims: Mapping[str, Any]) -> str:
    """`userId` (the seed's claim, EPIC-001) else `sub`; one of them is required."""
    user_id = claims.get("userId") or claims.get("sub")
    if user_id is None or user_id == "":
        raise AuthError("missing_claim")
    if not isinstance(user_id, str):
        raise AuthError("malformed")
    return user_id


def _check_times(claims: Mapping[str, Any], now: float, leeway_s: float) -> float:
    """Return `exp` after checking it and `nbf` the way pyjwt would, against `now`.

    `iat` is only type-checked: it is informational (RFC 7519 4.1.6), and
    refusing a fresh token because the issuer's clock runs ahead helps no one.
    """
    if claims.get("exp") is None:
        raise AuthError("missing_claim")
    exp = _seconds(claims["exp"])
    not_before = _seconds(claims.get("nbf", 0))
    _seconds(claims.get("iat", 0))
    if exp <= now - leeway_s:
        raise AuthError("expired")
    if not_before > now + leeway_s:
        raise AuthError("not_yet_valid")
    return exp


def _seconds(value: Any) -> float:
    """A finite JSON number as a float, else `malformed`: `NaN` would never expire."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError("malformed")
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any float
        raise AuthError("malformed") from None
    if not math.isfinite(seconds):
        raise AuthError("malformed")
    return seconds
