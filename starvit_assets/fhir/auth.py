"""OAuth2 access tokens for the FHIR Bulk Data client, as ``httpx.Auth`` objects.

Two grants, both ``client_credentials``:

* ``ClientCredentialsAuth``: a client id and secret (Medplum ``ClientApplication``), sent as
  ``client_secret_basic`` or ``client_secret_post`` (RFC 6749 section 2.3.1).
* ``SmartBackendAuth``: HL7 SMART App Launch v2 "Backend Services": the token endpoint comes
  from ``{fhir_base}/.well-known/smart-configuration`` and the client authenticates with a
  short-lived JWT signed with its private key (RS384 or ES384, RFC 7523 ``private_key_jwt``).

Both cache the token and fetch a new one shortly before ``expires_in`` runs out, so long status
polls and downloads keep working; a 401 from the FHIR server triggers one refresh and one
retry. One token fetch serves every thread. Errors are ``AuthError`` naming the step
(configuration, discovery, token request) and the HTTP status; secrets, assertions, tokens and
response bodies (beyond the OAuth2 ``error`` code) never appear in messages, logs or ``repr``.

``load_auth_from_env()`` builds either from ``STARVIT_FHIR_*`` variables; see
``docs/extract-auth.md``. ``python -m starvit_assets.fhir.auth jwks --private-key KEY --kid ID``
prints the JWKS to register for SMART Backend Services; ``... check`` fetches one token with the
environment's settings and prints its lifetime and scope (never the token).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, cast
from urllib.parse import quote_plus, urlsplit

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from starvit_assets.fhir.errors import ExportError

logger = logging.getLogger("starvit.fhir.auth")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_SMART_SCOPE = "system/*.read"
DEFAULT_ENV_PREFIX = "STARVIT_FHIR_"

SigningAlg = Literal["RS384", "ES384"]
TokenAuthMethod = Literal["client_secret_basic", "client_secret_post"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

SIGNING_ALGS: tuple[SigningAlg, ...] = ("RS384", "ES384")
TOKEN_AUTH_METHODS: tuple[TokenAuthMethod, ...] = ("client_secret_basic", "client_secret_post")

# SMART Backend Services: the assertion's exp SHALL be no more than five minutes in the future.
# Staying under it leaves room for the server's clock running behind ours.
_MAX_ASSERTION_LIFETIME = 300
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_MAX_BACKOFF = 8.0
_MAX_RETRY_AFTER = 30.0
# RFC 6749 error codes are short ASCII words; anything else is not echoed.
_OAUTH_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_ES384_COORDINATE_BYTES = 48
# 401 replays per request: enough for a shared token that ran out, never an endless loop.
_MAX_401_ROUNDS = 3


class AuthError(ExportError):
    """Obtaining an access token failed at a named step (configuration, discovery, token request).

    A subclass of ``ExportError`` so that whatever reports a failed export reports this too.
    Every message starts with its step (``"token request (client_credentials, ...): ..."``);
    ``step`` is that prefix without the parenthesis, ``status`` the HTTP status if there was one.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        # Set here rather than through ExportError's keywords so this works with either version.
        self.step: str | None = message.split(":", 1)[0].split(" (", 1)[0] or None
        self.status: int | None = status
        self.issue_codes: tuple[str, ...] = ()


class _Secret:
    """A string that never shows itself in ``repr``, ``str`` or ``vars()`` dumps."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


@dataclass(eq=False)
class _Token:
    value: str = field(repr=False)
    refresh_at: float
    expires_at: float
    scope: str | None
    # Some request got past the server with it: a later 401 means it expired, not that the
    # server refuses this client's tokens altogether.
    worked: bool = False


# --- small helpers ---------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _where(url: str | httpx.URL) -> str:
    """scheme://host[:port]/path: no query, no user info, so nothing secret leaks into messages."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_transport(step: str, url: str | httpx.URL, allow_insecure_http: bool) -> None:
    parts = urlsplit(str(url))
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and (allow_insecure_http or _is_loopback(parts.hostname)):
        return
    raise AuthError(
        f"{step}: refusing to send credentials to {_where(url)}: only https is allowed "
        "(plain http only to loopback, or with allow_insecure_http / ALLOW_INSECURE_HTTP=true)"
    )


