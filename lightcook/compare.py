"""Put compressed runs side by side: ``python -m lightcook.compare DIR [DIR ...] [--out OUT]``.

Every run directory under the given folders (any folder holding a ``report.json`` written by
:class:`~lightcook.callbacks.report.CompressionReport`, e.g. ``outputs/multiruns/<id>/<n>/``) becomes
one row of ``OUT/compare.md`` (run, techniques, perplexity of the export, bytes on disk, ratio to
the dense float32 model, forward and batch-1 decode speedup over dense bfloat16) and one point of
``compare_ppl_vs_bytes.png`` and ``compare_ppl_vs_speed.png``. The table and plots are drawn by
:mod:`lightcook.render`. ``OUT`` defaults to the first ``DIR``. A run's ``summary.json``
(written by the app) fills in what its report lacks.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> for n, (ppl, size) in enumerate([(30.0, 2e6), (34.0, 1e6)]):
    ...     run = root / "sweep" / str(n)
    ...     run.mkdir(parents=True)
    ...     report = {"compress": ["quant"] if n else ["quant", "prune"], "ppl": {"export": ppl},
    ...               "bytes": {"measured": size, "dense_fp32": 4e6}, "speed": {"speedup_vs_bf16": 1.5}}
    ...     _ = (run / "report.json").write_text(json.dumps(report))
    >>> main([str(root), "--quiet"])
    0
    >>> [line.split(" | ")[:2] for line in (root / "compare.md").read_text().splitlines()[4:6]]
    [['| sweep/0', 'quant+prune'], ['| sweep/1', 'quant']]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightcook.io import write_text_atomic
from lightcook.render import num, save_figure, scatter_figure, table

__all__ = ["Run", "find_runs", "load_run", "main", "write_comparison"]

REPORT, SUMMARY = "report.json", "summary.json"
COMPARE_MD, PPL_VS_BYTES, PPL_VS_SPEED = "compare.md", "compare_ppl_vs_bytes.png", "compare_ppl_vs_speed.png"


@dataclass(frozen=True)
class Run:
    """One run's headline numbers (``None`` where the run did not measure them).

    Attributes:
        name: path relative to the folder it was found under.
        techniques: the compression callbacks (``quant+prune``), else the stored techniques.
        ppl: perplexity of the export (else of the live model at the last validation).
        ppl_source: ``export``, ``live`` or ``summary`` (which of those ``ppl`` is).
        bytes: bytes on disk of the export (else the estimate).
        ratio_vs_fp32: dense float32 parameter bytes / ``bytes``.
        speedup_vs_bf16, speedup_vs_fp32: forward speedup over the dense model.
        decode_speedup_vs_bf16: batch-1 decode (tokens/s) speedup over the dense bfloat16 model.
    """

    name: str
    techniques: str
    ppl: float | None
    ppl_source: str | None
    bytes: int | None
    ratio_vs_fp32: float | None
    speedup_vs_bf16: float | None
    speedup_vs_fp32: float | None
    decode_speedup_vs_bf16: float | None = None


def find_runs(dirs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """``(run directory, folder it was found under)`` for every ``report.json`` under ``dirs``, sorted.

    Raises:
        SystemExit: a folder does not exist, or none holds a ``report.json`` (the message names them).
    """
    found: dict[Path, Path] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise SystemExit(f"lightcook.compare: {d} is not a directory")
        for report in sorted(d.rglob(REPORT)):
            if not any(part.startswith(".") for part in report.relative_to(d).parts):  # atomic temp dirs
                found.setdefault(report.parent.resolve(), d.resolve())
    if not found:
        names = ", ".join(str(d) for d in dirs)
        raise SystemExit(
            f"lightcook.compare: no {REPORT} found under {names} (run with +compress=[...] first)"
        )
    return sorted(found.items(), key=lambda item: _natural(str(item[0])))


def _natural(text: str) -> list[Any]:
    """Sort key that orders ``run/2`` before ``run/10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def load_run(run_dir: str | Path, root: str | Path | None = None) -> Run:
    """Read ``report.json`` (and ``summary.json`` if present) of ``run_dir``."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / REPORT).read_text())
    summary = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() else {}
    name = str(run_dir.relative_to(root)) if root is not None and run_dir != Path(root) else run_dir.name
    techniques = report.get("compress") or summary.get("compress") or report.get("techniques") or ["dense"]
    ppl, source = _get(report, "ppl", "export"), "export"
    if ppl is None:
        ppl, source = _get(report, "ppl", "val"), "live"
    if ppl is None:
        ppl, source = summary.get("val_ppl_after"), "summary"
    size = _get(report, "bytes", "measured") or _get(report, "bytes", "estimated")
    dense = _get(report, "bytes", "dense_fp32")
    return Run(
        name=name,
        techniques="+".join(techniques),
        ppl=ppl,
        ppl_source=source if ppl is not None else None,
        bytes=None if size is None else int(size),
        ratio_vs_fp32=round(dense / size, 3) if dense and size else None,
        speedup_vs_bf16=_get(report, "speed", "speedup_vs_bf16"),
        speedup_vs_fp32=_get(report, "speed", "speedup_vs_fp32"),
        decode_speedup_vs_bf16=_get(report, "speed", "decode", "speedup_vs_bf16"),
    )


def render_markdown(runs: Sequence[Run]) -> str:
    """``compare.md``: one table row per run."""
    header = ["run", "techniques", "ppl (export)", "size on disk", "x smaller than fp32", "speedup vs bf16"]
    rows = [
        [
            run.name,
            run.techniques,
            num(run.ppl) + ("" if run.ppl_source in (None, "export") else f" ({run.ppl_source})"),
            num(run.bytes and run.bytes / 1e6, "{:.3f}", " MB"),
            num(run.ratio_vs_fp32, suffix=" x"),
            num(run.speedup_vs_bf16, suffix=" x"),
            num(run.decode_speedup_vs_bf16, suffix=" x"),
        ]
        for run in runs
    ]
    lines = ["# Compressed runs compared", "", *table([*header, "decode vs bf16"], rows, "llrrrrr")]
    lines += ["", f"![perplexity vs size]({PPL_VS_BYTES})", f"![perplexity vs speed]({PPL_VS_SPEED})"]
    return "\n".join(lines) + "\n"


def _scatter(runs: Sequence[Run], x_of: str, path: Path, *, log_x: bool, xlabel: str, title: str) -> Path:
    scale = 1e6 if x_of == "bytes" else 1.0
    points = [
        (getattr(r, x_of) / scale, r.ppl, f"{r.techniques} [{r.name.rsplit('/', 1)[-1]}]")
        for r in runs
        if getattr(r, x_of) and r.ppl is not None
    ]
    skipped = len(runs) - len(points)
    note = f" ({skipped} run{'s' * (skipped != 1)} without data left out)" if skipped else ""
    fig = scatter_figure(
        points,
        xlabel=xlabel,
        ylabel="perplexity (lower is better)",
        title=title + note,
        log_x=log_x,
        vline=(1.0, "dense bf16") if x_of == "speedup_vs_bf16" else None,
    )
    return save_figure(fig, path)


def write_comparison(runs: Sequence[Run], out: str | Path) -> list[Path]:
    """Write ``compare.md`` and the two scatter plots into ``out``; return their paths."""
    out = Path(out)
    write_text_atomic(out / COMPARE_MD, render_markdown(runs))
    by_size = _scatter(
        runs,
        "bytes",
        out / PPL_VS_BYTES,
        log_x=True,
        xlabel="export size on disk (MB, log scale)",
        title="Perplexity vs size",
    )
    by_speed = _scatter(
        runs,
        "speedup_vs_bf16",
        out / PPL_VS_SPEED,
        log_x=False,
        xlabel="forward speedup over the dense bf16 model (x)",
        title="Perplexity vs speed",
    )
    return [out / COMPARE_MD, by_size, by_speed]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status.

    Raises:
        SystemExit: a folder is missing, or no ``report.json`` was found.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightcook.compare", description="Compare compressed runs (their report.json)."
    )
    parser.add_argument(
        "dirs", nargs="+", help="run directories or folders holding them (searched recursively)"
    )
    parser.add_argument("--out", help="where compare.md and the plots go (default: the first DIR)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)
    runs = [load_run(run_dir, root) for run_dir, root in find_runs(args.dirs)]
    written = write_comparison(runs, args.out or args.dirs[0])
    if not args.quiet:
        print(written[0].read_text(), end="")
        print(f"[lightcook] wrote {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
