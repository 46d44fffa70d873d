"""The one place lightcook draws: markdown tables and report text, and the matplotlib figures.

The report callback (``report.md``, ``report_*.png``), ``lightcook.compare`` (``compare.md``, its
scatter plots), the MoE callback (expert-load heatmap) and the benchmark scripts (their section of
``docs/benchmarks.md``) render through these helpers. Numbers come in already measured (see
:mod:`lightcook.measure`); nothing here measures.

No pyplot (no global backend, no GUI): figures are built on ``matplotlib.figure.Figure`` and saved
through the Agg canvas, atomically; matplotlib is imported only when a figure is drawn.

Example:
    >>> print("\\n".join(table(["model", "ppl"], [["dense", num(27.123)], ["2:4", num(None)]], "lr")))
    | model | ppl |
    |---|---:|
    | dense | 27.12 |
    | 2:4 | n/a |
    >>> import tempfile
    >>> from pathlib import Path
    >>> fig = expert_load_figure([[3, 1], [2, 2]], ["0.mlp", "1.mlp"], "training tokens")
    >>> save_figure(fig, Path(tempfile.mkdtemp()) / "load.png").read_bytes()[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightcook.io import atomic_path, write_text_atomic

__all__ = [
    "EXPERT_PNG",
    "HISTORY_PNG",
    "LAYERS_PNG",
    "curves_figure",
    "expert_load_figure",
    "figure",
    "history_figure",
    "layers_figure",
    "machine_line",
    "mb",
    "num",
    "pct",
    "report_markdown",
    "save_figure",
    "scatter_figure",
    "short_name",
    "table",
    "write_report_plots",
    "write_section",
]

LAYERS_PNG, HISTORY_PNG, EXPERT_PNG = "report_layers.png", "report_history.png", "report_expert_load.png"
#: The models the report times, in its columns' order.
TIMED = ("compressed", "dense_fp32", "dense_bf16")
_NEW_DOC = "# Benchmarks\n\nNumbers pasted from runs of the scripts in experiments/bench/.\n"


# --------------------------------------------------------------------------- text


def num(value: Any, fmt: str = "{:.2f}", suffix: str = "") -> str:
    """``value`` formatted with ``fmt`` + ``suffix``, or ``n/a`` when it is ``None``.

    Example:
        >>> num(1.5, suffix=" x"), num(None), num(3, "{:,}")
        ('1.50 x', 'n/a', '3')
    """
    return "n/a" if value is None else fmt.format(value) + suffix


def mb(value: float | None) -> str:
    """Bytes as megabytes (10^6), three decimals: ``mb(1_234_567) == '1.235 MB'``; ``n/a`` for ``None``."""
    return "n/a" if value is None else f"{value / 1e6:.3f} MB"


def pct(value: float | None) -> float | None:
    """A fraction as a percentage (``None`` stays ``None``)."""
    return None if value is None else 100.0 * value


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """A markdown table as lines: the header, the rule, one line per row (cells as ``str``).

    Args:
        header: column titles.
        rows: cells, one sequence per row, as many as the header.
        align: one letter per column, ``l`` (left) or ``r`` (right); default all left.

    Raises:
        ValueError: a row or ``align`` whose length differs from the header, or a letter other than l/r.

    Example:
        >>> table(["a", "b"], [[1, 2]], "lr")
        ['| a | b |', '|---|---:|', '| 1 | 2 |']
    """
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"table: align {align!r} must be one of l/r per column ({len(header)} columns)")
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table: a row has {len(row)} cells for {len(header)} columns: {list(row)}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines


def machine_line(facts: Mapping[str, Any]) -> str:
    """One sentence of :func:`lightcook.measure.machine` facts, for a report or a benchmark section.

    Example:
        >>> facts = {"cpu": "Fake CPU", "isa": ["avx2"], "physical_cores": 2, "logical_cores": 4,
        ...          "torch_threads": 2, "load_average": [0.5, 0.4, 0.3], "cuda": None,
        ...          "torch": "2.13.0", "python": "3.11.2", "date": "2025-01-01T12:00"}
        >>> machine_line(facts)
        'Fake CPU (avx2), 2 physical / 4 logical cores, 2 torch threads, load average 0.50 / 0.40 / 0.30 (1 / 5 / 15 min), no GPU; torch 2.13.0, Python 3.11.2; 2025-01-01T12:00.'
    """
    isa = f" ({' '.join(facts['isa'])})" if facts.get("isa") else ""
    cores = f"{facts['physical_cores']} physical / " if facts.get("physical_cores") else ""
    load = facts.get("load_average")
    load_text = "load average n/a" if not load else "load average " + " / ".join(f"{v:.2f}" for v in load)
    gpu = f"GPU {facts['cuda']}" if facts.get("cuda") else "no GPU"
    return (
        f"{facts['cpu']}{isa}, {cores}{facts['logical_cores']} logical cores, {facts['torch_threads']} torch "
        f"threads, {load_text}{' (1 / 5 / 15 min)' if load else ''}, {gpu}; torch {facts['torch']}, "
        f"Python {facts['python']}; {facts['date']}."
    )


def write_section(path: str | os.PathLike, heading: str, text: str) -> None:
    """Replace the section of a markdown file that starts with the line ``heading`` (up to the next
    ``## `` heading) by ``text``, or append ``text`` when there is none; other sections stay. Atomic.

    Example:
        >>> import tempfile
        >>> doc = Path(tempfile.mkdtemp()) / "bench.md"
        >>> write_section(doc, "## A", "## A\\n\\none\\n")
        >>> write_section(doc, "## B", "## B\\n\\ntwo\\n")
        >>> write_section(doc, "## A", "## A\\n\\nthree\\n")
        >>> doc.read_text().count("##"), "one" in doc.read_text(), "three" in doc.read_text()
        (2, False, True)
    """
    path = Path(path)
    old = path.read_text() if path.is_file() else _NEW_DOC
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + ("" if end < 0 else "\n" + old[end + 1 :])
    write_text_atomic(path, new.rstrip("\n") + "\n")


# --------------------------------------------------------------------------- report.md


def report_markdown(report: Mapping[str, Any]) -> str:
    """``report.md`` of a :class:`~lightcook.callbacks.report.CompressionReport` ``report.json``:
    the headline numbers, the validation history, the callbacks, the plots."""
    size, ppl = report["bytes"], report["ppl"]
    lines = [
        "# Compression report",
        "",
        f"Run `{report['run_dir']}` at step {report['step']} ({report['model']}). "
        f"Techniques stored: {', '.join(report['techniques']) or 'none'}; "
        f"callbacks: {', '.join(report['callbacks'])}.",
        *([f"Measured on: {machine_line(report['machine'])}"] if report.get("machine") else []),
        "",
        *table(
            ["quantity", "value"],
            [
                ["export folder", f"`{report['export_dir'] or 'none'}`"],
                ["size on disk, measured (folder)", mb(size["measured"])],
                ["size, estimated during training (tensor payload)", mb(size["estimated"])],
                ["tensor payload, measured", mb(size["tensors_measured"])],
                ["dense float32 parameters", mb(size["dense_fp32"])],
                ["compression ratio vs float32", num(size["compression_ratio"], suffix=" x")],
                [
                    "bits per weight (block Linears, scales and positions included)",
                    num(report["bits_per_weight"]),
                ],
                ["sparsity (block Linears: masked or removed)", num(pct(report["sparsity"]), "{:.1f}", " %")],
                ["FFN parameters used per token", num(pct(report["ffn_fraction"]), "{:.1f}", " %")],
                ["perplexity, live model, last validation", num(ppl["val"])],
                [
                    f"perplexity on {ppl['eval_batches']} val batches ({ppl['eval_tokens']} tokens): live / export",
                    f"{num(ppl['live'])} / {num(ppl['export'])}",
                ],
                *_speed_rows(report["speed"]),
            ],
        ),
    ]
    notes = [n for n in (report.get("export_error"), ppl.get("note"), *_speed_notes(report["speed"])) if n]
    lines += ["", *[f"Note: {n}" for n in notes]] if notes else []
    lines += ["", "## Validation history", "", *_history_table(report["history"])]
    lines += ["", "## Callbacks", ""]
    lines += [
        f"- `{key}` ({entry['class']}): state `{entry['state']}`"
        for key, entry in report["callbacks"].items()
    ]
    if report["plots"]:
        lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in report["plots"]]]
    return "\n".join(lines) + "\n"


def _speed_rows(speed: Mapping[str, Any]) -> list[list[str]]:
    """Forward (prefill), batch-1 decode and time-to-first-token rows of the speed section."""
    seconds = speed.get("seconds", {})
    shape = "not measured"
    if speed.get("measured"):
        shape = f"{speed['batch'][0]}x{speed['tokens']} tokens, {speed['threads']} threads, {speed['device']}"
    rows = [
        [
            f"forward, {shape}: export / dense fp32 / dense bf16",
            " / ".join(num(_ms(seconds.get(k)), "{:.2f}", " ms") for k in TIMED),
        ],
        [
            "forward speedup vs dense fp32 / bf16",
            f"{num(speed.get('speedup_vs_fp32'), suffix=' x')} / {num(speed.get('speedup_vs_bf16'), suffix=' x')}",
        ],
    ]
    decode = speed.get("decode") or {}
    if decode.get("measured"):
        rates = decode["tokens_per_second"]
        rows += [
            [
                f"decode, batch 1, {decode['new_tokens']} new tokens after {decode['prompt_tokens']}: "
                "export / dense fp32 / dense bf16",
                " / ".join(num(rates.get(k), "{:.1f}", " tokens/s") for k in TIMED),
            ],
            [
                "decode speedup vs dense fp32 / bf16",
                f"{num(decode.get('speedup_vs_fp32'), suffix=' x')} / "
                f"{num(decode.get('speedup_vs_bf16'), suffix=' x')}",
            ],
        ]
    if decode.get("ttft_seconds"):
        first = decode["ttft_seconds"]
        rows.append(
            [
                f"time to first token, batch 1, {decode['prompt_tokens']} prompt tokens: "
                "export / dense fp32 / dense bf16",
                " / ".join(num(_ms(first.get(k)), "{:.2f}", " ms") for k in TIMED),
            ]
        )
    return rows


def _speed_notes(speed: Mapping[str, Any]) -> list[str | None]:
    decode = speed.get("decode") or {}
    return [speed.get("note"), decode.get("note") and f"decode: {decode['note']}"]


def _history_table(history: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [
        [
            row["step"],
            num(row["val_ppl"]),
            mb(row["bytes_estimated"]),
            num(row["bits_per_weight"]),
            num(pct(row["sparsity"]), "{:.1f}", " %"),
            num(pct(row["ffn_fraction"]), "{:.1f}", " %"),
        ]
        for row in history
    ]
    return table(["step", "val ppl", "est. size", "bits/weight", "sparsity", "FFN used"], rows, "rrrrrr")


def _ms(value: float | None) -> float | None:
    return None if value is None else 1000.0 * value


# --------------------------------------------------------------------------- figures


def figure(width: float, height: float, rows: int = 1) -> tuple[Any, Any]:
    """A constrained-layout figure of ``width`` x ``height`` inches and its ``rows`` stacked axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically (rendered with the Agg canvas); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def short_name(name: str) -> str:
    """A compact label for a layer name: block index + the rest, abbreviated.

    Example:
        >>> short_name("model.layers.12.self_attn.q_proj"), short_name("transformer.h.0.mlp.c_fc")
        ('12.attn.q', '0.mlp.c_fc')
    """
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if idx is None:
        return name
    head = f"{parts[0][:3]}." if parts[0] in ("encoder", "decoder") else ""
    tail = [_ABBREV.get(p, p.removesuffix("_proj")) for p in parts[idx + 1 :]]
    return head + ".".join([parts[idx], *tail])


_ABBREV = {
    "self_attn": "attn",
    "attention": "attn",
    "SelfAttention": "attn",
    "EncDecAttention": "xattn",
    "DenseReluDense": "ffn",
    "layer": "l",
}


def expert_load_figure(tokens: Sequence[Sequence[float]], layers: Sequence[str], source: str) -> Any:
    """Heatmap of expert load, FFN layers x experts, each cell = tokens / the layer's mean (1 = balanced).

    Args:
        tokens: tokens routed to each expert, one row per layer (rows of equal length).
        layers: the layers' module names (shortened for the axis with :func:`short_name`).
        source: what was counted, for the title (e.g. ``"training tokens"``).

    Raises:
        ValueError: no rows, rows of unequal length, or a name count that differs from the rows.
    """
    if not tokens or not len(tokens[0]) or any(len(row) != len(tokens[0]) for row in tokens):
        raise ValueError("expert_load_figure: tokens must be non-empty rows of equal length")
    if len(layers) != len(tokens):
        raise ValueError(f"expert_load_figure: {len(layers)} layer names for {len(tokens)} rows")
    load = torch.tensor(tokens, dtype=torch.float64)
    shares = load / load.mean(1, keepdim=True).clamp_min(1e-12)
    names = [short_name(name) for name in layers]
    fig, (ax,) = figure(max(6.0, 0.25 * load.shape[1] + 3.0), max(3.0, 0.3 * len(names) + 1.5))
    image = ax.imshow(shares.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="expert", ylabel="FFN layer", title=f"Expert load ({source}); 1 = balanced")
    fig.colorbar(image, ax=ax, label="tokens / layer mean")
    return fig


def layers_figure(report: Mapping[str, Any]) -> Any:
    """Per-layer sparsity and stored bits per weight of a report (two bar charts)."""
    layers = report["layers"]
    fig, (top, bottom) = figure(max(8.0, 0.22 * len(layers) + 2.0), 7.0, rows=2)
    x = range(len(layers))
    top.bar(x, [100 * (layer["sparsity"] or 0) for layer in layers], color="tab:red")
    top.set(ylabel="sparsity (%)", ylim=(0, 100), title="Weights masked or removed, per layer")
    bits = [layer["bits_per_weight"] or 0 for layer in layers]
    bottom.bar(x, bits, color="tab:blue")
    bottom.axhline(32, color="grey", linestyle="--", linewidth=0.8, label="float32")
    bottom.set_ylim(0, max(34.0, *(1.05 * b for b in bits)))
    bottom.set(
        ylabel="stored bits per weight",
        title="Storage bits per dense weight (scales, N:M positions included)",
    )
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.set_xticks(list(x), [short_name(layer["name"]) for layer in layers], rotation=90, fontsize=7)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    bottom.set_xlabel("layer (block index . module)")
    fig.suptitle(f"{report['model']}: {', '.join(report['compress'])}")
    return fig


def history_figure(report: Mapping[str, Any]) -> Any:
    """Validation perplexity (and the export's, as a star) and the estimated size over the steps."""
    from matplotlib.ticker import MaxNLocator

    rows = report["history"]
    fig, (top, bottom) = figure(8.0, 6.0, rows=2)
    ppl = [(row["step"], row["val_ppl"]) for row in rows if row["val_ppl"] is not None]
    top.plot([s for s, _ in ppl], [p for _, p in ppl], marker="o", color="tab:purple", label="live model")
    export_ppl = report["ppl"].get("export")
    if export_ppl is not None:
        label = f"export ({report['ppl']['eval_batches']} val batches)"
        top.scatter(
            [report["step"]], [export_ppl], marker="*", s=150, color="tab:orange", label=label, zorder=3
        )
    top.set(ylabel="validation perplexity", title="Perplexity during training")
    top.legend(loc="best")
    bottom.plot(
        [row["step"] for row in rows],
        [row["bytes_estimated"] / 1e6 for row in rows],
        marker="o",
        color="tab:green",
    )
    bottom.set(xlabel="optimizer step", ylabel="estimated size (MB)", title="Estimated export size")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def write_report_plots(run_dir: str | os.PathLike, report: Mapping[str, Any]) -> list[str]:
    """Draw the report's figures that have data into ``run_dir``; returns the file names written."""
    run_dir, written = Path(run_dir), []
    if report["layers"]:
        save_figure(layers_figure(report), run_dir / LAYERS_PNG)
        written.append(LAYERS_PNG)
    if report["history"]:
        save_figure(history_figure(report), run_dir / HISTORY_PNG)
        written.append(HISTORY_PNG)
    load = report.get("expert_load")
    if load:
        save_figure(expert_load_figure(load["tokens"], load["layers"], load["source"]), run_dir / EXPERT_PNG)
        written.append(EXPERT_PNG)
    return written


def scatter_figure(
    points: Sequence[tuple[float, float, str]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
    vline: tuple[float, str] | None = None,
) -> Any:
    """Labelled points ``(x, y, label)``; ``vline``: a dashed reference line ``(x, legend label)``.
    Without points the axes say so."""
    fig, (ax,) = figure(8.0, 5.5)
    for x, y, label in points:
        ax.scatter([x], [y], s=40, color="tab:blue", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if log_x and points:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:g}"))
    if vline is not None:
        ax.axvline(vline[0], color="grey", linestyle="--", linewidth=0.8, label=vline[1])
        ax.legend(loc="best")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    if not points:
        ax.text(0.5, 0.5, "no run measured this", ha="center", va="center", transform=ax.transAxes)
    return fig


def curves_figure(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    hline: tuple[float, str] | None = None,
    size: tuple[float, float] = (5.0, 3.2),
) -> Any:
    """One line with markers per curve (legend label -> ``(x, y)`` points), y from 0; ``hline``: a
    dashed reference ``(y, legend label)``.

    Example:
        >>> fig = curves_figure({"a": [(0, 3.0), (1, 2.0)]}, xlabel="step", ylabel="ppl", title="t")
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['a']
    """
    fig, (ax,) = figure(*size)
    for label, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[0], color="gray", linestyle="--", label=hline[1])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0)
    ax.legend()
    return fig
