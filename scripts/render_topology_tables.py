"""Write docs/capacity.md's topology tables with `llmgrpc plan --gpu`'s own planner.

Each table sits between `<!-- topology:MODEL:CONTEXT:begin -->` and
`<!-- topology:MODEL:CONTEXT:end -->` (CONTEXT: `full`, the model's own, or a number
of tokens); this rewrites what is between them. With --check it changes nothing and
exits 1 when the docs and the planner disagree (tests/unit/test_topology_docs.py).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from llmgrpc import plan, plan_topology

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "capacity.md"
MARKER = re.compile(
    r"(?P<begin><!-- topology:(?P<model>[\w.-]+):(?P<context>\w+):begin -->\n)"
    r".*?"
    r"(?P<end><!-- topology:(?P=model):(?P=context):end -->)",
    re.S,
)


def table(model: str, context: str) -> str:
    options = {} if context == "full" else {"context_len": int(context)}
    return plan_topology.markdown_table(model, plan.size_text, **options)


def rendered(text: str) -> str:
    return MARKER.sub(lambda m: m["begin"] + table(m["model"], m["context"]) + m["end"], text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=pathlib.Path, default=DOC)
    parser.add_argument("--check", action="store_true", help="exit 1 if the tables are stale")
    args = parser.parse_args()
    text = args.doc.read_text(encoding="utf-8")
    if not MARKER.search(text):
        print(f"{args.doc}: no topology markers", file=sys.stderr)
        return 1
    new = rendered(text)
    if args.check:
        if new != text:
            print(f"{args.doc}: topology tables are stale; run {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(new, encoding="utf-8")
    print(f"{args.doc}: {'updated' if new != text else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
