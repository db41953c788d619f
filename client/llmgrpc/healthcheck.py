"""`llmgrpc-healthcheck`: exit 0 iff the gRPC health service says SERVING.

For container HEALTHCHECKs and exec probes; Kubernetes can also probe the
same service natively with a `grpc:` probe.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgrpc.client import SERVICE_NAME


def check(target: str, service: str, timeout: float) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="llmgrpc-healthcheck", description=__doc__)
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--service", default=SERVICE_NAME,
                   help='health service name ("" = process up)')  # fmt: skip
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    try:
        status = check(args.target, args.service, args.timeout)
    except grpc.RpcError as e:
        print(f"{args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    print(status)
    raise SystemExit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    main()
