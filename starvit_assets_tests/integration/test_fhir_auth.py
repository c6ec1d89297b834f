"""OAuth2 client credentials and SMART Backend Services against the local Bulk Data server's
token endpoint (``BulkDataServer(oauth_clients=...)``), over HTTP."""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from starvit_assets.fhir.auth import (
    CLIENT_ASSERTION_TYPE,
    AuthError,
    ClientCredentialsAuth,
    PrivateKey,
    SmartBackendAuth,
    TokenAuthMethod,
    load_auth_from_env,
    public_jwk,
)
from starvit_assets.fhir.errors import ExportError
from starvit_assets.fhir.server import BulkDataServer, Faults, ServerRequest
from starvit_assets.fhir.server_auth import OAuthClient

pytestmark = pytest.mark.integration

CLIENT_ID = "bulk-export-client"
# Characters that must be form-urlencoded inside client_secret_basic.
SECRET = "s3cr3t:with/odd+chars&é"
SMART_CLIENT = "smart-backend-client"
# The server's error_description texts: the client reports the OAuth2 error code only.
SERVER_REASONS = ("wrong secret", "bad signature", "unknown kid", "aud is not")


PARAMETERS = {
    "resourceType": "Parameters",
    "parameter": [{"name": "_type", "valueString": "Patient"}],
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class AuthServer(BulkDataServer):
    """The local server with OAuth on, plus the request filters these tests read."""

    @property
    def fhir_base_url(self) -> str:
        return self.base_url

    def add_jwks_client(self, client_id: str, jwks: dict[str, Any]) -> None:
        self.add_client(OAuthClient.with_jwks(client_id, jwks))

    def discovery_requests(self) -> list[ServerRequest]:
        return [r for r in self.requests if r.path.endswith("/.well-known/smart-configuration")]

    def resource_requests(self) -> list[ServerRequest]:
        return [
            r
            for r in self.requests
            if r.path.startswith("/fhir/") and "/.well-known/" not in r.path
        ]


def _server(folder: Path, **kwargs: Any) -> AuthServer:
    kwargs.setdefault("oauth_clients", [OAuthClient(CLIENT_ID, secret=SECRET)])
    return AuthServer(folder, **kwargs)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AuthServer]:
    with _server(tmp_path) as running:
        yield running


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., AuthServer]]:
    started: list[AuthServer] = []

    def make(**kwargs: Any) -> AuthServer:
        started.append(_server(tmp_path, **kwargs))
        started[-1].start()
        return started[-1]

    yield make
    for running in started:
        running.stop()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _get(auth: httpx.Auth, url: str) -> httpx.Response:
    with httpx.Client(auth=auth, timeout=10) as client:
        return client.get(url)


def _basic_pair(request_headers: dict[str, str]) -> str:
    assert request_headers["authorization"].startswith("Basic ")
    return base64.b64decode(request_headers["authorization"][6:]).decode()


def _assert_clean(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text
    for reason in SERVER_REASONS:
        assert reason not in text


# --- client credentials ---------------------------------------------------------------------
def test_client_secret_basic_sends_urlencoded_credentials_in_the_header(
    server: AuthServer,
) -> None:
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET, scope="system/*.read")
    response = _get(auth, server.fhir_base_url + "/Patient")
    assert response.status_code == 200
    (token_request,) = server.token_requests
    assert _basic_pair(token_request.headers) == (
        "bulk-export-client:s3cr3t%3Awith%2Fodd%2Bchars%26%C3%A9"
    )
    assert token_request.form == {"grant_type": "client_credentials", "scope": "system/*.read"}
    (resource_request,) = server.resource_requests()
    assert resource_request.headers["authorization"].startswith("Bearer ")


def test_client_secret_post_sends_credentials_in_the_form(server: AuthServer) -> None:
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET, method="client_secret_post")
    assert _get(auth, server.fhir_base_url + "/Patient").status_code == 200
    (token_request,) = server.token_requests
    assert "authorization" not in token_request.headers
    assert token_request.form == {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
    }