def _oauth_error(response: httpx.Response) -> str:
    """The RFC 6749 ``error`` code of a token response, never its description or other content."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ""
    code = body.get("error") if isinstance(body, dict) else None
    if isinstance(code, str) and _OAUTH_ERROR_CODE.match(code):
        return f", OAuth2 error {code!r}"
    return ""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    return None


# --- the shared machinery --------------------------------------------------------------------
class _CachedTokenAuth(httpx.Auth):
    """Token cache, proactive refresh, 401 retry, and retried token requests for both grants."""

    # The body must be replayable because a 401 makes us send the same request a second time.
    requires_request_body = True

    def __init__(
        self,
        *,
        refresh_margin: float,
        default_expires_in: float,
        timeout: float,
        max_attempts: int,
        backoff: float,
        http_client: httpx.Client | None,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        allow_insecure_http: bool,
    ) -> None:
        if max_attempts < 1:
            raise AuthError("configuration: max_attempts must be at least 1")
        if refresh_margin < 0 or default_expires_in <= 0:
            raise AuthError("configuration: refresh_margin must be >= 0 and default_expires_in > 0")
        self._refresh_margin = refresh_margin
        self._default_expires_in = default_expires_in
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._clock = clock
        self._sleep = sleep
        self._allow_insecure_http = allow_insecure_http
        self._owns_http = http_client is None
        # A client of our own, not the FHIR client: the token endpoint is often another host,
        # must not follow redirects with credentials, and must not recurse into this auth.
        self._http = http_client or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), follow_redirects=False
        )
        self._lock = threading.Lock()
        self._token: _Token | None = None

    # --- httpx.Auth ----------------------------------------------------------------------
    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        _check_transport("resource request", request.url, self._allow_insecure_http)
        token = self._valid_token()
        fetched_here = False
        # A 401 means the token expired or was revoked early: get a new one and replay. The
        # new one may run out too before the replay arrives, when parallel requests share it
        # and the server limits its uses; it then has worked for some of them, and one more
        # round follows. A token fetched for this request and refused without ever working
        # means the server refuses this client: the 401 goes back, no loop.
        for replay in range(_MAX_401_ROUNDS + 1):
            request.headers["Authorization"] = f"Bearer {token.value}"
            response = yield request
            if response.status_code != 401:
                token.worked = True
                return
            if replay == _MAX_401_ROUNDS or (fetched_here and not token.worked):
                break
            logger.info(
                "%s %s answered 401; refreshing the access token and retrying",
                request.method,
                _where(request.url),
            )
            token, fetched_here = self._replace_rejected(token)
        logger.warning(
            "%s %s answered 401 again with a fresh access token; giving up on this request",
            request.method,
            _where(request.url),
        )

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        # Token requests here are blocking; inside an event loop they would stall every task.
        raise AuthError(
            f"configuration: {type(self).__name__} works with httpx.Client only, "
            "not httpx.AsyncClient"
        )
        yield request  # pragma: no cover - makes this an async generator, as httpx expects

    # --- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- for subclasses --------------------------------------------------------------------
    def _token_url(self) -> str:
        raise NotImplementedError

    def _token_form(self, token_url: str) -> tuple[dict[str, str], dict[str, str]]:
        """Form fields and headers of one token request attempt (built afresh per attempt)."""
        raise NotImplementedError

    def _token_step(self) -> str:
        raise NotImplementedError

    # --- token cache -----------------------------------------------------------------------
    def _valid_token(self) -> _Token:
        # Fetching under the lock is deliberate: threads arriving during a fetch wait for it
        # and share its token instead of each asking the server.
        with self._lock:
            token = self._token
            if token is None or self._clock() >= token.refresh_at:
                token = self._token = self._fetch_token()
            return token

    def _replace_rejected(self, rejected: _Token) -> tuple[_Token, bool]:
        """A token other than ``rejected``, and whether this call fetched it."""
        with self._lock:
            if self._token is not None and self._token is not rejected:
                # Another thread already replaced the rejected token.
                return self._token, False
            self._token = self._fetch_token()
            return self._token, True

    def _fetch_token(self) -> _Token:
        token_url = self._token_url()
        step = self._token_step()
        _check_transport(step, token_url, self._allow_insecure_http)
        # Lifetime counts from before the request, so network latency errs on the early side.
        started = self._clock()
        response = self._send(step, "POST", token_url, lambda: self._token_form(token_url))
        if response.status_code != 200:
            raise AuthError(
                f"{step}: POST {_where(token_url)} returned HTTP {response.status_code}"
                f"{_oauth_error(response)}",
                status=response.status_code,
            )
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise AuthError(f"{step}: POST {_where(token_url)} returned HTTP 200 without JSON")
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise AuthError(
                f"{step}: POST {_where(token_url)} returned HTTP 200 without an access_token"
            )
        token_type = body.get("token_type", "bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            safe = isinstance(token_type, str) and _OAUTH_ERROR_CODE.match(token_type)
            shown = token_type if safe else "?"
            raise AuthError(
                f"{step}: POST {_where(token_url)} issued a {shown!r} token; only Bearer "
                "tokens are supported"
            )
        lifetime = self._lifetime(step, body.get("expires_in"))
        margin = min(self._refresh_margin, lifetime / 2)
        scope = body.get("scope")
        logger.info(
            "obtained an access token from %s (expires in %.0f s, refreshed after %.0f s)",
            _where(token_url),
            lifetime,
            lifetime - margin,
        )
        return _Token(
            value=access_token,
            refresh_at=started + lifetime - margin,
            expires_at=started + lifetime,
            scope=scope if isinstance(scope, str) else None,
        )

    def _lifetime(self, step: str, expires_in: object) -> float:
        if isinstance(expires_in, str):
            try:
                expires_in = float(expires_in)
            except ValueError:
                expires_in = None
        if (
            isinstance(expires_in, int | float)
            and not isinstance(expires_in, bool)
            and expires_in > 0
        ):
            return float(expires_in)
        # expires_in is only RECOMMENDED in RFC 6749; a guess plus the 401 retry covers it.
        logger.warning("%s: no usable expires_in; assuming %.0f s", step, self._default_expires_in)
        return self._default_expires_in

    # --- HTTP with retries -------------------------------------------------------------------
    def _send(
        self,
        step: str,
        method: str,
        url: str,
        build: Callable[[], tuple[dict[str, str] | None, dict[str, str]]],
    ) -> httpx.Response:
        for attempt in range(1, self._max_attempts + 1):
            data, headers = build()
            delay = min(self._backoff * 2 ** (attempt - 1), _MAX_BACKOFF)
            delay *= 1 + random.random() / 4  # jitter: parallel workers do not retry in step
            try:
                response = self._http.request(method, url, data=data, headers=headers)
            except _RETRYABLE_ERRORS as exc:
                if attempt == self._max_attempts:
                    raise AuthError(
                        f"{step}: {method} {_where(url)} failed after {attempt} attempt(s): "
                        f"{type(exc).__name__}"
                    ) from exc
                logger.warning(
                    "%s: %s %s failed (%s), attempt %d of %d; retrying in %.1f s",
                    step,
                    method,
                    _where(url),
                    type(exc).__name__,
                    attempt,
                    self._max_attempts,
                    delay,
                )
            except httpx.HTTPError as exc:
                raise AuthError(
                    f"{step}: {method} {_where(url)} failed: {type(exc).__name__}"
                ) from exc
            else:
                if response.status_code not in _RETRYABLE_STATUS or attempt == self._max_attempts:
                    return response
                delay = _retry_after(response) or delay
                logger.warning(
                    "%s: %s %s returned HTTP %d, attempt %d of %d; retrying in %.1f s",
                    step,
                    method,
                    _where(url),
                    response.status_code,
                    attempt,
                    self._max_attempts,
                    delay,
                )
            self._sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


# --- client credentials (Medplum) --------------------------------------------------------------
class ClientCredentialsAuth(_CachedTokenAuth):
    """OAuth2 client credentials with a client secret, as Medplum's ``/oauth2/token`` takes it."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        method: TokenAuthMethod = "client_secret_basic",
        scope: str | None = None,
        refresh_margin: float = 60.0,
        default_expires_in: float = 300.0,
        timeout: float = 30.0,
        max_attempts: int = 4,
        backoff: float = 0.5,
        http_client: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        allow_insecure_http: bool = False,
    ) -> None:
        if not token_url:
            raise AuthError("configuration: the token URL is empty")
        if not client_id:
            raise AuthError("configuration: the client id is empty")
        if not client_secret:
            raise AuthError("configuration: the client secret is empty")
        if method not in TOKEN_AUTH_METHODS:
            raise AuthError(
                f"configuration: unknown token endpoint auth method {method!r}; "
                f"use one of {', '.join(TOKEN_AUTH_METHODS)}"
            )
        _check_transport("configuration", token_url, allow_insecure_http)
        super().__init__(
            refresh_margin=refresh_margin,
            default_expires_in=default_expires_in,
            timeout=timeout,
            max_attempts=max_attempts,
            backoff=backoff,
            http_client=http_client,
            clock=clock,
            sleep=sleep,
            allow_insecure_http=allow_insecure_http,
        )
        self.token_url = token_url
        self.client_id = client_id
        self.method: TokenAuthMethod = method
        self.scope = scope
        self._client_secret = _Secret(client_secret)

    def __repr__(self) -> str:
        return (
            f"ClientCredentialsAuth(token_url={self.token_url!r}, client_id={self.client_id!r}, "
            f"method={self.method!r}, scope={self.scope!r})"
        )

    def _token_url(self) -> str:
        return self.token_url

    def _token_step(self) -> str:
        return f"token request (client_credentials, {self.method})"

    def _token_form(self, token_url: str) -> tuple[dict[str, str], dict[str, str]]:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers = {"Accept": "application/json"}
        if self.method == "client_secret_basic":
            # RFC 6749 2.3.1: form-urlencode each part before joining, so ':' in either survives.
            pair = f"{quote_plus(self.client_id)}:{quote_plus(self._client_secret.reveal())}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        else:
            form["client_id"] = self.client_id
            form["client_secret"] = self._client_secret.reveal()
        return form, headers


