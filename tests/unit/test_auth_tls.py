"""TLS, mutual TLS and bearer tokens, on a real gRPC server with the fake engine.

Certificates are made per run (tests/certs.py). The end-to-end proof with the
real engine and the CLI is tests/integration/test_security.py.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llmgrpc import AsyncClient, Security, cli
from llmgrpc.client import tokenize_request
from llmgrpc.v1 import admin_service_pb2 as admin_pb
from llmgrpc.v1 import admin_service_pb2_grpc as admin_grpc
from llmgrpc_server import auth
from llmgrpc_server.config import TRANSPORTS, ServerConfig, read_tokens

from tests.certs import Pki, make_pki
from tests.fake_server import FakeServer, start_fake

TOKENS = ("tok-alpha-3f9c1e", "tok-beta-77d2a0")
WRONG = "tok-wrong-5b1d44"
FAIL_FAST = 5.0  # seconds: a refused handshake must not hang a test
HEALTHCHECK = Path(sys.executable).parent / "llmgrpc-healthcheck"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "good")


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, untrusted CA with its own server and client certificates."""
    return make_pki(tmp_path_factory.mktemp("rogue"), "rogue")


def _config(**kw: Any) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, **kw)


async def _serving(config: ServerConfig) -> AsyncIterator[FakeServer]:
    srv = await start_fake(config)
    try:
        yield srv
    finally:
        await srv.running.server.stop(grace=0)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each server below runs once on each transport (--transport)."""
    return str(request.param)


@pytest.fixture
async def tls(pki: Pki, transport: str) -> AsyncIterator[FakeServer]:
    config = _config(tls_cert=pki.server.cert, tls_key=pki.server.key, transport=transport)
    async for srv in _serving(config):
        yield srv


@pytest.fixture
async def mtls(pki: Pki, transport: str) -> AsyncIterator[FakeServer]:
    config = _config(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert,
                     transport=transport)  # fmt: skip
    async for srv in _serving(config):
        yield srv


@pytest.fixture
async def with_tokens(transport: str) -> AsyncIterator[FakeServer]:
    async for srv in _serving(_config(auth_tokens=TOKENS, transport=transport)):
        yield srv


async def _code(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# --- TLS ----------------------------------------------------------------------------


async def test_tls_serves_clients_that_trust_its_ca(tls: FakeServer, pki: Pki) -> None:
    for target in (tls.target, f"localhost:{tls.running.port}"):
        async with AsyncClient(target, security=Security(ca_cert=pki.ca.cert)) as c:
            assert (await c.generate("hi", max_tokens=2, timeout=FAIL_FAST)).token_ids
            assert await c.health() == "SERVING"
    assert _started_calls(tls) == 4  # the counter sees calls that get through


async def test_tls_refuses_plaintext_and_untrusting_clients(
    tls: FakeServer, pki: Pki, rogue: Pki
) -> None:
    clients = {
        "plaintext": AsyncClient(tls.target),
        "another CA": AsyncClient(tls.target, security=Security(ca_cert=rogue.ca.cert)),
        "wrong server name": AsyncClient(
            tls.target, security=Security(ca_cert=pki.ca.cert, server_name="api.example.com")
        ),
    }
    for what, client in clients.items():
        async with client as c:
            code = await _code(c.generate("hi", max_tokens=1, timeout=FAIL_FAST))
            assert code == grpc.StatusCode.UNAVAILABLE, what
            assert await _code(c.health(timeout=FAIL_FAST)) == grpc.StatusCode.UNAVAILABLE, what
    # No call got past the handshake to the service.
    assert _started_calls(tls) == 0


def _started_calls(srv: FakeServer) -> float:
    return sum(
        sample.value
        for family in srv.registry.collect()
        for sample in family.samples
        if sample.name == "grpc_server_started_total"
    )


async def test_tls_client_is_refused_by_a_plaintext_server(fake: FakeServer, pki: Pki) -> None:
    async with AsyncClient(fake.target, security=Security(ca_cert=pki.ca.cert)) as c:
        code = await _code(c.generate("hi", max_tokens=1, timeout=FAIL_FAST))
    assert code == grpc.StatusCode.UNAVAILABLE


# --- mutual TLS ------------------------------------------------------------------


async def test_mtls_needs_a_client_certificate_from_its_ca(
    mtls: FakeServer, pki: Pki, rogue: Pki
) -> None:
    refused = {
        "no client certificate": Security(ca_cert=pki.ca.cert),
        "certificate from another CA": Security(
            ca_cert=pki.ca.cert, client_cert=rogue.client.cert, client_key=rogue.client.key
        ),
    }
    for what, security in refused.items():
        async with AsyncClient(mtls.target, security=security) as c:
            code = await _code(c.generate("hi", max_tokens=1, timeout=FAIL_FAST))
            assert code == grpc.StatusCode.UNAVAILABLE, what
            # The handshake fails before any RPC: health needs the certificate too.
            assert await _code(c.health(timeout=FAIL_FAST)) == grpc.StatusCode.UNAVAILABLE, what
    good = Security(ca_cert=pki.ca.cert, client_cert=pki.client.cert, client_key=pki.client.key)
    async with AsyncClient(mtls.target, security=good) as c:
        assert (await c.generate("hi", max_tokens=2, timeout=FAIL_FAST)).token_ids
        assert [d.text async for d in c.stream("hi", max_tokens=2)]
        assert await c.health() == "SERVING"


def test_client_ca_without_a_server_certificate_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        _config(tls_client_ca=pki.ca.cert)
    with pytest.raises(ValueError, match="go together"):
        _config(tls_cert=pki.server.cert)


# --- bearer tokens -------------------------------------------------------------------

_CALLS: dict[str, Callable[[AsyncClient], Awaitable[Any]]] = {
    "Generate": lambda c: c.generate("hi", max_tokens=1),
    "GenerateStream": lambda c: _drain(c.stream("hi", max_tokens=2)),
    "Tokenize": lambda c: c.tokenize("hi"),
    "Detokenize": lambda c: c.detokenize([1, 2]),
    "GetModelInfo": lambda c: c.model_info(),
}


async def _drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [m async for m in stream]


@pytest.mark.parametrize("method", sorted(_CALLS))
async def test_every_rpc_needs_a_valid_token(with_tokens: FakeServer, method: str) -> None:
    call = _CALLS[method]
    for token in (None, WRONG, "", TOKENS[0] + "x", TOKENS[0][:-1]):
        async with AsyncClient(with_tokens.target, security=Security(token=token)) as c:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(c)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
            assert "Bearer" in (e.value.details() or "")
    for token in TOKENS:  # every token in the file works
        async with AsyncClient(with_tokens.target, security=Security(token=token)) as c:
            await call(c)
    assert with_tokens.engine.running == set()


@pytest.mark.parametrize(
    "header",
    [f"Basic {TOKENS[0]}", TOKENS[0], f"Bearer{TOKENS[0]}", f"Bearer  {TOKENS[0]}", "Bearer "],
)
async def test_only_the_bearer_scheme_is_accepted(with_tokens: FakeServer, header: str) -> None:
    async with AsyncClient(with_tokens.target) as c:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.stub.Tokenize(tokenize_request("hi"), metadata=(("authorization", header),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_scheme_is_case_insensitive(with_tokens: FakeServer) -> None:
    async with AsyncClient(with_tokens.target) as c:
        for scheme in ("bearer", "BEARER"):
            resp = await c.stub.Tokenize(
                tokenize_request("hi"), metadata=(("authorization", f"{scheme} {TOKENS[1]}"),)
            )
            assert resp.token_ids


async def test_health_and_reflection_stay_open(with_tokens: FakeServer) -> None:
    async with AsyncClient(with_tokens.target) as c:
        assert await c.health() == "SERVING"
        assert await c.health("") == "SERVING"
        watch = c.health_stub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        watch.cancel()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name async for r in call for s in r.list_services_response.service}
    assert "llmgrpc.v1.LLMService" in services
    assert "grpc.health.v1.Health" in services


async def test_tokens_never_reach_logs_or_statuses(
    with_tokens: FakeServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    details = []
    for token in (WRONG, TOKENS[0], TOKENS[1]):
        async with AsyncClient(with_tokens.target, security=Security(token=token)) as c:
            try:
                await c.generate("hi", max_tokens=1)
            except grpc.aio.AioRpcError as e:
                details.append(f"{e.details()} {e.debug_error_string()}")
            # An error after authentication (bad input) must not echo it either.
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await c.generate("", max_tokens=1)
            details.append(f"{bad.value.details()} {bad.value.debug_error_string()}")
    out, err = capfd.readouterr()
    for secret in (WRONG, *TOKENS):
        assert secret not in caplog.text
        assert secret not in out + err
        assert not any(secret in d for d in details)


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured token is compared with hmac.compare_digest, even after
    a match: no early exit that would time which token matched."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    interceptor = auth.TokenAuthInterceptor(("t1", "t2", "t3"))
    for presented, valid in (("t1", True), ("t3", True), ("nope", False)):
        calls.clear()
        assert interceptor._valid(presented, interceptor._tokens) is valid
        assert [b for _, b in calls] == [b"t1", b"t2", b"t3"]


def test_token_file_holds_one_token_per_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"  {TOKENS[0]}  \n\n{TOKENS[1]}\r\n")
    assert read_tokens(path) == TOKENS
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="no tokens"):
        read_tokens(path)


async def test_tls_mtls_and_tokens_together(pki: Pki) -> None:
    config = _config(tls_cert=pki.server.cert, tls_key=pki.server.key,
                     tls_client_ca=pki.ca.cert, auth_tokens=TOKENS)  # fmt: skip
    certs = {"ca_cert": pki.ca.cert, "client_cert": pki.client.cert, "client_key": pki.client.key}
    async for srv in _serving(config):
        async with AsyncClient(srv.target, security=Security(**certs)) as c:
            assert await c.health() == "SERVING"
            assert await _code(c.generate("hi", max_tokens=1)) == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncClient(srv.target, security=Security(**certs, token=TOKENS[1])) as c:
            assert (await c.generate("hi", max_tokens=2)).usage.completion_tokens == 2


async def test_cli_speaks_tls_mtls_and_tokens(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tls_cert=pki.server.cert, tls_key=pki.server.key,
                     tls_client_ca=pki.ca.cert, auth_tokens=TOKENS)  # fmt: skip
    token_file = tmp_path / "token"
    token_file.write_text("\n".join(TOKENS) + "\n")  # the server's file: the first line is used
    async for srv in _serving(config):
        conn = [
            "--target", srv.target, "--ca-cert", str(pki.ca.cert),
            "--client-cert", str(pki.client.cert), "--client-key", str(pki.client.key),
        ]  # fmt: skip

        def run(*argv: str) -> int:
            try:
                cli.main(list(argv))
            except SystemExit as e:
                return int(e.code or 0)
            return 0

        # The blocking CLI runs in a thread: the server shares this event loop.
        assert await asyncio.to_thread(run, "generate", "hi", "--max-tokens", "3", *conn,
                                       "--token-file", str(token_file)) == 0  # fmt: skip
        assert len(capsys.readouterr().out.strip()) == 3
        assert await asyncio.to_thread(run, "generate", "hi", *conn) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert await asyncio.to_thread(run, "health", *conn) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        no_cert = ["--target", srv.target, "--ca-cert", str(pki.ca.cert), "--timeout", "5"]
        assert await asyncio.to_thread(run, "health", *no_cert) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err


# --- llmgrpc-healthcheck (the image's HEALTHCHECK) ------------------------------------


async def _healthcheck(target: str, *flags: str, env: dict[str, str] | None = None
                       ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The console script, as a container runs it, beside the server on this event loop."""
    command = [str(HEALTHCHECK), "--target", target, "--timeout", str(FAIL_FAST), *flags]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                   env={**os.environ, **(env or {})}, timeout=60,
                                   check=False)  # fmt: skip