def test_wrong_secret_names_step_and_status_and_leaks_nothing(
    server: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "not-the-secret-4c1d"
    caplog.set_level(logging.DEBUG)
    methods: tuple[TokenAuthMethod, ...] = ("client_secret_basic", "client_secret_post")
    for method in methods:
        auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, wrong, method=method)
        with pytest.raises(AuthError) as raised:
            _get(auth, server.fhir_base_url + "/Patient")
        message = str(raised.value)
        assert "token request" in message and method in message
        assert "HTTP 401" in message and "'invalid_client'" in message
        _assert_clean(message, wrong, SECRET)
        _assert_clean(repr(auth), wrong)
        assert isinstance(raised.value, ExportError)
        assert (raised.value.step, raised.value.status) == ("token request", 401)
    _assert_clean(caplog.text, wrong)
    # A token request that failed means no request reached the resource server.
    assert server.resource_requests() == []


def test_repr_and_vars_never_show_secrets(
    server: AuthServer, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET)
    _get(auth, server.fhir_base_url + "/Patient")
    token = server.resource_requests()[0].headers["authorization"][7:]
    for text in (repr(auth), str(auth), repr(vars(auth))):
        _assert_clean(text, SECRET, token)
    assert CLIENT_ID in repr(auth)

    smart = SmartBackendAuth(server.fhir_base_url, SMART_CLIENT, ec_key, "kid-1")
    pem = ec_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    private_scalar = str(ec_key.private_numbers().private_value)
    for text in (repr(smart), repr(vars(smart))):
        assert pem not in text and private_scalar not in text


# --- SMART Backend Services ---------------------------------------------------------------------
@pytest.mark.parametrize("key_name, alg", [("rsa_key", "RS384"), ("ec_key", "ES384")])
def test_smart_backend_discovers_signs_and_gets_a_token(
    server: AuthServer, request: pytest.FixtureRequest, key_name: str, alg: str
) -> None:
    key: PrivateKey = request.getfixturevalue(key_name)
    server.add_jwks_client(SMART_CLIENT, {"keys": [public_jwk(key, "kid-1")]})
    clock = FakeClock()
    auth = SmartBackendAuth(
        server.fhir_base_url, SMART_CLIENT, key, "kid-1", scope="system/*.rs", clock=clock
    )
    assert auth.alg == alg and auth.token_url is None
    with httpx.Client(auth=auth, timeout=10) as client:
        assert client.get(server.fhir_base_url + "/Patient").status_code == 200
        clock.advance(10_000)  # past expiry: the second request needs a second assertion
        assert client.get(server.fhir_base_url + "/Observation").status_code == 200
    assert auth.token_url == server.token_url
    assert len(server.discovery_requests()) == 1
    first, second = server.token_requests
    assert first.status == second.status == 200
    assert first.form["grant_type"] == "client_credentials"
    assert first.form["scope"] == "system/*.rs"
    assert first.form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    assert "client_id" not in first.form and "authorization" not in first.headers
    assert first.assertion_header == {"alg": alg, "kid": "kid-1", "typ": "JWT"}
    claims = first.assertion_claims
    assert claims is not None and second.assertion_claims is not None
    assert claims["iss"] == claims["sub"] == SMART_CLIENT
    assert claims["aud"] == server.token_url
    assert 0 < claims["exp"] - time.time() <= 300
    assert claims["jti"] != second.assertion_claims["jti"]
    if alg == "ES384":
        signature = first.form["client_assertion"].split(".")[2]
        assert len(base64.urlsafe_b64decode(signature + "==")) == 96