# --- SMART Backend Services -------------------------------------------------------------------
def load_private_key(path: Path, password: bytes | None = None) -> PrivateKey:
    """An RSA or EC private key from a PEM (PKCS#8 or traditional) or DER file."""
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise AuthError(
            f"configuration: cannot read the private key file {path}: {exc.strerror}"
        ) from None
    loader = (
        serialization.load_pem_private_key
        if data.lstrip().startswith(b"-----")
        else serialization.load_der_private_key
    )
    try:
        key = loader(data, password=password)
    except TypeError:
        raise AuthError(
            f"configuration: the private key file {path} is encrypted (or a password was given "
            "for an unencrypted key); store it unencrypted with file permissions 0600"
        ) from None
    except ValueError:
        raise AuthError(
            f"configuration: the private key file {path} is not a readable PEM or DER private key"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise AuthError(
            f"configuration: the private key in {path} is a {type(key).__name__}; "
            "SMART Backend Services needs an RSA (RS384) or P-384 EC (ES384) key"
        )
    return key


def _check_key(key: PrivateKey, alg: SigningAlg | None) -> SigningAlg:
    if isinstance(key, rsa.RSAPrivateKey):
        if alg not in (None, "RS384"):
            raise AuthError(f"configuration: signing algorithm {alg} does not fit an RSA key")
        if key.key_size < 2048:
            raise AuthError(
                f"configuration: the RSA key has {key.key_size} bits; RS384 needs at least 2048"
            )
        return "RS384"
    if alg not in (None, "ES384"):
        raise AuthError(f"configuration: signing algorithm {alg} does not fit an EC key")
    if not isinstance(key.curve, ec.SECP384R1):
        raise AuthError(
            f"configuration: the EC key is on curve {key.curve.name}; ES384 needs P-384 (secp384r1)"
        )
    return "ES384"


def _uint_b64url(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64url(value.to_bytes(size, "big"))


def public_jwk(
    key: PrivateKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    key_id: str,
    alg: SigningAlg | None = None,
) -> dict[str, Any]:
    """The public JWK (RFC 7517) to register with the authorization server."""
    public = (
        key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    )
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {
            "kty": "RSA",
            "alg": alg or "RS384",
            "use": "sig",
            "key_ops": ["verify"],
            "kid": key_id,
            "n": _uint_b64url(numbers.n),
            "e": _uint_b64url(numbers.e),
        }
    if not isinstance(public.curve, ec.SECP384R1):
        raise AuthError(f"configuration: ES384 needs a P-384 key, not {public.curve.name}")
    point = public.public_numbers()
    return {
        "kty": "EC",
        "alg": alg or "ES384",
        "use": "sig",
        "key_ops": ["verify"],
        "kid": key_id,
        "crv": "P-384",
        "x": _uint_b64url(point.x, _ES384_COORDINATE_BYTES),
        "y": _uint_b64url(point.y, _ES384_COORDINATE_BYTES),
    }


class SmartBackendAuth(_CachedTokenAuth):
    """SMART Backend Services: discovery, a signed JWT client assertion, client_credentials."""

    def __init__(
        self,
        fhir_base_url: str | None,
        client_id: str,
        private_key: PrivateKey,
        key_id: str,
        *,
        alg: SigningAlg | None = None,
        scope: str = DEFAULT_SMART_SCOPE,
        token_url: str | None = None,
        assertion_lifetime: int = 240,
        refresh_margin: float = 60.0,
        default_expires_in: float = 300.0,
        timeout: float = 30.0,
        max_attempts: int = 4,
        backoff: float = 0.5,
        http_client: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        allow_insecure_http: bool = False,
    ) -> None:
        if not fhir_base_url and not token_url:
            raise AuthError(
                "configuration: SMART Backend Services needs the FHIR base URL (for discovery) "
                "or an explicit token URL"
            )
        if not client_id:
            raise AuthError("configuration: the client id is empty")
        if not key_id:
            raise AuthError("configuration: the key id (kid) is empty; SMART requires one")
        if not scope:
            raise AuthError("configuration: the scope is empty; SMART requires one")
        if alg is not None and alg not in SIGNING_ALGS:
            raise AuthError(
                f"configuration: unknown signing algorithm {alg!r}; use one of "
                f"{', '.join(SIGNING_ALGS)}"
            )
        if not 0 < assertion_lifetime <= _MAX_ASSERTION_LIFETIME:
            raise AuthError("configuration: assertion_lifetime must be within 1..300 seconds")
        if not isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise AuthError("configuration: the private key must be an RSA or EC private key")
        self.alg: SigningAlg = _check_key(private_key, alg)
        if token_url:
            _check_transport("configuration", token_url, allow_insecure_http)
        super().__init__(
            refresh_margin=refresh_margin,
            default_expires_in=default_expires_in,
            timeout=timeout,
            max_attempts=max_attempts,
            backoff=backoff,
            http_client=http_client,
            clock=clock,
            sleep=sleep,
            allow_insecure_http=allow_insecure_http,
        )
        self.fhir_base_url = fhir_base_url.rstrip("/") if fhir_base_url else None
        self.client_id = client_id
        self.key_id = key_id
        self.scope = scope
        self._configured_token_url = token_url
        self._discovered_token_url: str | None = None
        self._assertion_lifetime = assertion_lifetime
        self._private_key = private_key

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(fhir_base_url={self.fhir_base_url!r}, "
            f"token_url={self.token_url!r}, client_id={self.client_id!r}, "
            f"key_id={self.key_id!r}, alg={self.alg!r}, scope={self.scope!r})"
        )

    @property
    def token_url(self) -> str | None:
        """The configured token URL, else the discovered one (None before discovery)."""
        return self._configured_token_url or self._discovered_token_url

    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self._private_key, self.key_id, self.alg)]}

    def _token_step(self) -> str:
        return "token request (SMART Backend Services, private_key_jwt)"

    def _token_url(self) -> str:
        # Called under the token lock, so discovery happens once however many threads start.
        if self._configured_token_url:
            return self._configured_token_url
        if self._discovered_token_url is None:
            self._discovered_token_url = self._discover()
        return self._discovered_token_url

    def _discover(self) -> str:
        step = "SMART discovery"
        url = f"{self.fhir_base_url}/.well-known/smart-configuration"
        response = self._send(step, "GET", url, lambda: (None, {"Accept": "application/json"}))
        if response.status_code != 200:
            raise AuthError(
                f"{step}: GET {_where(url)} returned HTTP {response.status_code}",
                status=response.status_code,
            )
        try:
            config = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = None
        if not isinstance(config, dict):
            raise AuthError(f"{step}: GET {_where(url)} returned HTTP 200 without a JSON object")
        token_url = config.get("token_endpoint")
        if not isinstance(token_url, str) or not token_url.startswith(("https://", "http://")):
            raise AuthError(f"{step}: {_where(url)} has no absolute token_endpoint")
        methods = config.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and "private_key_jwt" not in methods:
            raise AuthError(
                f"{step}: {_where(url)} does not list private_key_jwt in "
                "token_endpoint_auth_methods_supported"
            )
        algs = config.get("token_endpoint_auth_signing_alg_values_supported")
        if isinstance(algs, list) and self.alg not in algs:
            supported = ", ".join(str(a) for a in algs if isinstance(a, str) and len(a) < 10)
            raise AuthError(
                f"{step}: {_where(url)} does not accept {self.alg} client assertions "
                f"(token_endpoint_auth_signing_alg_values_supported: {supported or 'none'})"
            )
        _check_transport(step, token_url, self._allow_insecure_http)
        logger.info("SMART discovery: token endpoint %s", _where(token_url))
        return token_url

    def _client_assertion(self, audience: str) -> str:
        # exp is an absolute time the server checks against its own clock: wall time, not the
        # monotonic clock that schedules refreshes.
        now = int(time.time())
        header = {"alg": self.alg, "kid": self.key_id, "typ": "JWT"}
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "exp": now + self._assertion_lifetime,
            "jti": secrets.token_urlsafe(32),
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        ).encode("ascii")
        key = self._private_key
        if isinstance(key, rsa.RSAPrivateKey):
            signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA384())
        else:
            # cryptography gives DER; JWS (RFC 7518 3.4) wants fixed-width r || s.
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA384())))
            signature = r.to_bytes(_ES384_COORDINATE_BYTES, "big") + s.to_bytes(
                _ES384_COORDINATE_BYTES, "big"
            )
        return signing_input.decode("ascii") + "." + _b64url(signature)

    def _token_form(self, token_url: str) -> tuple[dict[str, str], dict[str, str]]:
        # A new assertion (new jti) per attempt: a retried request may follow one the server
        # did receive, and it would reject the jti as replayed.
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self._client_assertion(token_url),
        }
        return form, {"Accept": "application/json"}


