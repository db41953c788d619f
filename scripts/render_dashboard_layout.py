"""Draw the Grafana dashboard's panel grid to a PNG (docs/dashboard-layout.png).

Each panel is a box at its gridPos (24 columns wide), labelled with its title and
type; rows are full-width bands. No Grafana needed: it reads the JSON only.

    .venv/bin/python scripts/render_dashboard_layout.py [DASHBOARD.json] [-o OUT.png]
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Patch

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "llmgrpc.json"
OUT = REPO / "docs" / "dashboard-layout.png"

COLUMNS = 24
INCH_PER_COLUMN = 0.6
INCH_PER_ROW = 0.3  # a grid row is ~30 px in Grafana, a column ~1/24 of ~1800 px
COLORS = {"timeseries": "#dbe9f6", "stat": "#e3f1df", "table": "#f6ecd8", "row": "#4a5568"}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels and those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def render(dashboard: dict[str, Any], out: Path) -> None:
    items = panels(dashboard)
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in items)
    fig = plt.figure(figsize=(COLUMNS * INCH_PER_COLUMN, height * INCH_PER_ROW + 0.8))
    ax = fig.add_axes((0.005, 0.005, 0.99, 1 - 0.8 / (height * INCH_PER_ROW + 0.8)))
    ax.set_xlim(0, COLUMNS)
    ax.set_ylim(height, 0)  # y grows downwards, as in Grafana
    ax.axis("off")
    ax.set_title(
        f"Grafana dashboard \u201c{dashboard['title']}\u201d: panel layout (24-column grid)",
        fontsize=13,
        loc="left",
    )
    kinds = ("timeseries", "stat", "table")
    ax.legend(
        handles=[Patch(facecolor=COLORS[k], edgecolor="#7a869a", label=k) for k in kinds],
        loc="lower right",
        bbox_to_anchor=(1, 1),
        ncols=3,
        frameon=False,
        fontsize=9,
    )
    for panel in items:
        draw(ax, panel)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def metrics(panel: dict[str, Any]) -> list[str]:
    """Metric families a panel queries, in order of first use."""
    names: list[str] = []
    for target in panel.get("targets", []):
        for series in re.findall(r"((?:vllm:|grpc_|llmgrpc_)[\w:]+)\{", target.get("expr", "")):
            name = re.sub(r"_(bucket|sum|count)$", "", series)
            if name not in names:
                names.append(name)
    # llmgrpc_model_info next to other metrics only scopes them to the selected models.
    return [n for n in names if n != "llmgrpc_model_info"] if len(names) > 1 else names


def draw(ax: Any, panel: dict[str, Any]) -> None:
    g = panel["gridPos"]
    x, y, w, h = g["x"], g["y"], g["w"], g["h"]
    kind = panel["type"]
    if kind == "row":
        ax.add_patch(
            FancyBboxPatch(
                (x, y + 0.1),
                w,
                h - 0.2,
                boxstyle="square,pad=0",
                facecolor=COLORS["row"],
                edgecolor="none",
            )
        )
        ax.text(
            x + 0.2,
            y + h / 2,
            panel["title"],
            va="center",
            ha="left",
            color="white",
            fontsize=10,
            fontweight="bold",
        )
        return
    pad = 0.08
    ax.add_patch(
        FancyBboxPatch(
            (x + pad, y + pad),
            w - 2 * pad,
            h - 2 * pad,
            boxstyle="round,pad=0,rounding_size=0.15",
            facecolor=COLORS.get(kind, "#eeeeee"),
            edgecolor="#7a869a",
            linewidth=0.8,
        )
    )
    title = "\n".join(
        textwrap.wrap(panel["title"], max(10, int(w * 4.5)), break_long_words=False)[:3]
    )
    ax.text(
        x + w / 2,
        y + min(1.4, h / 2 - 0.3),
        title,
        ha="center",
        va="center",
        fontsize=9.5,
        fontweight="bold",
        color="#1a202c",
    )
    if h >= 6:  # room for the metrics the panel reads
        names = metrics(panel)[:4]
        ax.text(
            x + w / 2,
            y + h / 2 + 0.6,
            "\n".join(names),
            ha="center",
            va="center",
            fontsize=7.5,
            color="#2d3748",
            family="monospace",
            linespacing=1.5,
        )
    n = len(panel.get("targets", []))
    ax.text(
        x + w / 2,
        y + h - 0.55,
        f"{kind} \u00b7 {n} quer{'y' if n == 1 else 'ies'}",
        ha="center",
        va="center",
        fontsize=7,
        color="#4a5568",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dashboard", nargs="?", type=Path, default=DASHBOARD)
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    args = parser.parse_args()
    render(json.loads(args.dashboard.read_text()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
