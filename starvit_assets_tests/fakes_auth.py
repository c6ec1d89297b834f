"""A local OAuth2 authorization server and protected FHIR endpoint for the auth tests.

Serves, on 127.0.0.1 and a random port:

* ``GET {fhir}/.well-known/smart-configuration`` (SMART App Launch v2 discovery);
* ``POST /oauth2/token``: ``client_credentials`` with ``client_secret_basic`` (form-urlencoded
  id and secret, RFC 6749 2.3.1), ``client_secret_post``, or a JWT client assertion (RFC 7523),
  verified against the client's registered JWKS (signature, alg, kid, iss = sub, aud, exp no
  more than five minutes ahead, jti never reused);
* ``GET|POST {fhir}/...``: a protected resource answering 401 to unknown, revoked or expired
  bearer tokens.

Every request is recorded (headers, form, decoded assertion) so tests can check what was sent.
Error responses carry ``ERROR_DESCRIPTION_MARKER`` in ``error_description`` so tests can prove
the client never echoes it.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ERROR_DESCRIPTION_MARKER = "server-side-detail-7f3a"
FHIR_PATH = "/fhir"
TOKEN_PATH = "/oauth2/token"
MAX_ASSERTION_LIFETIME = 300

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    assertion_header: dict[str, Any] | None = None
    assertion_claims: dict[str, Any] | None = None
    status: int = 0


@dataclass
class _Client:
    client_id: str
    secret: str | None = None
    keys: dict[str, PublicKey] = field(default_factory=dict)


@dataclass
class _Issued:
    client_id: str
    expires_at: float
    scope: str
    revoked: bool = False


class _Reject(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url_uint(text: str) -> int:
    return int.from_bytes(_b64url_decode(text), "big")


def public_key_from_jwk(jwk: dict[str, Any]) -> PublicKey:
    """The way a real server reads a registered JWK; this checks ``public_jwk`` round-trips."""
    if jwk.get("kty") == "RSA":
        return rsa.RSAPublicNumbers(_b64url_uint(jwk["e"]), _b64url_uint(jwk["n"])).public_key()
    if jwk.get("kty") == "EC" and jwk.get("crv") == "P-384":
        x, y = _b64url_decode(jwk["x"]), _b64url_decode(jwk["y"])
        if len(x) != 48 or len(y) != 48:
            raise ValueError("P-384 coordinates must be 48 bytes")
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP384R1()
        ).public_key()
    raise ValueError(f"unsupported JWK kty={jwk.get('kty')!r} crv={jwk.get('crv')!r}")


class FakeAuthServer:
    """Start with ``with FakeAuthServer() as server:``; register clients, then point auth at it."""

    def __init__(
        self,
        *,
        expires_in: int | None = 300,
        token_delay: float = 0.0,
        clock: Callable[[], float] = time.time,
        signing_algs: tuple[str, ...] = ("RS384", "ES384"),
    ) -> None:
        self.expires_in = expires_in
        self.token_delay = token_delay
        self.clock = clock
        self.signing_algs = signing_algs
        self.smart_configuration_status = 200
        self.smart_configuration_extra: dict[str, Any] = {}
        self.resources_always_401 = False
        self._clients: dict[str, _Client] = {}
        self._issued: dict[str, _Issued] = {}
        self._seen_jti: set[str] = set()
        self._fail_token_statuses: list[int] = []
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> FakeAuthServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        # A short poll interval keeps shutdown (and so each test's teardown) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeAuthServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def fhir_base_url(self) -> str:
        return self.base_url + FHIR_PATH

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    # --- test controls -------------------------------------------------------------------
    def add_secret_client(self, client_id: str, secret: str) -> None:
        with self._lock:
            self._clients[client_id] = _Client(client_id, secret=secret)

    def add_jwks_client(self, client_id: str, jwks: dict[str, Any]) -> None:
        keys = {str(jwk["kid"]): public_key_from_jwk(jwk) for jwk in jwks["keys"]}
        with self._lock:
            self._clients[client_id] = _Client(client_id, keys=keys)

    def fail_next_token_requests(self, count: int, status: int = 503) -> None:
        with self._lock:
            self._fail_token_statuses.extend([status] * count)

    def revoke_tokens(self) -> None:
        with self._lock:
            for issued in self._issued.values():
                issued.revoked = True

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def token_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == TOKEN_PATH]

    def discovery_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/.well-known/smart-configuration")]

    def resource_requests(self) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if r.path.startswith(FHIR_PATH + "/") and "/.well-known/" not in r.path
        ]

    # --- behaviour (called from handler threads) -------------------------------------------
    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _smart_configuration(self) -> dict[str, Any]:
        return {
            "issuer": self.base_url,
            "token_endpoint": self.token_url,
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
            **self.smart_configuration_extra,
        }

    def _token(self, request: RecordedRequest) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            failure = self._fail_token_statuses.pop(0) if self._fail_token_statuses else None
        if failure is not None:
            return failure, {"error": "temporarily_unavailable"}, {}
        if self.token_delay:
            time.sleep(self.token_delay)
        try:
            if not request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"
            ):
                raise _Reject(400, "invalid_request", "form body expected")
            if request.form.get("grant_type") != "client_credentials":
                raise _Reject(400, "unsupported_grant_type", "only client_credentials")
            client_id = self._authenticate(request)
        except _Reject as reject:
            headers = {"WWW-Authenticate": 'Basic realm="fake"'} if reject.status == 401 else {}
            body = {
                "error": reject.error,
                "error_description": f"{reject.detail} ({ERROR_DESCRIPTION_MARKER})",
            }
            return reject.status, body, headers
        token = secrets.token_urlsafe(32)
        lifetime = self.expires_in if self.expires_in is not None else 300
        scope = request.form.get("scope", "")
        with self._lock:
            self._issued[token] = _Issued(client_id, self.clock() + lifetime, scope)
        granted: dict[str, Any] = {"access_token": token, "token_type": "bearer", "scope": scope}
        if self.expires_in is not None:
            granted["expires_in"] = self.expires_in
        return 200, granted, {"Cache-Control": "no-store"}

    def _authenticate(self, request: RecordedRequest) -> str:
        form = request.form
        authorization = request.headers.get("authorization", "")
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
            return self._verify_assertion(request)
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
        client = self._clients.get(client_id)
        if (
            client is None
            or client.secret is None
            or not secrets.compare_digest(client.secret.encode(), secret.encode())
        ):
            raise _Reject(401, "invalid_client", "unknown client or wrong secret")
        return client_id

    def _verify_assertion(self, request: RecordedRequest) -> str:
        form = request.form
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
        request.assertion_header, request.assertion_claims = header, claims
        alg = header.get("alg")
        if alg not in self.signing_algs or header.get("typ") != "JWT":
            raise _Reject(401, "invalid_client", f"alg {alg} / typ not accepted")
        client_id = claims.get("iss")
        client = self._clients.get(str(client_id))
        if client is None or claims.get("sub") != client_id:
            raise _Reject(401, "invalid_client", "unknown iss, or sub differs from iss")
        key = client.keys.get(str(header.get("kid")))
        if key is None:
            raise _Reject(401, "invalid_client", "unknown kid")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
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
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.token_url not in audiences:
            raise _Reject(401, "invalid_client", "aud is not the token endpoint")
        exp, now = claims.get("exp"), time.time()
        if not isinstance(exp, int) or exp <= now or exp > now + MAX_ASSERTION_LIFETIME:
            raise _Reject(401, "invalid_client", "exp missing, past, or over five minutes ahead")
        jti = claims.get("jti")
        with self._lock:
            if not isinstance(jti, str) or not jti or jti in self._seen_jti:
                raise _Reject(401, "invalid_client", "jti missing or reused")
            self._seen_jti.add(jti)
        return str(client_id)

    def _resource(self, request: RecordedRequest) -> tuple[int, dict[str, Any], dict[str, str]]:
        authorization = request.headers.get("authorization", "")
        token = authorization[7:] if authorization.startswith("Bearer ") else ""
        with self._lock:
            issued = self._issued.get(token)
            valid = (
                issued is not None
                and not issued.revoked
                and self.clock() < issued.expires_at
                and not self.resources_always_401
            )
        if not valid:
            return (
                401,
                {"resourceType": "OperationOutcome", "issue": [{"code": "login"}]},
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return (
            200,
            {"resourceType": "Bundle", "type": "searchset", "echo": request.body.decode()},
            {},
        )


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connections from the parallel tests; the kernel then
    # retries the SYN after a second.
    request_queue_size = 64
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    owner: FakeAuthServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        headers = {name.lower(): value for name, value in self.headers.items()}
        form: dict[str, str] = {}
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        request = RecordedRequest(self.command, path, headers, form, body)
        owner = self.owner
        if path == FHIR_PATH + "/.well-known/smart-configuration" and self.command == "GET":
            status = owner.smart_configuration_status
            payload: dict[str, Any] = (
                owner._smart_configuration() if status == 200 else {"error": "not_found"}
            )
            extra: dict[str, str] = {}
        elif path == TOKEN_PATH and self.command == "POST":
            status, payload, extra = owner._token(request)
        elif path.startswith(FHIR_PATH + "/"):
            status, payload, extra = owner._resource(request)
        else:
            status, payload, extra = 404, {"error": "not_found"}, {}
        request.status = status
        owner._record(request)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
