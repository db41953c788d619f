"""Compile proto/ into client/llmgrpc/v1 whenever the package is built.

The generated modules (with mypy-protobuf .pyi stubs) are git-ignored: a
clean clone has only the .proto files, and `pip install .` (editable or not)
produces the Python code that matches them.
"""

from __future__ import annotations

import pathlib

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

ROOT = pathlib.Path(__file__).parent.resolve()


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    proto_root = ROOT / "proto"
    out = ROOT / "client"
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(sources))


class BuildProto(Command):
    description = "compile proto/ into client/llmgrpc/v1"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        compile_protos()


class BuildPy(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


class Develop(develop):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_proto": BuildProto, "build_py": BuildPy, "develop": Develop})