def test_explicit_token_url_skips_discovery(
    server: AuthServer, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    server.add_jwks_client(SMART_CLIENT, {"keys": [public_jwk(ec_key, "kid-1")]})
    auth = SmartBackendAuth(None, SMART_CLIENT, ec_key, "kid-1", token_url=server.token_url)
    assert _get(auth, server.fhir_base_url + "/Patient").status_code == 200
    assert server.discovery_requests() == []


def test_discovery_failures_name_the_step(
    server: AuthServer, ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    server.add_jwks_client(SMART_CLIENT, {"keys": [public_jwk(ec_key, "kid-1")]})

    def fails_with(target: AuthServer) -> AuthError:
        auth = SmartBackendAuth(target.fhir_base_url, SMART_CLIENT, ec_key, "kid-1")
        with pytest.raises(AuthError) as raised:
            _get(auth, target.fhir_base_url + "/Patient")
        return raised.value

    # A server without OAuth has nothing to discover.
    with AuthServer(tmp_path) as no_oauth:
        error = fails_with(no_oauth)
    message = str(error)
    assert message.startswith("SMART discovery:") and "HTTP 404" in message
    assert (error.step, error.status) == ("SMART discovery", 404)
    assert "/.well-known/smart-configuration" in message

    server.faults = Faults(discovery_without_token_endpoint=True)
    assert "no absolute token_endpoint" in str(fails_with(server))

    with _server(tmp_path, signing_algs=("RS384",)) as rsa_only:
        message = str(fails_with(rsa_only))
        assert rsa_only.token_requests == []
    assert "does not accept ES384" in message and "RS384" in message
    assert server.token_requests == []


def test_rejected_assertion_names_the_step_and_leaks_nothing(
    server: AuthServer,
    ec_key: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    server.add_jwks_client(SMART_CLIENT, {"keys": [public_jwk(other, "kid-1")]})
    caplog.set_level(logging.DEBUG)
    auth = SmartBackendAuth(server.fhir_base_url, SMART_CLIENT, ec_key, "kid-1")
    with pytest.raises(AuthError) as raised:
        _get(auth, server.fhir_base_url + "/Patient")
    message = str(raised.value)
    assert message.startswith("token request (SMART Backend Services, private_key_jwt):")
    assert "HTTP 401" in message and "'invalid_client'" in message
    assertion = server.token_requests[0].form["client_assertion"]
    _assert_clean(message, assertion, assertion.split(".")[2])
    _assert_clean(caplog.text, assertion)


def test_key_and_algorithm_must_match(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(AuthError, match="ES384 does not fit an RSA key"):
        SmartBackendAuth("https://fhir.example.org", "c", rsa_key, "k", alg="ES384")
    with pytest.raises(AuthError, match="needs P-384"):
        SmartBackendAuth(
            "https://fhir.example.org", "c", ec.generate_private_key(ec.SECP256R1()), "k"
        )
    with pytest.raises(AuthError, match="at least 2048"):
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        SmartBackendAuth("https://fhir.example.org", "c", small, "k")
    with pytest.raises(AuthError, match="kid"):
        SmartBackendAuth("https://fhir.example.org", "c", ec_key, "")


# --- caching, refresh, 401 retry ----------------------------------------------------------------
def test_token_is_reused_while_valid_and_refreshed_before_expiry(
    make_server: Callable[..., AuthServer],
) -> None:
    server = make_server(token_lifetime=120)
    clock = FakeClock()
    auth = ClientCredentialsAuth(
        server.token_url, CLIENT_ID, SECRET, clock=clock, refresh_margin=30
    )
    url = server.fhir_base_url + "/Patient"
    with httpx.Client(auth=auth, timeout=10) as client:
        for _ in range(3):
            assert client.get(url).status_code == 200
        clock.advance(89)  # refresh is due at 120 - 30 = 90 s
        assert client.get(url).status_code == 200
        assert len(server.token_requests) == 1
        clock.advance(2)
        assert client.get(url).status_code == 200
    assert len(server.token_requests) == 2
    tokens = [r.headers["authorization"] for r in server.resource_requests()]
    assert len(set(tokens[:4])) == 1 and tokens[4] != tokens[0]


def test_short_lifetimes_cap_the_margin_at_half(make_server: Callable[..., AuthServer]) -> None:
    server = make_server(token_lifetime=10)
    clock = FakeClock()
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET, clock=clock)
    url = server.fhir_base_url + "/Patient"
    with httpx.Client(auth=auth, timeout=10) as client:
        client.get(url)
        clock.advance(4.9)
        client.get(url)
        assert len(server.token_requests) == 1
        clock.advance(0.2)
        client.get(url)
    assert len(server.token_requests) == 2


def test_missing_expires_in_falls_back_to_the_default(
    make_server: Callable[..., AuthServer],
) -> None:
    server = make_server(token_lifetime=None)
    clock = FakeClock()
    auth = ClientCredentialsAuth(
        server.token_url, CLIENT_ID, SECRET, clock=clock, default_expires_in=100, refresh_margin=0
    )
    url = server.fhir_base_url + "/Patient"
    with httpx.Client(auth=auth, timeout=10) as client:
        client.get(url)
        clock.advance(99)
        client.get(url)
        assert len(server.token_requests) == 1
        clock.advance(1)
        client.get(url)
    assert len(server.token_requests) == 2


def test_a_401_refreshes_once_and_replays_the_request_with_its_body(
    server: AuthServer,
) -> None:
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET)
    with httpx.Client(auth=auth, timeout=10) as client:
        assert client.get(server.fhir_base_url + "/Patient").status_code == 200
        server.revoke_tokens()  # the server forgets the token long before expires_in
        response = client.post(
            server.fhir_base_url + "/$export",
            content=json.dumps(PARAMETERS).encode(),
            headers={"Prefer": "respond-async", "Content-Type": "application/fhir+json"},
        )
    # 202: the server parsed the replayed Parameters body (an empty body is a 400).
    assert response.status_code == 202
    assert len(server.token_requests) == 2
    statuses = [r.status for r in server.resource_requests()]
    assert statuses == [200, 401, 202]


def test_a_second_401_is_returned_without_looping(server: AuthServer) -> None:
    server.faults = Faults(tokens_expire_after=0)  # every token is refused
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET)
    response = _get(auth, server.fhir_base_url + "/Patient")
    assert response.status_code == 401
    assert len(server.token_requests) == 2
    assert len(server.resource_requests()) == 2


def test_a_replacement_token_that_ran_out_under_parallel_use_is_replaced_again(
    server: AuthServer,
) -> None:
    """A server limiting uses per token can exhaust the new token before this request's
    replay arrives; the token worked for another request, so one more refresh follows."""
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET)
    url = server.fhir_base_url + "/Patient"

    def answer(status: int, sent: httpx.Request) -> httpx.Response:
        return httpx.Response(status, request=sent)

    flow = auth.sync_auth_flow(httpx.Request("GET", url))
    sent = next(flow)
    tokens = [sent.headers["Authorization"]]
    sent = flow.send(answer(401, sent))  # the first token ran out: a second one
    tokens.append(sent.headers["Authorization"])
    other = auth.sync_auth_flow(httpx.Request("GET", url))
    parallel = next(other)
    assert parallel.headers["Authorization"] == tokens[1]
    with pytest.raises(StopIteration):
        other.send(answer(200, parallel))  # a parallel request got through with it ...
    sent = flow.send(answer(401, sent))  # ... before it ran out for this replay
    tokens.append(sent.headers["Authorization"])
    assert len(set(tokens)) == 3 and len(server.token_requests) == 3

    # A new token refused without ever working ends the request: the server refuses us.
    flow = auth.sync_auth_flow(httpx.Request("GET", url))
    replay = flow.send(answer(401, next(flow)))
    with pytest.raises(StopIteration):
        flow.send(answer(401, replay))
    assert len(server.token_requests) == 4


