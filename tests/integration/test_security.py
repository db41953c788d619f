"""End to end with the real engine: TLS + mutual TLS + bearer tokens + limits, CLI included.

One server (`secure`, a session fixture: TLS changes every client, so it
shares with no other configuration), started with every security flag and
the prompt/max_tokens limits; certificates are generated for the run. The
log test stops it, so it runs last (`stops_server`). Protocol
details (rogue CAs, header schemes, constant-time comparison) are covered
faster on the fake engine in tests/unit/test_auth_tls.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llmgrpc import Client, Security

from tests.certs import Pki, make_pki
from tests.server_process import ServerProcess, engine_fixture, running
from tests.status_details import detail

pytestmark = pytest.mark.engine

TOKENS = ("llmgrpc-e2e-token-one-8c41f0", "llmgrpc-e2e-token-two-2b97de")
WRONG = "llmgrpc-e2e-wrong-token-51aa3c"
MAX_PROMPT_TOKENS = 32
MAX_TOKENS_LIMIT = 8
CLI = Path(sys.executable).parent / "llmgrpc"


@dataclass
class Secure:
    server: ServerProcess
    pki: Pki
    token_file: Path

    def security(self, token: str | None = TOKENS[0], client_cert: bool = True) -> Security:
        pki = self.pki
        if not client_cert:
            return Security(ca_cert=pki.ca.cert, token=token)
        return Security(ca_cert=pki.ca.cert, client_cert=pki.client.cert,
                        client_key=pki.client.key, token=token)  # fmt: skip

    def client(self, **kw: object) -> Client:
        return Client(self.server.target, security=self.security(**kw), timeout=60)  # type: ignore[arg-type]

    def cli(self, *argv: str, token: bool = True) -> subprocess.CompletedProcess[str]:
        pki = self.pki
        conn = ["--target", self.server.target, "--ca-cert", str(pki.ca.cert),
                "--client-cert", str(pki.client.cert), "--client-key", str(pki.client.key),
                "--timeout", "60"]  # fmt: skip
        if token:
            conn += ["--token-file", str(self.token_file)]
        return subprocess.run([str(CLI), *argv, *conn], capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip


@engine_fixture()
def secure(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Secure]:
    directory = tmp_path_factory.mktemp("security")
    pki = make_pki(directory / "pki", "e2e")
    token_file = directory / "tokens"
    token_file.write_text("\n".join(TOKENS) + "\n")
    args = [
        "--model", "tiny-llama-gqa",
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        "--tls-client-ca", str(pki.ca.cert), "--auth-token-file", str(token_file),
        "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
        "--max-tokens-limit", str(MAX_TOKENS_LIMIT),
    ]  # fmt: skip
    with running(args, "secure", request) as server:
        server.wait_ports()
        secure = Secure(server, pki, token_file)
        # Health is open: no token needed, but the mTLS handshake is.
        with secure.client(token=None) as probe:
            probe.wait_until_serving(timeout=300)
        yield secure


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_tls_mtls_and_a_token_serve_every_rpc(secure: Secure) -> None:
    with secure.client() as c:
        out = c.generate("Hello, world", max_tokens=6, temperature=0.0)
        assert out.usage.completion_tokens == 6
        streamed = list(c.stream("Hello, world", max_tokens=6, temperature=0.0))
        assert "".join(d.text for d in streamed) == out.text
        assert c.tokenize("Hello").token_ids
        assert c.detokenize(list(out.token_ids)) == out.text
        assert c.model_info().model_name == "tiny-llama-gqa"
    with secure.client(token=TOKENS[1]) as c:  # the second token in the file works too
        assert c.generate("Hi", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2


def test_no_way_in_without_the_certificate_and_a_token(secure: Secure) -> None:
    target = secure.server.target
    with Client(target, timeout=10) as plaintext:
        assert _code(lambda: plaintext.generate("x", max_tokens=1)) == grpc.StatusCode.UNAVAILABLE
        assert _code(plaintext.health) == grpc.StatusCode.UNAVAILABLE
    with secure.client(client_cert=False) as no_cert:
        assert _code(lambda: no_cert.generate("x", max_tokens=1)) == grpc.StatusCode.UNAVAILABLE
        assert _code(no_cert.health) == grpc.StatusCode.UNAVAILABLE
    for token in (None, WRONG):
        with secure.client(token=token) as c:
            for call in (
                lambda: c.generate("x", max_tokens=1),
                lambda: list(c.stream("x", max_tokens=1)),
                lambda: c.tokenize("x"),
                lambda: c.detokenize([1]),
                c.model_info,
            ):
                assert _code(call) == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(secure: Secure) -> None:
    with secure.client(token=None) as c:
        assert c.health() == "SERVING"
        assert c.health("") == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for r in responses for s in r.list_services_response.service}
    assert {"llmgrpc.v1.LLMService", "grpc.health.v1.Health"} <= services


def test_cli_with_certificates_and_token_file(secure: Secure) -> None:
    ok = secure.cli("generate", "Hello", "--max-tokens", "4", "--json")
    assert ok.returncode == 0, ok.stderr
    assert '"completion_tokens": 4' in ok.stdout
    streamed = secure.cli("generate", "Hello", "--max-tokens", "4", "--stream")
    assert streamed.returncode == 0, streamed.stderr
    denied = secure.cli("generate", "Hello", "--max-tokens", "4", token=False)
    assert denied.returncode == 1
    assert "UNAUTHENTICATED" in denied.stderr
    health = secure.cli("health", token=False)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")


def test_the_image_healthcheck_on_the_tls_server(secure: Secure) -> None:
    """`llmgrpc-healthcheck` as the image's HEALTHCHECK runs it, its certificates
    named by the container's environment; health needs no token."""
    pki = secure.pki
    env = {**os.environ, "LLMGRPC_HEALTHCHECK_CA_CERT": str(pki.ca.cert),
           "LLMGRPC_HEALTHCHECK_CLIENT_CERT": str(pki.client.cert),
           "LLMGRPC_HEALTHCHECK_CLIENT_KEY": str(pki.client.key)}  # fmt: skip
    command = [str(CLI.parent / "llmgrpc-healthcheck"), "--target", secure.server.target,
               "--service", "llmgrpc.v1.LLMService", "--timeout", "30"]  # fmt: skip
    ok = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    without = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert without.returncode == 1
    assert "UNAVAILABLE" in without.stderr and "LLMGRPC_HEALTHCHECK_CA_CERT" in without.stderr


