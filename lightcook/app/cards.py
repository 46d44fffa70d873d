"""The model cards of a finished run: every folder it exported gets a ``README.md`` with the run's
measured numbers (:mod:`lightcook.export.card`), the exact command, and how to open it.

The export writers put a card without measurements into each folder they write; at the end of a
run the app rewrites those cards with what the report measured: the folder's held-out perplexity
(the lightcook folder through ``load_compressed``, the ecosystem folders as transformers loads
them) next to the trained network's on the same tokens, its bytes next to the dense fp32 model's,
and the speed the report timed (for the lightcook folder, whose kernels it timed).

Example:
    >>> write_run_cards({"run_dir": "/nonexistent"}, command=None)
    []
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightcook.export import read_manifest
from lightcook.export.card import export_facts, write_model_card
from lightcook.export.format import MANIFEST
from lightcook.io import model_bytes

__all__ = ["run_command", "write_run_cards"]


def run_command() -> str | None:
    """The command line of this Hydra run (``python run.py <overrides>``), or ``None`` outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    overrides = list(HydraConfig.get().overrides.task)
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "run.py"
    return shlex.join(["python", script, *overrides])


def _measured_on(report: Mapping[str, Any]) -> str | None:
    facts = report.get("machine") or {}
    if not facts:
        return None
    device = facts.get("cuda") or facts.get("cpu")
    load = facts.get("load_average")
    return f"{device}, {facts.get('torch_threads')} torch threads, {facts.get('date')}" + (
        f", load average {load[0]:.2f}" if load else ""
    )


def write_run_cards(summary: Mapping[str, Any], command: str | None) -> list[Path]:
    """Rewrite the cards of the run's export folders with its measured numbers; the cards written.

    Args:
        summary: the run's ``summary.json`` content (``run_dir``, ``model_format``, the before/after
            validation perplexities); its ``report.json`` is read from the run directory.
        command: the exact command of the run, or ``None``.
    """
    run = Path(summary["run_dir"])
    export = run / "compressed"
    manifest = read_manifest(export) if (export / MANIFEST).is_file() else None
    report_file = run / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    ppl = report.get("ppl") or {}
    tokens = ppl.get("eval_tokens")
    common: dict[str, Any] = {"command": command, "measured": _measured_on(report)}
    if ppl.get("live"):
        common["reference_ppl"] = ppl["live"]
        common["reference"] = f"the trained network before export, the same {tokens} held-out tokens"
    dense = (report.get("bytes") or {}).get("dense_fp32")
    if dense:
        common["dense_bytes"] = int(dense)
    before, after = summary.get("val_ppl_before"), summary.get("val_ppl_after")
    notes = []
    if before and after:
        notes.append(
            f"Validation perplexity over the whole validation split: {before:.2f} before compression "
            f"(the dense start model), {after:.2f} after training (the trained lightcook network)"
        )
    common["notes"] = tuple(notes)
    folders: dict[str, tuple[str, Path, float | None, dict[str, float]]] = {}
    if manifest is not None:
        folders["compressed"] = ("lightcook", export, ppl.get("export"), _speed(report.get("speed") or {}))
    for fmt, entry in (report.get("formats") or {}).items():
        if entry.get("path"):
            folders[fmt] = (fmt, Path(entry["path"]), entry.get("ppl"), {})
    model_format = summary.get("model_format")
    if model_format in ("compressed-tensors", "transformers") and (run / "model").is_dir():
        measured = (report.get("formats") or {}).get("compressed-tensors", {}).get("ppl")
        folders["model"] = (
            model_format,
            run / "model",
            measured if model_format != "transformers" else None,
            {},
        )
    written = []
    for fmt, folder, folder_ppl, speed in folders.values():
        facts = export_facts(fmt, manifest, ppl=folder_ppl, bytes=model_bytes(folder), speed=speed, **common)
        written.append(write_model_card(folder, facts))
    return written


def _speed(speed: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    if speed.get("speedup_vs_bf16"):
        batch, tokens = speed.get("batch", [None, None])[0], speed.get("tokens")
        out[f"prefill speed vs dense bf16 ({batch} x {tokens} tokens)"] = speed["speedup_vs_bf16"]
    decode = speed.get("decode") or {}
    if decode.get("speedup_vs_bf16"):
        out[f"batch-1 decode speed vs dense bf16 ({decode.get('new_tokens')} new tokens)"] = decode[
            "speedup_vs_bf16"
        ]
    return out
