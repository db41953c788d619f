"""`llmgrpc-healthcheck`: exit 0 iff the gRPC health service says SERVING.

For container HEALTHCHECKs and exec probes; Kubernetes can also probe the
same service natively with a `grpc:` probe on a plaintext server.

On a TLS server, each TLS flag can come from the environment instead, so the
image's HEALTHCHECK line works unchanged once the container's environment
names the files (flags win over the environment):

    LLMGRPC_HEALTHCHECK_CA_CERT      --ca-cert      CA that signed the server's certificate
    LLMGRPC_HEALTHCHECK_CLIENT_CERT  --client-cert  client certificate (mTLS)
    LLMGRPC_HEALTHCHECK_CLIENT_KEY   --client-key   its key (mTLS)
    LLMGRPC_HEALTHCHECK_SERVER_NAME  --server-name  name the server's certificate holds
    LLMGRPC_HEALTHCHECK_TLS=1        --tls          TLS with the system's CA roots

No bearer token: the server answers health checks without one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from llmgrpc.client import SERVICE_NAME, Client, Security

ENV_PREFIX = "LLMGRPC_HEALTHCHECK_"


def check(target: str, service: str, timeout: float, security: Security | None = None) -> str:
    """The serving status of `service` ("SERVING", "NOT_SERVING", ...)."""
    with Client(target, security=security) as client:
        return client.health(service, timeout=timeout)


def _env(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name) or None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmgrpc-healthcheck", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--service", default=SERVICE_NAME,
                   help='health service name ("" = process up)')  # fmt: skip
    p.add_argument("--timeout", type=float, default=3.0)
    tls = p.add_argument_group("TLS (each defaults to its LLMGRPC_HEALTHCHECK_* variable)")
    env_tls = (_env("TLS") or "").lower() in {"1", "true", "yes"}
    tls.add_argument("--tls", action="store_true", default=env_tls,
                     help="use TLS with the system roots")  # fmt: skip
    tls.add_argument("--ca-cert", type=Path, default=_env("CA_CERT"),
                     help="PEM CA to verify the server (implies TLS)")  # fmt: skip
    tls.add_argument("--client-cert", type=Path, default=_env("CLIENT_CERT"),
                     help="PEM client certificate (mTLS)")  # fmt: skip
    tls.add_argument("--client-key", type=Path, default=_env("CLIENT_KEY"),
                     help="PEM client key (mTLS)")  # fmt: skip
    tls.add_argument("--server-name", default=_env("SERVER_NAME"),
                     help="name in the server's certificate, if not the target's")  # fmt: skip
    return p


def _security(args: argparse.Namespace) -> Security:
    """The TLS material; argparse applies `type` to string defaults (the environment's) too."""
    if (args.client_cert is None) != (args.client_key is None):
        raise ValueError("--client-cert and --client-key go together")
    for flag, path in (("--ca-cert", args.ca_cert), ("--client-cert", args.client_cert),
                       ("--client-key", args.client_key)):  # fmt: skip
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    return Security(ca_cert=args.ca_cert, client_cert=args.client_cert,
                    client_key=args.client_key, tls=args.tls,
                    server_name=args.server_name)  # fmt: skip


def _hint(security: Security) -> str:
    """What to try when the server could not be reached, given what was sent."""
    if not security.uses_tls:
        return " (a TLS server? give --ca-cert or LLMGRPC_HEALTHCHECK_CA_CERT)"
    if security.client_cert is None:
        return (" (a server that requires client certificates? give --client-cert and "
                "--client-key or LLMGRPC_HEALTHCHECK_CLIENT_CERT/_KEY)")  # fmt: skip
    return ""


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        security = _security(args)
    except ValueError as e:
        print(f"llmgrpc-healthcheck: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        status = check(args.target, args.service, args.timeout, security)
    except grpc.RpcError as e:
        hint = _hint(security) if e.code() == grpc.StatusCode.UNAVAILABLE else ""
        print(f"{args.target}: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
        raise SystemExit(1) from None
    print(status)
    raise SystemExit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    main()