async def test_healthcheck_speaks_mtls_from_its_environment_or_flags(
    mtls: FakeServer, pki: Pki
) -> None:
    env = {"LLMGRPC_HEALTHCHECK_CA_CERT": str(pki.ca.cert),
           "LLMGRPC_HEALTHCHECK_CLIENT_CERT": str(pki.client.cert),
           "LLMGRPC_HEALTHCHECK_CLIENT_KEY": str(pki.client.key)}  # fmt: skip
    ok = await _healthcheck(mtls.target, env=env)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    flags = ["--ca-cert", str(pki.ca.cert), "--client-cert", str(pki.client.cert),
             "--client-key", str(pki.client.key), "--server-name", "localhost"]  # fmt: skip
    ok = await _healthcheck(mtls.target, *flags)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    # The server name is checked against the certificate.
    wrong_name = await _healthcheck(mtls.target, *flags[:-1], "api.example.com")
    assert wrong_name.returncode == 1
    assert wrong_name.stderr.startswith(f"{mtls.target}: UNAVAILABLE: "), wrong_name.stderr


async def test_healthcheck_without_the_certificates_fails_saying_what_to_give(
    mtls: FakeServer, pki: Pki, tmp_path: Path
) -> None:
    plaintext = await _healthcheck(mtls.target)
    assert plaintext.returncode == 1
    assert plaintext.stdout == ""
    assert plaintext.stderr.startswith(f"{mtls.target}: UNAVAILABLE: "), plaintext.stderr
    assert "give --ca-cert or LLMGRPC_HEALTHCHECK_CA_CERT" in plaintext.stderr
    no_client_cert = await _healthcheck(mtls.target, env={"LLMGRPC_HEALTHCHECK_CA_CERT":
                                                          str(pki.ca.cert)})  # fmt: skip
    assert no_client_cert.returncode == 1
    assert "give --client-cert and --client-key" in no_client_cert.stderr, no_client_cert.stderr
    missing = tmp_path / "no-such-ca.crt"
    bad_path = await _healthcheck(mtls.target, "--ca-cert", str(missing))
    assert bad_path.returncode == 1
    assert bad_path.stderr.strip() == f"llmgrpc-healthcheck: --ca-cert {missing}: no such file"
    print(f"\nplaintext: {plaintext.stderr.strip()}\nno client certificate: "
          f"{no_client_cert.stderr.strip()}")  # fmt: skip