# --- configuration from the environment ---------------------------------------------------------
_CREDENTIAL_NAMES = (
    "CLIENT_ID",
    "CLIENT_SECRET",
    "CLIENT_SECRET_FILE",
    "TOKEN_URL",
    "TOKEN_AUTH_METHOD",
    "PRIVATE_KEY_FILE",
    "KEY_ID",
    "SIGNING_ALG",
    "SCOPE",
)
_CLIENT_CREDENTIALS_ONLY = ("CLIENT_SECRET", "CLIENT_SECRET_FILE", "TOKEN_AUTH_METHOD")
_SMART_ONLY = ("PRIVATE_KEY_FILE", "KEY_ID", "SIGNING_ALG")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def load_auth_from_env(
    prefix: str = DEFAULT_ENV_PREFIX,
    environ: Mapping[str, str] | None = None,
    *,
    fhir_base_url: str | None = None,
) -> ClientCredentialsAuth | SmartBackendAuth | None:
    """The auth that ``{prefix}AUTH`` asks for, or None for ``none`` / unset.

    Empty values count as unset (compose files pass ``${VAR:-}``). ``fhir_base_url`` defaults to
    ``{prefix}BASE_URL``; SMART discovery starts there unless ``{prefix}TOKEN_URL`` is set.
    """
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        value = env.get(prefix + name, "").strip()
        return value or None

    def require(name: str, why: str) -> str:
        value = get(name)
        if value is None:
            raise AuthError(f"configuration: {prefix}{name} is not set; {why}")
        return value

    def reject(names: tuple[str, ...], mode: str) -> None:
        given = [prefix + name for name in names if get(name) is not None]
        if given:
            raise AuthError(
                f"configuration: {', '.join(given)} do(es) not apply to {prefix}AUTH={mode}; "
                "unset them or choose the matching mode"
            )

    mode = (get("AUTH") or "").lower()
    if mode in ("", "none"):
        given = [prefix + name for name in _CREDENTIAL_NAMES if get(name) is not None]
        if given:
            raise AuthError(
                f"configuration: {', '.join(given)} set but {prefix}AUTH is "
                f"{'unset' if not mode else 'none'}; set {prefix}AUTH=client_credentials or "
                "smart_backend, or unset them"
            )
        return None

    insecure = (get("ALLOW_INSECURE_HTTP") or "").lower()
    if insecure not in _TRUE | _FALSE:
        raise AuthError(f"configuration: {prefix}ALLOW_INSECURE_HTTP must be true or false")
    allow_insecure_http = insecure in _TRUE

    if mode == "client_credentials":
        reject(_SMART_ONLY, mode)
        client_id = require("CLIENT_ID", "the ClientApplication id is required")
        token_url = require("TOKEN_URL", "e.g. https://api.medplum.com/oauth2/token")
        secret = _secret_from_env(prefix, get("CLIENT_SECRET"), get("CLIENT_SECRET_FILE"))
        method = get("TOKEN_AUTH_METHOD") or "client_secret_basic"
        if method not in TOKEN_AUTH_METHODS:
            raise AuthError(
                f"configuration: {prefix}TOKEN_AUTH_METHOD={method!r} is not one of "
                f"{', '.join(TOKEN_AUTH_METHODS)}"
            )
        return ClientCredentialsAuth(
            token_url,
            client_id,
            secret,
            method=cast(TokenAuthMethod, method),
            scope=get("SCOPE"),
            allow_insecure_http=allow_insecure_http,
        )

    if mode == "smart_backend":
        reject(_CLIENT_CREDENTIALS_ONLY, mode)
        client_id = require("CLIENT_ID", "the client id registered with the server is required")
        key_file = require("PRIVATE_KEY_FILE", "SMART Backend Services signs with a private key")
        key_id = require("KEY_ID", "the kid of the registered public key is required")
        alg = get("SIGNING_ALG")
        if alg is not None and alg.upper() not in SIGNING_ALGS:
            raise AuthError(
                f"configuration: {prefix}SIGNING_ALG={alg!r} is not one of "
                f"{', '.join(SIGNING_ALGS)}"
            )
        base_url = fhir_base_url or get("BASE_URL")
        explicit_token_url = get("TOKEN_URL")
        if not base_url and not explicit_token_url:
            raise AuthError(
                f"configuration: {prefix}BASE_URL (for SMART discovery) or {prefix}TOKEN_URL "
                "must be set"
            )
        key = load_private_key(Path(key_file))
        return SmartBackendAuth(
            base_url,
            client_id,
            key,
            key_id,
            alg=cast(SigningAlg, alg.upper()) if alg else None,
            scope=get("SCOPE") or DEFAULT_SMART_SCOPE,
            token_url=explicit_token_url,
            allow_insecure_http=allow_insecure_http,
        )

    raise AuthError(
        f"configuration: {prefix}AUTH={mode!r} is not one of none, client_credentials, "
        "smart_backend"
    )


