"""`moecompress report`: compare run records in Markdown + HTML with plots.

Recovery % = compressed score / base score for scores where higher is better (accuracy), and
base / compressed for perplexity, so 100 % always means "as good as the base model".
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

from .evaluation.records import RunRecord


@dataclass(frozen=True)
class Metric:
    key: str  # "ppl:test", "lm_eval:moe_wiki_mc", "vlqa:eval"
    value: float
    higher_is_better: bool

    @property
    def label(self) -> str:
        kind, _, name = self.key.partition(":")
        return {"ppl": f"{name} ppl", "lm_eval": f"{name} acc", "vlqa": f"{name} VQA acc"}.get(kind, self.key)


def metrics(record: RunRecord) -> dict[str, Metric]:
    ev = record.evaluations
    found = {}
    for data, r in ev.get("ppl", {}).items():
        found[f"ppl:{data}"] = Metric(f"ppl:{data}", r["ppl"], False)
    for task, r in ev.get("lm_eval", {}).items():
        if "acc" in r:
            found[f"lm_eval:{task}"] = Metric(f"lm_eval:{task}", r["acc"], True)
    for data, r in ev.get("vlqa", {}).items():
        found[f"vlqa:{data}"] = Metric(f"vlqa:{data}", r["accuracy"], True)
    return found


def recovery(base: Metric, value: Metric) -> float:
    """Percent of the base score kept (100 = no loss)."""
    ratio = value.value / base.value if base.higher_is_better else base.value / value.value
    return 100.0 * ratio


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (size, loss) points no other point beats on both, sorted by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(records: list[RunRecord], path: Path) -> bool:
    """Perplexity vs checkpoint size, one panel per evaluation text; the Pareto front joined."""
    datasets = sorted({k for r in records for k in metrics(r) if k.startswith("ppl:")})
    sized = [r for r in records if r.size_bytes()]
    if not datasets or not sized:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.8), squeeze=False)
    for ax, key in zip(axes[0], datasets):
        runs = [r for r in sized if key in metrics(r)]
        points = [(r.size_bytes() / 1e6, metrics(r)[key].value) for r in runs]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=3)
        for r, (x, y) in zip(runs, points):
            ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(points)
        ax.plot(
            [points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:orange", label="Pareto front"
        )
        ax.set_xlabel("checkpoint size (MB)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(key.split(":", 1)[1], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_heatmap(
    grid: dict,
    title: str,
    colorbar: str,
    path: Path,
    cmap: str,
    value_range: tuple[float, float] | None = None,
    annotate: bool = False,
) -> None:
    """Layer x expert heatmap; `value_range` shares one colour scale between runs, `annotate` prints each value."""
    plt = _plt()
    values = grid["values"]
    fig, ax = plt.subplots(figsize=(1.8 + 0.38 * len(values[0]), 1.4 + 0.42 * len(values)))
    vmin, vmax = value_range or (None, None)
    image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    if annotate:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7, color="grey")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(len(values[0])))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yticks(range(len(grid["layers"])), [str(layer) for layer in grid["layers"]])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label=colorbar)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recovery(records: list[RunRecord], base: RunRecord, path: Path) -> bool:
    base_metrics = metrics(base)
    runs = [r for r in records if r is not base]
    keys = [k for k in base_metrics if any(k in metrics(r) for r in runs)]
    if not keys or not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(keys) * max(len(runs), 1) ** 0.5, 3.6))
    width = 0.8 / len(runs)
    for j, r in enumerate(runs):
        m = metrics(r)
        ax.bar(
            [i + j * width for i in range(len(keys))],
            [recovery(base_metrics[k], m[k]) if k in m else 0 for k in keys],
            width,
            label=r.name,
        )
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_xticks(
        [i + width * (len(runs) - 1) / 2 for i in range(len(keys))],
        [base_metrics[k].label for k in keys],
        rotation=20,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel(f"recovery % of {base.name}")
    lows = [recovery(base_metrics[k], metrics(r)[k]) for r in runs for k in keys if k in metrics(r)]
    ax.set_ylim(max(0, min(lows) - 5), max(101, max(lows) + 2))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def comparison_table(records: list[RunRecord], base: RunRecord | None) -> tuple[list[str], list[list[str]]]:
    keys = list(dict.fromkeys(k for r in records for k in metrics(r)))
    labels = {k: m.label for r in records for k, m in metrics(r).items()}
    header = ["run", "method", "expert bits/param", "checkpoint MB", *[labels[k] for k in keys]]
    base_metrics = metrics(base) if base else {}
    if base:
        header.append("mean recovery %")
    rows = []
    for r in records:
        m = metrics(r)
        cells = [
            r.name,
            r.method,
            _fmt(r.expert_bits_per_param),
            _fmt(r.size_bytes() / 1e6 if r.size_bytes() else None),
        ]
        recoveries = []
        for k in keys:
            if k not in m:
                cells.append("")
                continue
            text = _fmt(m[k].value, 2 if k.startswith("ppl") else 4)
            if k in base_metrics and r is not base:
                recoveries.append(recovery(base_metrics[k], m[k]))
                text += f" ({recoveries[-1]:.1f} %)"
            cells.append(text)
        if base:
            cells.append("100.0" if r is base else _fmt(sum(recoveries) / len(recoveries), 1) if recoveries else "")
        rows.append(cells)
    return header, rows


def efficiency_table(records: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    header = [
        "run",
        "checkpoint MB",
        "bits/param (all)",
        "expert bits/param",
        "active params/token (M)",
        "expert activation ratio",
        "load s",
        "prefill tok/s",
        "decode tok/s",
    ]
    rows = []
    for r in records:
        e = r.evaluations.get("efficiency")
        if e:
            rows.append(
                [
                    r.name,
                    _fmt(e["checkpoint_bytes"] / 1e6),
                    _fmt(e["bits_per_param"]),
                    _fmt(e["expert_bits_per_param"]),
                    _fmt(e["active_params_per_token"] / 1e6, 3),
                    _fmt(e["expert_activation_ratio"], 3),
                    _fmt(e["load_seconds"]),
                    _fmt(e["prefill_tokens_per_s"], 0),
                    _fmt(e["decode_tokens_per_s"], 1),
                ]
            )
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%;margin:0.5em 0}"
    "figure{margin:1em 0}figcaption{font-size:13px;color:#555}"
)


def write_report(
    records: list[RunRecord], output: str | Path, base: RunRecord | None = None, title: str = "moecompress report"
) -> dict[str, Path]:
    """report.md, report.html (images embedded) and the PNGs in `output`; returns the paths written."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if base is not None and all(r.name != base.name for r in records):
        records = [base, *records]
    figures: list[tuple[str, Path]] = []
    if plot_pareto(records, output / "pareto.png"):
        figures.append(
            ("Perplexity vs checkpoint size; the dashed line joins the Pareto-optimal runs.", output / "pareto.png")
        )
    if base is not None and plot_recovery(records, base, output / "recovery.png"):
        figures.append((f"Recovery % of {base.name} per metric (100 % = no loss).", output / "recovery.png"))
    all_bits = [v for r in records if r.bit_allocation for row in r.bit_allocation["values"] for v in row]
    bit_range = (min(all_bits), max(all_bits) + 1e-6) if all_bits else None
    for r in records:
        if r.bit_allocation:
            path = output / f"bits_{_slug(r.name)}.png"
            plot_heatmap(
                r.bit_allocation, f"{r.name}: code bits per expert", "bits", path, "magma", bit_range, annotate=True
            )
            figures.append((f"{r.name}: bit allocation per expert (mean over gate/up/down).", path))
        if r.importance:
            path = output / f"importance_{_slug(r.name)}.png"
            plot_heatmap(r.importance, f"{r.name}: routing share per expert", "share of routings", path, "viridis")
            figures.append((f"{r.name}: expert importance, {r.importance.get('metric', 'routing share')}.", path))

    quality, efficiency = comparison_table(records, base), efficiency_table(records)
    note = (
        f"Recovery % in parentheses is relative to **{base.name}** (higher-is-better scores: compressed/base; "
        "perplexity: base/compressed)."
        if base
        else ""
    )
    md = [f"# {title}", "", "## Quality", "", markdown_table(*quality), "", note, ""]
    if efficiency[1]:
        md += [
            "## Efficiency",
            "",
            markdown_table(*efficiency),
            "",
            "Throughput is measured on the device each run was evaluated on (see the run records).",
            "",
        ]
    md += ["## Figures", ""] + [f"![{caption}]({path.name})\n\n{caption}\n" for caption, path in figures]
    md += ["## Runs", ""] + [
        f"- **{r.name}**: `{r.model}`" + (f" (from `{r.base_model}`, recipe `{r.recipe}`)" if r.base_model else "")
        for r in records
    ]
    (output / "report.md").write_text("\n".join(md) + "\n")

    images = "".join(
        f'<figure><img alt="{html.escape(c)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(c)}</figcaption></figure>"
        for c, p in figures
    )
    body = (
        f"<h1>{html.escape(title)}</h1><h2>Quality</h2>{_html_table(*quality)}<p>{html.escape(note.replace('**', ''))}</p>"
        + (f"<h2>Efficiency</h2>{_html_table(*efficiency)}" if efficiency[1] else "")
        + f"<h2>Figures</h2>{images}"
    )
    (output / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )
    return {"markdown": output / "report.md", "html": output / "report.html", **{p.stem: p for _, p in figures}}