def _prompt_too_long(err: grpc.RpcError) -> dict[str, str]:
    info = detail(err, error_details_pb2.ErrorInfo)
    assert info.reason == "PROMPT_TOO_LONG"
    return dict(info.metadata)


def test_prompt_and_max_tokens_limits_on_the_real_engine(secure: Secure) -> None:
    with secure.client() as c:
        long_text = "The quick brown fox jumps over the lazy dog. " * 8
        n = len(c.tokenize(long_text).token_ids)
        assert n > MAX_PROMPT_TOKENS
        cases = {
            "prompt": lambda: c.generate(long_text, max_tokens=1),
            "chat": lambda: c.generate(messages=[("user", long_text)], max_tokens=1),
            "prompt_token_ids": lambda: c.generate(
                prompt_token_ids=[5] * (MAX_PROMPT_TOKENS + 1), max_tokens=1),
        }  # fmt: skip
        for field, call in cases.items():
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith(f"{field}: "), e.value.details()
            assert e.value.details().endswith(
                f"prompt tokens exceed the server's --max-prompt-tokens of {MAX_PROMPT_TOKENS}"
            )
            assert _prompt_too_long(e.value)["limit"] == str(MAX_PROMPT_TOKENS)
        fits = c.generate(prompt_token_ids=[5] * MAX_PROMPT_TOKENS, max_tokens=1)
        assert fits.usage.prompt_tokens == MAX_PROMPT_TOKENS

        with pytest.raises(grpc.RpcError) as e:
            c.generate("Hi", max_tokens=MAX_TOKENS_LIMIT + 1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == (
            f"sampling.max_tokens: {MAX_TOKENS_LIMIT + 1} exceeds the server's "
            f"--max-tokens-limit of {MAX_TOKENS_LIMIT} tokens"
        )
        # Unset max_tokens defaults to min(16, the limit).
        default = c.generate("Hi", ignore_eos=True)
        assert default.usage.completion_tokens == MAX_TOKENS_LIMIT


@pytest.mark.stops_server
def test_tokens_never_appear_in_the_server_log(secure: Secure) -> None:
    """Stops the server so that its log is complete (`stops_server`: run last)."""
    with secure.client(token=WRONG) as c:
        assert _code(lambda: c.generate("x", max_tokens=1)) == grpc.StatusCode.UNAUTHENTICATED
    secure.server.stop()
    log = secure.server.log()
    assert "gRPC listening on port" in log and "(TLS)" in log
    for secret in (*TOKENS, WRONG):
        assert secret not in log