def test_server_side_expiry_is_handled_by_the_401_retry(
    make_server: Callable[..., AuthServer],
) -> None:
    server_clock = FakeClock()
    server = make_server(token_clock=server_clock)
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET)
    with httpx.Client(auth=auth, timeout=10) as client:
        assert client.get(server.fhir_base_url + "/Patient").status_code == 200
        server_clock.advance(301)  # expired for the server, not yet for the client
        assert client.get(server.fhir_base_url + "/Patient").status_code == 200
    assert len(server.token_requests) == 2


def test_parallel_threads_share_one_token_fetch(server: AuthServer) -> None:
    server.faults = Faults(token_delay=0.3)  # every thread arrives during the first fetch
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET)
    with httpx.Client(auth=auth, timeout=10) as client, ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda i: client.get(f"{server.fhir_base_url}/Patient?_summary=count").status_code,
                range(16),
            )
        )
    assert statuses == [200] * 16
    assert len(server.token_requests) == 1


def test_parallel_401s_share_one_refresh(server: AuthServer) -> None:
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET)
    with httpx.Client(auth=auth, timeout=10) as client:
        assert client.get(server.fhir_base_url + "/Patient").status_code == 200
        server.revoke_tokens()
        server.faults = Faults(token_delay=0.3)
        with ThreadPoolExecutor(8) as pool:
            statuses = list(
                pool.map(
                    lambda i: (
                        client.get(f"{server.fhir_base_url}/Patient?_summary=count").status_code
                    ),
                    range(8),
                )
            )
    assert statuses == [200] * 8
    assert len(server.token_requests) == 2


