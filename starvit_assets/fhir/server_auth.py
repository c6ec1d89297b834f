"""The local Bulk Data server's OAuth2 authorization server (``starvit fhir serve --auth oauth``).

* ``GET {fhir}/.well-known/smart-configuration``: SMART App Launch v2 discovery;
* ``POST /oauth2/token``: the ``client_credentials`` grant, the client authenticated by
  ``client_secret_basic`` (form-urlencoded id and secret, RFC 6749 2.3.1),
  ``client_secret_post``, or ``private_key_jwt`` (RFC 7523; SMART Backend Services): a JWT
  signed RS384 or ES384, checked against the client's registered JWKS (signature, alg, ``kid``,
  ``iss`` = ``sub``, ``aud`` = the token endpoint, ``exp`` at most five minutes ahead, ``jti``
  never reused);
* bearer checks for the FHIR routes: unknown, revoked, expired or used-up tokens are refused.

Tokens live ``token_lifetime`` seconds (``expires_in``); the server's ``Faults`` can make them
expire after a number of uses, fail token requests, slow them down, or break discovery.
Secrets, assertions and tokens are never logged; an ``error_description`` names the reason only.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_PATH = "/oauth2/token"
SMART_CONFIGURATION = "/.well-known/smart-configuration"
MAX_ASSERTION_LIFETIME = 300
SIGNING_ALGS = ("RS384", "ES384")
DEFAULT_SCOPE = "system/*.read"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class AuthConfigError(ValueError):
    """A client registration the server cannot use (bad JWKS, key file, missing secret)."""


@dataclass
class OAuthClient:
    """A registered client: a secret (client_secret_basic/post), public keys (private_key_jwt),
    or both."""

    client_id: str
    secret: str | None = field(default=None, repr=False)
    keys: dict[str, PublicKey] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.client_id:
            raise AuthConfigError("a client needs a client id")
        if not self.secret and not self.keys:
            raise AuthConfigError(
                f"client {self.client_id!r} needs a secret or a public key (JWKS) to authenticate"
            )

    @classmethod
    def with_jwks(
        cls, client_id: str, jwks: Mapping[str, Any], secret: str | None = None
    ) -> OAuthClient:
        keys: dict[str, PublicKey] = {}
        for jwk in jwks.get("keys", []):
            if not isinstance(jwk, dict) or not jwk.get("kid"):
                raise AuthConfigError("every JWK of a client needs a kid")
            keys[str(jwk["kid"])] = public_key_from_jwk(jwk)
        return cls(client_id, secret=secret, keys=keys)


@dataclass(frozen=True)
class TokenOutcome:
    """What one token request got, and what the server saw of it (for ``ServerRequest``)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    assertion_header: dict[str, Any] | None = None
    assertion_claims: dict[str, Any] | None = None


@dataclass
class _Issued:
    client_id: str
    expires_at: float
    uses: int = 0
    revoked: bool = False


class _Reject(Exception):
    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url_uint(text: str) -> int:
    return int.from_bytes(_b64url_decode(text), "big")


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """An RSA or P-384 public key from a JWK (RFC 7517/7518), as a registration holds it."""
    try:
        if jwk.get("kty") == "RSA":
            return rsa.RSAPublicNumbers(_b64url_uint(jwk["e"]), _b64url_uint(jwk["n"])).public_key()
        if jwk.get("kty") == "EC" and jwk.get("crv") == "P-384":
            x, y = _b64url_decode(jwk["x"]), _b64url_decode(jwk["y"])
            if len(x) != 48 or len(y) != 48:
                raise AuthConfigError("P-384 coordinates must be 48 bytes")
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP384R1()
            ).public_key()
    except (KeyError, TypeError, ValueError, binascii.Error) as error:
        if isinstance(error, AuthConfigError):
            raise
        raise AuthConfigError(f"JWK {jwk.get('kid')!r} is not a valid public key") from None
    raise AuthConfigError(
        f"unsupported JWK kty={jwk.get('kty')!r} crv={jwk.get('crv')!r}; "
        "use RSA (RS384) or EC P-384 (ES384)"
    )


