"""Matplotlib figures shared by the compression report and the MoE callback.

No pyplot (no global backend, no GUI): figures are built on ``matplotlib.figure.Figure`` and saved
through the Agg canvas, atomically.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> fig = expert_load_figure([[3, 1], [2, 2]], ["0.mlp", "1.mlp"], "training tokens")
    >>> save_figure(fig, Path(tempfile.mkdtemp()) / "load.png").read_bytes()[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightcook.io import atomic_path

__all__ = ["expert_load_figure", "figure", "save_figure", "short_name"]


def figure(width: float, height: float, rows: int = 1) -> tuple[Any, Any]:
    """A constrained-layout figure of ``width`` x ``height`` inches and its ``rows`` stacked axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (rendered with the Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


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