def _secret_from_env(prefix: str, value: str | None, file: str | None) -> str:
    if value is not None and file is not None:
        raise AuthError(
            f"configuration: both {prefix}CLIENT_SECRET and {prefix}CLIENT_SECRET_FILE are "
            "set; set only one"
        )
    if value is not None:
        return value
    if file is None:
        raise AuthError(
            f"configuration: {prefix}CLIENT_SECRET_FILE (preferred) or {prefix}CLIENT_SECRET "
            "must be set for client_credentials"
        )
    path = Path(file).expanduser()
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise AuthError(
            f"configuration: cannot read {prefix}CLIENT_SECRET_FILE ({path}): {reason}"
        ) from None
    if not secret:
        raise AuthError(f"configuration: {prefix}CLIENT_SECRET_FILE ({path}) is empty")
    return secret


# --- command line: JWKS for registration, and a token check --------------------------------------
def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m starvit_assets.fhir.auth",
        description="OAuth2 helpers for the FHIR Bulk Data client",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    jwks = commands.add_parser("jwks", help="print the public JWKS of a private key")
    jwks.add_argument("--private-key", type=Path, required=True)
    jwks.add_argument("--kid", required=True)
    commands.add_parser("check", help="fetch one token with the STARVIT_FHIR_* settings")
    args = parser.parse_args(argv)
    try:
        if args.command == "jwks":
            key = load_private_key(args.private_key)
            alg = _check_key(key, None)
            print(json.dumps({"keys": [public_jwk(key, args.kid, alg)]}, indent=2))
            return 0
        auth = load_auth_from_env()
        if auth is None:
            print(f"{DEFAULT_ENV_PREFIX}AUTH is none or unset: requests go without a token")
            return 0
        with auth:
            token = auth._valid_token()
            lifetime = token.expires_at - auth._clock()
            print(f"{auth!r}: token obtained, expires in {lifetime:.0f} s, scope {token.scope!r}")
        return 0
    except AuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(_main())
