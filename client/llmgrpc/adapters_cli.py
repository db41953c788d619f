"""`llmgrpc adapters`: LoRA adapters on a running server, through its AdminService.

    llmgrpc adapters list --token-file admin.token
    llmgrpc adapters load support-v3 support/v3 --token-file admin.token
    llmgrpc adapters unload support-v3 --token-file admin.token

PATH is a directory relative to the server's --adapter-dir, holding PEFT's
adapter_config.json and adapter_model.safetensors. --token-file holds an admin
token (a line of the server's --admin-token-file): a serving token is
PERMISSION_DENIED, and a server started without --admin-token-file answers
UNIMPLEMENTED. A request then selects an adapter by name:
`llmgrpc generate "Hello" --model support-v3`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llmgrpc.cli import _adapter_line, _connection_args, _print_json, _security
from llmgrpc.client import AdminClient
from llmgrpc.v1 import admin_service_pb2 as admin_pb


def add_parser(subparsers: Any) -> None:
    """Register the `adapters` subcommand and its actions on an argparse subparsers object."""
    p = subparsers.add_parser(
        "adapters", help="list, load and unload LoRA adapters (admin token)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True)

    ls = actions.add_parser("list", help="every adapter the server serves")
    ls.add_argument("--json", action="store_true", help="print the response as JSON")
    ls.set_defaults(func=cmd_list)

    load = actions.add_parser("load", help="load an adapter from under the server's --adapter-dir")
    load.add_argument("name", help="the name requests will use in --model")
    load.add_argument("path", help="its directory, relative to the server's --adapter-dir")
    load.set_defaults(func=cmd_load)

    unload = actions.add_parser("unload", help="remove an adapter (requests running finish)")
    unload.add_argument("name")
    unload.set_defaults(func=cmd_unload)

    for action in (ls, load, unload):
        _connection_args(action)


def _admin(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.target, security=_security(args), timeout=args.timeout)


def cmd_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        adapters = admin.list_adapters()
    if args.json:
        _print_json(admin_pb.ListAdaptersResponse(adapters=adapters))
        return 0
    if not adapters:
        print("no adapters", file=sys.stderr)
    for a in adapters:
        print(_adapter_line(a))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        resp = admin.load_adapter(args.name, args.path)
    verb = "already loaded (nothing changed)" if resp.already_loaded else "loaded"
    print(f"{verb}: {_adapter_line(resp.adapter)}")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.unload_adapter(args.name)
    print(f"unloaded: {args.name}")
    return 0
