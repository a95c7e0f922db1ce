"""``leanfm report``: turn result JSON files into a markdown table and PNG plots.

Accepts any JSON written by leanfm (an object, or a list of objects, e.g. a benchmark's rows). Rows are
shown with the columns they share; the plot is perplexity against parameter count, the trade-off every
compression method is judged on.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_write_bytes, atomic_write_text

COLUMNS = (
    "model", "method", "ratio", "params", "perplexity", "cloze_accuracy", "prefill_tokens_per_s",
    "decode_tokens_per_s", "peak_rss_mb", "seconds",
)


def load_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Read result rows from JSON files (objects or lists of objects); one-line errors on bad files."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        if not path.is_file():
            raise LeanfmError(f"results file '{path}' does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LeanfmError(f"results file '{path}' is not valid JSON ({err.__class__.__name__})") from None
        items = data if isinstance(data, list) else [data]
        if not all(isinstance(item, dict) for item in items):
            raise LeanfmError(f"results file '{path}' must hold a JSON object or a list of objects")
        rows.extend({"source": path.name, **item} for item in items)
    return rows


def format_cell(value: Any) -> str:
    """A table cell (markdown here, the terminal in the CLI): 4 significant digits below 1000, thousands separators
    above, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` over the known columns any row has."""
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def figure_png(fig: Any, dpi: int | None = None) -> bytes:
    """A matplotlib figure laid out tightly, as PNG bytes (for an atomic write), and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def plot_perplexity_vs_params(rows: list[dict[str, Any]]) -> bytes | None:
    """PNG bytes of perplexity against parameter count (None when no row has both)."""
    points = [r for r in rows if isinstance(r.get("params"), int) and isinstance(r.get("perplexity"), float)]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for row in points:
        label = str(row.get("method") or row.get("model"))
        ax.scatter(row["params"] / 1e6, row["perplexity"], label=label)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    return figure_png(fig)


def write_report(paths: list[Path], out: Path) -> Path:
    """Write ``out/REPORT.md`` (and ``out/perplexity_vs_params.png``); returns the markdown path."""
    rows = load_results(paths)
    if out.exists() and not out.is_dir():
        raise LeanfmError(f"report folder '{out}' exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# leanfm report", "", markdown_table(rows), ""]
    png = plot_perplexity_vs_params(rows)
    if png is not None:
        atomic_write_bytes(out / "perplexity_vs_params.png", png)
        parts += ["![perplexity vs parameters](perplexity_vs_params.png)", ""]
    report = out / "REPORT.md"
    atomic_write_text(report, "\n".join(parts))
    return report


def write_section(markdown_file: Path, name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->`` atomically.

    Each benchmark owns one section of BENCHMARKS.md, so re-running one never disturbs the others.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = markdown_file.read_text(encoding="utf-8") if markdown_file.is_file() else "# leanfm benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(markdown_file, text)