# --- retries of the token request -------------------------------------------------------------
def test_token_request_retries_5xx_with_backoff(server: AuthServer) -> None:
    server.faults = Faults(token_failures=2, token_failure_status=503)
    sleeps = Sleeps()
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET, sleep=sleeps, backoff=0.5)
    assert _get(auth, server.fhir_base_url + "/Patient").status_code == 200
    assert [r.status for r in server.token_requests] == [503, 503, 200]
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] < sleeps[1] <= 1.25


def test_token_request_gives_up_after_max_attempts(server: AuthServer) -> None:
    server.faults = Faults(token_failures=5, token_failure_status=502)
    sleeps = Sleeps()
    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET, sleep=sleeps, max_attempts=3)
    with pytest.raises(AuthError, match=r"^token request .*HTTP 502"):
        _get(auth, server.fhir_base_url + "/Patient")
    assert len(server.token_requests) == 3 and len(sleeps) == 2


def test_smart_retry_sends_a_fresh_assertion(
    server: AuthServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    server.add_jwks_client(SMART_CLIENT, {"keys": [public_jwk(rsa_key, "kid-r")]})
    server.faults = Faults(token_failures=1, token_failure_status=500)
    auth = SmartBackendAuth(server.fhir_base_url, SMART_CLIENT, rsa_key, "kid-r", sleep=Sleeps())
    assert _get(auth, server.fhir_base_url + "/Patient").status_code == 200
    failed, succeeded = server.token_requests
    assert failed.form["client_assertion"] != succeeded.form["client_assertion"]


def test_network_errors_are_retried_then_named() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now: every attempt is refused.
    sleeps = Sleeps()
    auth = ClientCredentialsAuth(
        f"http://127.0.0.1:{port}/oauth2/token", CLIENT_ID, SECRET, sleep=sleeps, max_attempts=3
    )
    with pytest.raises(AuthError) as raised:
        _get(auth, f"http://127.0.0.1:{port}/fhir/Patient")
    message = str(raised.value)
    assert message.startswith("token request (client_credentials, client_secret_basic):")
    assert "failed after 3 attempt(s): ConnectError" in message
    assert len(sleeps) == 2


# --- transport safety ------------------------------------------------------------------------
def test_credentials_and_tokens_go_over_https_only() -> None:
    with pytest.raises(AuthError, match="only https"):
        ClientCredentialsAuth("http://auth.example.org/oauth2/token", CLIENT_ID, SECRET)
    auth = ClientCredentialsAuth(
        "http://auth.example.org/oauth2/token", CLIENT_ID, SECRET, allow_insecure_http=True
    )
    strict = ClientCredentialsAuth("https://auth.example.org/oauth2/token", CLIENT_ID, SECRET)
    flow = strict.sync_auth_flow(httpx.Request("GET", "http://fhir.example.org/fhir/Patient"))
    with pytest.raises(AuthError, match="resource request: refusing"):
        next(flow)
    assert auth.token_url.startswith("http://")


def test_async_clients_are_refused(server: AuthServer) -> None:
    import asyncio

    auth = ClientCredentialsAuth(server.token_url, CLIENT_ID, SECRET)

    async def call() -> None:
        async with httpx.AsyncClient(auth=auth) as client:
            await client.get(server.fhir_base_url + "/Patient")

    with pytest.raises(AuthError, match=r"httpx\.Client only"):
        asyncio.run(call())


# --- configuration from the environment -------------------------------------------------------
def _pem(
    key: PrivateKey, form: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8
) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def test_env_client_credentials_with_a_secret_file(server: AuthServer, tmp_path: Path) -> None:
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(SECRET + "\n")
    auth = load_auth_from_env(
        environ={
            "STARVIT_FHIR_AUTH": "client_credentials",
            "STARVIT_FHIR_CLIENT_ID": CLIENT_ID,
            "STARVIT_FHIR_CLIENT_SECRET_FILE": str(secret_file),
            "STARVIT_FHIR_TOKEN_URL": server.token_url,
            "STARVIT_FHIR_TOKEN_AUTH_METHOD": "client_secret_post",
            "STARVIT_FHIR_SCOPE": "system/*.read",
            "STARVIT_FHIR_KEY_ID": "",  # empty counts as unset, as compose passes ${X:-}
        }
    )
    assert isinstance(auth, ClientCredentialsAuth)
    assert auth.method == "client_secret_post" and auth.scope == "system/*.read"
    assert _get(auth, server.fhir_base_url + "/Patient").status_code == 200
    assert server.token_requests[0].form["client_secret"] == SECRET


@pytest.mark.parametrize("alg", ["RS384", "ES384", None])
def test_env_smart_backend_with_a_key_file(
    server: AuthServer,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    alg: str | None,
) -> None:
    key: PrivateKey = rsa_key if alg == "RS384" else ec_key
    key_file = tmp_path / "key.pem"
    # Without an explicit alg, also read the traditional "EC PRIVATE KEY" PEM openssl ecparam writes.
    form = serialization.PrivateFormat.TraditionalOpenSSL if alg is None else None
    key_file.write_bytes(_pem(key, form) if form else _pem(key))
    server.add_jwks_client(SMART_CLIENT, {"keys": [public_jwk(key, "kid-env")]})
    environ = {
        "PIPE_AUTH": "smart_backend",
        "PIPE_CLIENT_ID": SMART_CLIENT,
        "PIPE_PRIVATE_KEY_FILE": str(key_file),
        "PIPE_KEY_ID": "kid-env",
        "PIPE_BASE_URL": server.fhir_base_url,
    }
    if alg:
        environ["PIPE_SIGNING_ALG"] = alg
    auth = load_auth_from_env("PIPE_", environ)
    assert isinstance(auth, SmartBackendAuth)
    assert auth.alg == (alg or "ES384") and auth.scope == "system/*.read"
    assert _get(auth, server.fhir_base_url + "/Patient").status_code == 200


def test_env_none_and_unset_mean_no_auth() -> None:
    assert load_auth_from_env(environ={}) is None
    assert load_auth_from_env(environ={"STARVIT_FHIR_AUTH": "none"}) is None
    assert load_auth_from_env(environ={"STARVIT_FHIR_AUTH": ""}) is None


def _env_cases(tmp: Path) -> list[tuple[dict[str, str], str]]:
    cc = {
        "STARVIT_FHIR_AUTH": "client_credentials",
        "STARVIT_FHIR_CLIENT_ID": CLIENT_ID,
        "STARVIT_FHIR_TOKEN_URL": "https://auth.example.org/oauth2/token",
    }
    smart = {
        "STARVIT_FHIR_AUTH": "smart_backend",
        "STARVIT_FHIR_CLIENT_ID": SMART_CLIENT,
        "STARVIT_FHIR_PRIVATE_KEY_FILE": str(tmp / "key.pem"),
        "STARVIT_FHIR_KEY_ID": "kid-1",
        "STARVIT_FHIR_BASE_URL": "https://fhir.example.org/fhir",
    }
    return [
        ({"STARVIT_FHIR_CLIENT_SECRET": SECRET}, "STARVIT_FHIR_AUTH is unset"),
        ({"STARVIT_FHIR_AUTH": "none", "STARVIT_FHIR_CLIENT_ID": "x"}, "STARVIT_FHIR_AUTH is none"),
        ({"STARVIT_FHIR_AUTH": "magic"}, "'magic' is not one of"),
        (cc, "CLIENT_SECRET_FILE (preferred) or STARVIT_FHIR_CLIENT_SECRET must be set"),
        (
            {
                **cc,
                "STARVIT_FHIR_CLIENT_SECRET": SECRET,
                "STARVIT_FHIR_CLIENT_SECRET_FILE": str(tmp / "s"),
            },
            "set only one",
        ),
        ({**cc, "STARVIT_FHIR_CLIENT_SECRET_FILE": str(tmp / "absent")}, "cannot read"),
        ({**cc, "STARVIT_FHIR_CLIENT_SECRET_FILE": str(tmp / "empty")}, "is empty"),
        (
            {**cc, "STARVIT_FHIR_CLIENT_SECRET": SECRET, "STARVIT_FHIR_KEY_ID": "k"},
            "STARVIT_FHIR_KEY_ID do(es) not apply",
        ),
        (
            {**cc, "STARVIT_FHIR_CLIENT_SECRET": SECRET, "STARVIT_FHIR_TOKEN_AUTH_METHOD": "jwt"},
            "TOKEN_AUTH_METHOD='jwt'",
        ),
        (
            {k: v for k, v in cc.items() if k != "STARVIT_FHIR_TOKEN_URL"}
            | {"STARVIT_FHIR_CLIENT_SECRET": SECRET},
            "STARVIT_FHIR_TOKEN_URL is not set",
        ),
        (
            {
                **cc,
                "STARVIT_FHIR_TOKEN_URL": "http://auth.example.org/t",
                "STARVIT_FHIR_CLIENT_SECRET": SECRET,
            },
            "only https",
        ),
        ({**smart, "STARVIT_FHIR_CLIENT_SECRET": SECRET}, "CLIENT_SECRET do(es) not apply"),
        ({k: v for k, v in smart.items() if k != "STARVIT_FHIR_KEY_ID"}, "KEY_ID is not set"),
        ({**smart, "STARVIT_FHIR_SIGNING_ALG": "HS256"}, "SIGNING_ALG='HS256'"),
        (
            {k: v for k, v in smart.items() if k != "STARVIT_FHIR_BASE_URL"},
            "BASE_URL (for SMART discovery) or STARVIT_FHIR_TOKEN_URL",
        ),
        ({**smart, "STARVIT_FHIR_PRIVATE_KEY_FILE": str(tmp / "absent.pem")}, "cannot read"),
        ({**smart, "STARVIT_FHIR_PRIVATE_KEY_FILE": str(tmp / "empty")}, "not a readable"),
        ({**smart, "STARVIT_FHIR_ALLOW_INSECURE_HTTP": "maybe"}, "true or false"),
    ]


def test_env_missing_or_contradictory_settings_are_named(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    (tmp_path / "s").write_text(SECRET)
    (tmp_path / "empty").write_text("  \n")
    (tmp_path / "key.pem").write_bytes(_pem(ec_key))
    for environ, expected in _env_cases(tmp_path):
        with pytest.raises(AuthError) as raised:
            load_auth_from_env(environ=environ)
        message = str(raised.value)
        assert message.startswith("configuration: "), message
        assert raised.value.step == "configuration" and raised.value.status is None
        assert expected in message, (expected, message)
        _assert_clean(message, SECRET)


def test_encrypted_key_file_is_refused_clearly(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    environ = {
        "STARVIT_FHIR_AUTH": "smart_backend",
        "STARVIT_FHIR_CLIENT_ID": SMART_CLIENT,
        "STARVIT_FHIR_PRIVATE_KEY_FILE": str(key_file),
        "STARVIT_FHIR_KEY_ID": "kid-1",
        "STARVIT_FHIR_TOKEN_URL": "https://auth.example.org/token",
    }
    with pytest.raises(AuthError, match="is encrypted"):
        load_auth_from_env(environ=environ)


def test_jwks_command_prints_the_registered_key(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    from starvit_assets.fhir.auth import _main

    key_file = tmp_path / "key.pem"
    key_file.write_bytes(_pem(ec_key))
    assert _main(["jwks", "--private-key", str(key_file), "--kid", "kid-9"]) == 0
    printed: dict[str, Any] = json.loads(capsys.readouterr().out)
    (jwk,) = printed["keys"]
    assert jwk["kid"] == "kid-9" and jwk["alg"] == "ES384" and "d" not in jwk
    assert jwk == public_jwk(ec_key, "kid-9")