def load_public_keys(path: Path, key_id: str | None) -> dict[str, PublicKey]:
    """Public keys by kid from a JWKS JSON file, or from one PEM public key plus ``key_id``."""
    try:
        data = path.expanduser().read_bytes()
    except OSError as error:
        raise AuthConfigError(f"cannot read the key file {path}: {error.strerror}") from None
    if data.lstrip().startswith(b"{"):
        try:
            jwks = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AuthConfigError(f"{path} is not a JSON JWKS") from None
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise AuthConfigError(f"{path} is not a JWKS (an object with a 'keys' list)")
        keys = OAuthClient.with_jwks("jwks", jwks).keys
        if key_id is not None and key_id not in keys:
            raise AuthConfigError(f"{path} has no key with kid {key_id!r}")
        return keys
    if not key_id:
        raise AuthConfigError(f"{path} is a PEM key: give its kid too")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise AuthConfigError(f"{path} is neither a JWKS nor a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey) or (
        isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)
    ):
        return {key_id: key}
    raise AuthConfigError(f"{path} holds neither an RSA nor a P-384 EC public key")


class TokenService:
    """Registered clients, issued tokens and their checks; thread-safe."""

    def __init__(
        self,
        clients: list[OAuthClient] | tuple[OAuthClient, ...] = (),
        *,
        token_lifetime: int | None = 300,
        signing_algs: tuple[str, ...] = SIGNING_ALGS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        unknown = set(signing_algs) - set(SIGNING_ALGS)
        if unknown or not signing_algs:
            raise AuthConfigError(f"signing algorithms must be among {', '.join(SIGNING_ALGS)}")
        if token_lifetime is not None and token_lifetime < 1:
            raise AuthConfigError("the token lifetime must be at least 1 second")
        # None: tokens never expire by time and the response leaves out expires_in (it is
        # only RECOMMENDED in RFC 6749), which clients must cope with.
        self.token_lifetime = token_lifetime
        self.signing_algs = signing_algs
        self.clock = clock
        self._clients = {client.client_id: client for client in clients}
        self._issued: dict[str, _Issued] = {}
        self._seen_jti: set[str] = set()
        self._lock = threading.Lock()

    def add_client(self, client: OAuthClient) -> None:
        with self._lock:
            self._clients[client.client_id] = client

    def revoke_all(self) -> None:
        with self._lock:
            for issued in self._issued.values():
                issued.revoked = True

    # --- discovery ---------------------------------------------------------------------------
    def smart_configuration(self, origin: str, *, without_token_endpoint: bool) -> dict[str, Any]:
        return {
            "issuer": origin,
            "token_endpoint": None if without_token_endpoint else origin + TOKEN_PATH,
            "token_endpoint_auth_methods_supported": [
                "private_key_jwt",
                "client_secret_basic",
                "client_secret_post",
            ],
            "token_endpoint_auth_signing_alg_values_supported": list(self.signing_algs),
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": ["system/*.read", "system/*.rs"],
            "capabilities": [
                "client-confidential-asymmetric",
                "client-confidential-symmetric",
                "permission-v1",
                "permission-v2",
            ],
        }

    # --- bearer checks -------------------------------------------------------------------------
    def accepts(self, authorization: str | None, *, max_uses: int | None) -> bool:
        """Whether a bearer header is a live token; counts the use against ``max_uses``."""
        header = authorization or ""
        if not header.startswith("Bearer "):
            return False
        with self._lock:
            issued = self._issued.get(header[7:])
            if issued is None or issued.revoked or self.clock() >= issued.expires_at:
                return False
            if max_uses is not None and issued.uses >= max_uses:
                return False
            issued.uses += 1
            return True

    # --- the token endpoint -----------------------------------------------------------------------
    def token(
        self,
        headers: Mapping[str, str],
        form: Mapping[str, str],
        audiences: set[str],
    ) -> TokenOutcome:
        """Answer one token request; ``headers`` have lower-case names."""
        seen: dict[str, dict[str, Any] | None] = {"header": None, "claims": None}
        try:
            if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                raise _Reject(400, "invalid_request", "form body expected")
            if form.get("grant_type") != "client_credentials":
                raise _Reject(400, "unsupported_grant_type", "only client_credentials")
            client_id = self._authenticate(headers, form, audiences, seen)
        except _Reject as reject:
            extra = {"WWW-Authenticate": 'Basic realm="starvit"'} if reject.status == 401 else {}
            body = {"error": reject.error, "error_description": reject.reason}
            return TokenOutcome(reject.status, body, extra, seen["header"], seen["claims"])
        token = secrets.token_urlsafe(32)
        lifetime = self.token_lifetime
        scope = form.get("scope") or DEFAULT_SCOPE
        with self._lock:
            expires_at = self.clock() + lifetime if lifetime is not None else float("inf")
            self._issued[token] = _Issued(client_id, expires_at)
        granted: dict[str, Any] = {"access_token": token, "token_type": "bearer", "scope": scope}
        if lifetime is not None:
            granted["expires_in"] = lifetime
        return TokenOutcome(
            200, granted, {"Cache-Control": "no-store"}, seen["header"], seen["claims"]
        )

    def _authenticate(
        self,
        headers: Mapping[str, str],
        form: Mapping[str, str],
        audiences: set[str],
        seen: dict[str, dict[str, Any] | None],
    ) -> str:
        authorization = headers.get("authorization", "")
        used = [
            name
            for name, present in (
                ("assertion", "client_assertion" in form or "client_assertion_type" in form),
                ("basic", authorization.startswith("Basic ")),
                ("post", "client_secret" in form),
            )
            if present
        ]
        if len(used) != 1:
            # RFC 6749 2.3: a client MUST NOT use more than one authentication method.
            raise _Reject(400, "invalid_request", f"exactly one client auth method, got {used}")
        if used[0] == "assertion":
            return self._verify_assertion(form, audiences, seen)
        if used[0] == "basic":
            try:
                decoded = base64.b64decode(authorization[6:], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise _Reject(401, "invalid_client", "malformed Basic credentials") from None
            raw_id, _, raw_secret = decoded.partition(":")
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if "client_id" in form and form["client_id"] != client_id:
                raise _Reject(400, "invalid_request", "client_id differs from Basic")
        else:
            client_id, secret = form.get("client_id", ""), form["client_secret"]
        with self._lock:
            client = self._clients.get(client_id)
        if (
            client is None
            or client.secret is None
            or not secrets.compare_digest(client.secret.encode(), secret.encode())
        ):
            raise _Reject(401, "invalid_client", "unknown client or wrong secret")
        return client_id

    def _verify_assertion(
        self,
        form: Mapping[str, str],
        audiences: set[str],
        seen: dict[str, dict[str, Any] | None],
    ) -> str:
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise _Reject(400, "invalid_request", "wrong client_assertion_type")
        if not form.get("scope"):
            raise _Reject(400, "invalid_scope", "SMART Backend Services requires a scope")
        parts = form.get("client_assertion", "").split(".")
        if len(parts) != 3:
            raise _Reject(400, "invalid_request", "client_assertion is not a compact JWS")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error):
            raise _Reject(400, "invalid_request", "client_assertion does not decode") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise _Reject(400, "invalid_request", "client_assertion does not decode")
        seen["header"], seen["claims"] = header, claims
        alg = header.get("alg")
        if alg not in self.signing_algs or header.get("typ") != "JWT":
            raise _Reject(401, "invalid_client", "alg or typ not accepted")
        client_id = claims.get("iss")
        with self._lock:
            client = self._clients.get(str(client_id))
        if client is None or claims.get("sub") != client_id:
            raise _Reject(401, "invalid_client", "unknown iss, or sub differs from iss")
        key = client.keys.get(str(header.get("kid")))
        if key is None:
            raise _Reject(401, "invalid_client", "unknown kid")
        _verify_signature(key, str(alg), f"{parts[0]}.{parts[1]}".encode("ascii"), signature)
        audience = claims.get("aud")
        given = audience if isinstance(audience, list) else [audience]
        if not audiences & {str(a) for a in given}:
            raise _Reject(401, "invalid_client", "aud is not the token endpoint")
        # exp is absolute wall time, the way the client writes it.
        exp, now = claims.get("exp"), time.time()
        if not isinstance(exp, int) or exp <= now or exp > now + MAX_ASSERTION_LIFETIME:
            raise _Reject(401, "invalid_client", "exp missing, past, or over five minutes ahead")
        jti = claims.get("jti")
        with self._lock:
            if not isinstance(jti, str) or not jti or jti in self._seen_jti:
                raise _Reject(401, "invalid_client", "jti missing or reused")
            self._seen_jti.add(jti)
        return str(client_id)


def _verify_signature(key: PublicKey, alg: str, signing_input: bytes, signature: bytes) -> None:
    try:
        if alg == "RS384" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA384())
        elif alg == "ES384" and isinstance(key, ec.EllipticCurvePublicKey):
            if len(signature) != 96:  # JWS wants raw r || s, not DER
                raise InvalidSignature
            der = encode_dss_signature(
                int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
            )
            key.verify(der, signing_input, ec.ECDSA(hashes.SHA384()))
        else:
            raise InvalidSignature
    except InvalidSignature:
        raise _Reject(401, "invalid_client", "bad signature") from None