# --- AdminService tokens --------------------------------------------------------------


ADMIN_TOKENS = ("admin-1",)


async def _admin_code(target: str, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        return await _code(stub.ListAdapters(admin_pb.ListAdaptersRequest(), metadata=metadata,
                                             timeout=FAIL_FAST))  # fmt: skip


async def test_admin_service_takes_only_admin_tokens() -> None:
    """A serving token is PERMISSION_DENIED on AdminService; an admin token does
    not serve; without --admin-token-file the service is UNIMPLEMENTED."""
    async for srv in _serving(_config(auth_tokens=TOKENS, admin_tokens=ADMIN_TOKENS)):
        assert await _admin_code(srv.target, ADMIN_TOKENS[0]) == grpc.StatusCode.OK
        assert await _admin_code(srv.target, TOKENS[0]) == grpc.StatusCode.PERMISSION_DENIED
        for bad in (None, "wrong"):
            assert await _admin_code(srv.target, bad) == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncClient(srv.target, security=Security(token=ADMIN_TOKENS[0])) as c:
            assert await _code(c.generate("hi", max_tokens=1, timeout=FAIL_FAST)) == (
                grpc.StatusCode.UNAUTHENTICATED)  # fmt: skip
    async for srv in _serving(_config(admin_tokens=ADMIN_TOKENS)):  # serving stays open
        async with AsyncClient(srv.target) as c:
            assert (await c.generate("hi", max_tokens=1, timeout=FAIL_FAST)).token_ids
        assert await _admin_code(srv.target, None) == grpc.StatusCode.UNAUTHENTICATED
    async for srv in _serving(_config(auth_tokens=TOKENS)):
        assert await _admin_code(srv.target, TOKENS[0]) == grpc.StatusCode.UNIMPLEMENTED
