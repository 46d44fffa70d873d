"""Measure an export against its dense model: ``python -m lightcook.bench EXPORT_DIR [options]``.

One command, one process: the export (:func:`lightcook.export.load_compressed`) and a baseline (by
default the dense model the export came from, in bfloat16, eager Hugging Face) are timed by
:func:`lightcook.measure.generation_speed` — the function the run's report calls — interleaved, after
a warm-up, medians of ``--repeats``:

* prefill tokens/s: one forward over ``batch x prompt`` tokens (KV cache on), per ``--batch``;
* decode tokens/s: greedy one-token steps on a prefilled cache (``--cache dynamic|static``), per batch;
* time to first token: the prefill of a batch-1 prompt plus the greedy pick of its first new token;
* peak memory: what one batch-``max(--batch)`` prefill + decode adds on top of the loaded model
  (:func:`lightcook.measure.peak_memory`: the CUDA allocator's peak, or the growth of the process's
  peak RSS on CPU), and the bytes: the safetensors payload of the folder and the parameter + buffer
  bytes as loaded.

``ratios`` are export over baseline of those numbers (rates: > 1 means the export is faster; time to
first token, memory and bytes: < 1 means it is smaller). The command also runs ``generate`` on the
export (with the chosen cache) and checks it against the measured greedy decode, and prints which
kernel each quantized layer uses. ``--json OUT`` writes everything (raw, unrounded numbers, the
machine, the command), atomically.

The dense baseline: the base model recorded in the export's manifest (``base_model``, written by the
run's report), loaded in bfloat16; without one, the export's own ``config.json`` with random weights
(same shapes, so the same speed) unless the export is structured (its config is sliced): then pass
``--baseline <dir>`` (a Hugging Face folder, loaded in bfloat16, or another export, loaded as
``load_compressed`` chooses).

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lightcook.export import save_compressed
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> root = Path(tempfile.mkdtemp())
    >>> export = save_compressed(LlamaForCausalLM(cfg), root / "export")
    >>> main([str(export), "--batch", "1,2", "--prompt", "8", "--new-tokens", "2", "--repeats", "1",
    ...       "--json", str(root / "bench.json"), "--quiet"])
    0
    >>> result = json.loads((root / "bench.json").read_text())
    >>> sorted(result["ratios"]), result["generate"]["matches_greedy_decode"]
    (['by_batch', 'decode', 'loaded_bytes', 'prefill', 'ttft'], True)
"""

from __future__ import annotations

import argparse
import inspect
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightcook.export import load_compressed, model_from_config, read_manifest
from lightcook.export.format import read_config
from lightcook.io import write_json_atomic
from lightcook.measure import (
    CACHES,
    MEMORY_KINDS,
    Clock,
    cuda_sync,
    generation_speed,
    greedy_decode,
    loaded_bytes,
    machine,
    peak_memory,
    safetensors_payload,
)
from lightcook.render import machine_line, mb, num, table

__all__ = ["BenchError", "bench", "kernels_of", "load_baseline", "load_export", "main", "render_text"]

SCHEMA_VERSION = 1
DTYPES = ("auto", "bfloat16", "float16", "float32")
#: The two models timed, in the table's column order.
NAMES = ("export", "baseline")


class BenchError(ValueError):
    """Bad input, with the command-line argument it concerns (``main`` exits with status 2)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


# --------------------------------------------------------------------------- loading


def load_export(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> nn.Module:
    """:func:`~lightcook.export.load_compressed`, passing ``backend`` where that function takes one.

    Raises:
        BenchError: a ``backend`` other than ``auto`` that this ``load_compressed`` cannot choose.
    """
    kwargs: dict[str, Any] = {"dtype": dtype}
    if "backend" in inspect.signature(load_compressed).parameters:
        kwargs["backend"] = backend
    elif backend != "auto":
        raise BenchError("--backend", f"{backend!r}: this lightcook's load_compressed has no kernel choice")
    return load_compressed(path, device, **kwargs)


def load_baseline(
    spec: str, export_dir: str | Path, manifest: Mapping[str, Any], device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The baseline model and what it is (``kind``, ``source``, ``dtype``, ``weights``).

    Args:
        spec: ``dense`` (the dense model the export came from, bfloat16) or a folder / model name: a
            lightcook export (loaded as ``load_compressed`` chooses) or a Hugging Face model (bfloat16).
        export_dir: the export being measured (its ``config.json`` for an unrecorded base model).
        manifest: its manifest (``base_model``, ``techniques``).
        device: where the model goes.

    Raises:
        BenchError: the base model cannot be found or loaded (names ``--baseline`` and what to pass).
    """
    if spec != "dense":
        return _baseline_from(spec, device)
    base = manifest.get("base_model")
    if base:
        try:
            model = _pretrained(str(base), "manifest base_model").to(device).eval()
        except (OSError, ValueError) as err:
            raise BenchError(
                "--baseline",
                f"the export's base model {base!r} cannot be loaded ({err}); pass --baseline <dir>",
            ) from None
        return model, {
            "kind": "base_model",
            "source": str(base),
            "dtype": "bfloat16",
            "weights": "pretrained",
        }
    if "structured" in manifest.get("techniques", []):
        raise BenchError(
            "--baseline",
            f"{export_dir} is a structured export (its config.json is sliced) and records no base_model: "
            "pass --baseline <dir> with the dense model (a Hugging Face folder)",
        )
    config = read_config(export_dir)
    model = model_from_config(config).to(device=device, dtype=torch.bfloat16).eval()
    source = f"{Path(export_dir) / 'config.json'} (no base_model recorded)"
    return model, {"kind": "config", "source": source, "dtype": "bfloat16", "weights": "random, same shapes"}


def _baseline_from(spec: str, device: str | torch.device) -> tuple[nn.Module, dict[str, Any]]:
    path = Path(spec).expanduser()
    try:
        if (path / "lightcook.json").is_file():
            model = load_compressed(path, device)
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            return model, {"kind": "export", "source": str(path), "dtype": dtype, "weights": "export"}
        model = _pretrained(spec, "--baseline").to(device).eval()
    except (OSError, ValueError) as err:
        raise BenchError("--baseline", f"{spec!r} cannot be loaded ({err})") from None
    return model, {"kind": "folder", "source": spec, "dtype": "bfloat16", "weights": "pretrained"}


def _pretrained(name: str, key: str) -> nn.Module:
    """A Hugging Face causal LM in bfloat16 from a built-in name, a folder or a hub name (offline)."""
    from transformers import AutoModelForCausalLM

    from lightcook.modules.hub import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name, key), dtype=torch.bfloat16)


def kernels_of(model: nn.Module) -> tuple[dict[str, str], str]:
    """Which kernel each quantized layer of a loaded export uses, and where that came from.

    ``model.quantized_kernels`` (set where ``load_compressed`` chooses kernels) when present, else the
    module class and stored format of every layer in ``model.quantized_formats``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> net.quantized_formats = {"0": "int8"}
        >>> kernels_of(net)
        ({'0': 'Linear (int8)'}, 'module classes')
    """
    chosen = getattr(model, "quantized_kernels", None)
    if isinstance(chosen, Mapping):
        return {str(k): str(v) for k, v in chosen.items()}, "quantized_kernels"
    formats = getattr(model, "quantized_formats", None) or {}
    return {
        name: f"{type(model.get_submodule(name)).__name__} ({fmt})" for name, fmt in formats.items()
    }, "module classes"


# --------------------------------------------------------------------------- measuring


def bench(
    export_dir: str | Path,
    *,
    baseline: str = "dense",
    batches: Sequence[int] = (1, 8),
    prompt: int = 256,
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    cache: str = "dynamic",
    compile: bool = False,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    backend: str = "auto",
    seed: int = 0,
    clock: Clock = time.perf_counter,
) -> dict[str, Any]:
    """Load, measure and compare; returns the JSON content (see the module notes).

    Args:
        export_dir: the lightcook export folder.
        baseline: ``dense`` or a folder / model name (see :func:`load_baseline`).
        batches: batch sizes of the prefill and decode measurements (the first one is the headline
            of ``ratios.decode`` / ``ratios.prefill``).
        prompt: prompt tokens (random ids, seeded).
        new_tokens: greedy decode steps per sample.
        repeats, warmup: timed and untimed rounds (medians).
        cache: ``dynamic`` or ``static`` KV cache.
        compile: ``torch.compile`` the forward of both models.
        device: where both models run.
        dtype: the export's dtype (``auto``: what ``load_compressed`` chooses).
        backend: kernel choice passed to ``load_compressed`` when it takes one.
        seed: of the prompt ids.
        clock: seconds now (tests inject a fake one).

    Raises:
        BenchError: bad input (names the argument).
    """
    _check(batches=batches, prompt=prompt, new_tokens=new_tokens, repeats=repeats, warmup=warmup, cache=cache)
    try:
        manifest = read_manifest(export_dir)
    except ValueError as err:
        raise BenchError("EXPORT_DIR", str(err)) from None
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    try:
        export = load_export(export_dir, device, dtype=torch_dtype, backend=backend)
    except BenchError:
        raise
    except (OSError, ValueError) as err:
        raise BenchError("EXPORT_DIR", str(err)) from None
    base, base_info = load_baseline(baseline, export_dir, manifest, device)
    models = {"export": export, "baseline": base}
    _check_context(models, prompt + new_tokens)
    vocab = min(int(_config(m).vocab_size) for m in models.values())
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (max(batches), prompt), generator=generator).to(device)
    gen = _generate_check(export, ids[:1], new_tokens, cache)  # eager, before any compile
    memory = {
        name: peak_memory(partial(greedy_decode, m, ids, new_tokens, cache), device)
        for name, m in models.items()
    }
    timed = {name: _compiled(m) if compile else m for name, m in models.items()}
    speed = generation_speed(
        timed,
        ids,
        new_tokens,
        repeats,
        batches=batches,
        sync=cuda_sync(device),
        clock=clock,
        cache=cache,
        warmup=warmup,
    )
    kernels, kernel_source = kernels_of(export)
    per_model = {
        name: _model_entry(
            name, speed, memory[name], models[name], export_dir if name == "export" else base_info
        )
        for name in NAMES
    }
    return {
        "version": SCHEMA_VERSION,
        "export": {
            "path": str(export_dir),
            "techniques": list(manifest.get("techniques", [])),
            "dtype": str(next(export.parameters()).dtype).removeprefix("torch."),
            "kernels": kernels,
            "kernels_source": kernel_source,
        },
        "baseline": base_info,
        "settings": {
            "batches": list(batches),
            "prompt": prompt,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "warmup": warmup,
            "cache": cache,
            "compile": compile,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "seed": seed,
        },
        "models": per_model,
        "ratios": _ratios(per_model, list(batches)),
        "memory": {"kind": torch.device(device).type, "what": MEMORY_KINDS[torch.device(device).type]},
        "generate": gen,
        "machine": machine(),
    }


def _check(**args: Any) -> None:
    for key in ("prompt", "new_tokens", "repeats"):
        if not _is_int(args[key]) or args[key] < 1:
            raise BenchError(f"--{key.replace('_', '-')}", f"must be an integer >= 1, got {args[key]!r}")
    if not _is_int(args["warmup"]) or args["warmup"] < 0:
        raise BenchError("--warmup", f"must be an integer >= 0, got {args['warmup']!r}")
    batches = list(args["batches"])
    if not batches or not all(_is_int(b) and b >= 1 for b in batches) or len(set(batches)) != len(batches):
        raise BenchError("--batch", f"must be distinct integers >= 1, got {batches}")
    if args["cache"] not in CACHES:
        raise BenchError("--cache", f"got {args['cache']!r}, allowed: {', '.join(CACHES)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_context(models: Mapping[str, nn.Module], length: int) -> None:
    for name, model in models.items():
        context = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        if isinstance(context, int) and length > context:
            raise BenchError(
                "--prompt",
                f"--prompt + --new-tokens = {length} exceeds the {name}'s context of {context} tokens",
            )


def _config(model: nn.Module) -> Any:
    """The Hugging Face config of a model."""
    return model.config


def _compiled(model: nn.Module) -> nn.Module:
    """``model`` with its forward compiled (shared weights; the eager model is left as it is)."""
    import copy

    twin = copy.copy(model)  # shallow: same submodules and tensors, own attribute dict
    twin.forward = torch.compile(model.forward)
    return twin


def _generate_check(model: nn.Module, prompt: torch.Tensor, new_tokens: int, cache: str) -> dict[str, Any]:
    """HF ``generate`` (greedy) on the export, against the measured greedy decode."""
    out: dict[str, Any] = {"ok": False, "cache": cache, "matches_greedy_decode": None, "error": None}
    config = _config(model)
    pad = next((t for t in (config.pad_token_id, config.eos_token_id, 0) if isinstance(t, int)), 0)
    kwargs: dict[str, Any] = {"cache_implementation": "static"} if cache == "static" else {}
    try:
        with torch.inference_mode():
            generated = model.generate(  # type: ignore[operator]
                prompt,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
                disable_compile=True,
                **kwargs,
            )
    except Exception as err:  # noqa: BLE001 - reported, not fatal: the timing stands on its own
        out["error"] = f"{type(err).__name__}: {err}"
        return out
    out.update(
        ok=True,
        matches_greedy_decode=bool(torch.equal(generated, greedy_decode(model, prompt, new_tokens, cache))),
    )
    return out


def _model_entry(
    name: str, speed: Mapping[str, Any], memory: int | None, model: nn.Module, source: Any
) -> dict[str, Any]:
    folder = Path(source) if name == "export" else _folder_of(source)
    return {
        "prefill": {
            str(b): {"seconds": t["prefill"][name], "tokens_per_second": t["prefill_tokens_per_second"][name]}
            for b, t in speed["batches"].items()
        },
        "decode": {
            str(b): {"seconds_per_step": t["decode"][name], "tokens_per_second": t["tokens_per_second"][name]}
            for b, t in speed["batches"].items()
        },
        "ttft_seconds": speed["ttft"][name],
        "peak_memory_bytes": memory,
        "bytes": {
            "safetensors_payload": safetensors_payload(folder) if folder is not None else None,
            "loaded": loaded_bytes(model),
        },
    }


def _folder_of(info: Mapping[str, Any]) -> Path | None:
    """The folder a baseline was loaded from (``None`` when built from a config)."""
    if info["kind"] == "config":
        return None
    if info["kind"] == "base_model":
        from lightcook.modules.hub import resolve_model_path

        path = resolve_model_path(info["source"], "base_model")
        return path if isinstance(path, Path) else None
    path = Path(info["source"]).expanduser()
    return path if path.is_dir() else None


def _over(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _ratios(models: Mapping[str, Any], batches: list[int]) -> dict[str, Any]:
    ex, base = models["export"], models["baseline"]
    by_batch = {
        str(b): {
            kind: _over(ex[kind][str(b)]["tokens_per_second"], base[kind][str(b)]["tokens_per_second"])
            for kind in ("prefill", "decode")
        }
        for b in batches
    }
    head = by_batch[str(batches[0])]
    return {
        "decode": head["decode"],
        "prefill": head["prefill"],
        "ttft": _over(ex["ttft_seconds"], base["ttft_seconds"]),
        "loaded_bytes": _over(ex["bytes"]["loaded"], base["bytes"]["loaded"]),
        "by_batch": by_batch,
    }


# --------------------------------------------------------------------------- output


def render_text(result: Mapping[str, Any]) -> str:
    """The readable table the command prints (from :func:`bench`'s result)."""
    ex, base, ratios = result["models"]["export"], result["models"]["baseline"], result["ratios"]
    s, info = result["settings"], result["baseline"]
    rows: list[list[str]] = []
    for kind, unit in (("prefill", "prefill tokens/s"), ("decode", "decode tokens/s")):
        for b in s["batches"]:
            a, c = ex[kind][str(b)]["tokens_per_second"], base[kind][str(b)]["tokens_per_second"]
            rows.append(
                [f"{unit}, batch {b}", num(a, "{:.1f}"), num(c, "{:.1f}"), num(_over(a, c), suffix=" x")]
            )
    rows.append(_row("time to first token, batch 1", ex["ttft_seconds"], base["ttft_seconds"], 1e3, " ms"))
    rows.append(_row("peak memory added", ex["peak_memory_bytes"], base["peak_memory_bytes"], 1e-6, " MB"))
    rows.append(
        _row("parameters + buffers loaded", ex["bytes"]["loaded"], base["bytes"]["loaded"], 1e-6, " MB")
    )
    payload = ex["bytes"]["safetensors_payload"], base["bytes"]["safetensors_payload"]
    rows.append(
        ["safetensors payload on disk", mb(payload[0]), mb(payload[1]), num(_over(*payload), suffix=" x")]
    )
    export = result["export"]
    lines = [
        f"lightcook.bench: {export['path']} ({'+'.join(export['techniques']) or 'dense'}, {export['dtype']}) vs "
        f"{info['kind']} {info['source']} ({info['dtype']}, weights: {info['weights']})",
        f"machine: {machine_line(result['machine'])}",
        f"settings: prompt {s['prompt']} tokens, {s['new_tokens']} new tokens, {s['cache']} cache, "
        f"{'torch.compile' if s['compile'] else 'eager'}, {s['device']}, {s['threads']} threads; median of "
        f"{s['repeats']} interleaved rounds after {s['warmup']} warm-up",
        "",
        *table(["measure", "export", "baseline", "export / baseline"], rows, "lrrr"),
        "",
        f"headline: decode x{num(ratios['decode'])}, prefill x{num(ratios['prefill'])} "
        f"(batch {s['batches'][0]}, export over baseline tokens/s)",
        f"peak memory: {result['memory']['what']}",
        *_kernel_lines(export["kernels"], export["kernels_source"]),
        _generate_line(result["generate"]),
    ]
    return "\n".join(lines) + "\n"


def _row(label: str, a: float | None, b: float | None, scale: float, unit: str) -> list[str]:
    return [
        label,
        num(None if a is None else a * scale, suffix=unit),
        num(None if b is None else b * scale, suffix=unit),
        num(_over(a, b), suffix=" x"),
    ]


def _kernel_lines(kernels: Mapping[str, str], source: str) -> list[str]:
    """One line per (layer pattern, kernel): block indices folded into ``*``."""
    if not kernels:
        return ["kernels: no quantized layer"]
    groups: dict[tuple[str, str], int] = {}
    for name, kernel in kernels.items():
        key = (re.sub(r"\.\d+\.", ".*.", name), kernel)
        groups[key] = groups.get(key, 0) + 1
    lines = [f"kernels ({source}), {len(kernels)} quantized layers:"]
    lines += [f"  {pattern}: {kernel} ({n} layer{'s' * (n != 1)})" for (pattern, kernel), n in groups.items()]
    return lines


def _generate_line(gen: Mapping[str, Any]) -> str:
    if not gen["ok"]:
        return f"generate ({gen['cache']} cache): FAILED: {gen['error']}"
    same = "matches" if gen["matches_greedy_decode"] else "DIFFERS FROM"
    return f"generate ({gen['cache']} cache): ok, {same} the measured greedy decode"


# --------------------------------------------------------------------------- command line


def _batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers >= 1, got {text!r}") from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"distinct integers >= 1, got {text!r}")
    return values


def _positive(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"an integer >= {low}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightcook.bench",
        description="Time a lightcook export against the dense bf16 model it came from (prefill, decode, "
        "time to first token, memory, bytes), interleaved in one process.",
    )
    add = parser.add_argument
    add("export_dir", metavar="EXPORT_DIR", help="the lightcook export folder")
    add("--baseline", default="dense", help="dense (default: the recorded base model, bf16) or a folder")
    add("--batch", type=_batches, default=[1, 8], help="batch sizes, comma-separated (default 1,8)")
    add("--prompt", type=_positive(1), default=256, help="prompt tokens (default 256)")
    add("--new-tokens", type=_positive(1), default=64, help="decode steps (default 64)")
    add("--repeats", type=_positive(1), default=5, help="timed rounds, median (default 5)")
    add("--warmup", type=_positive(0), default=1, help="untimed rounds first (default 1)")
    add("--threads", type=_positive(1), help="torch threads (default: torch's choice)")
    add("--cache", choices=CACHES, default="dynamic", help="KV cache (default dynamic)")
    add("--compile", action="store_true", help="torch.compile the forward of both models")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    add(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="the export's dtype (default: load_compressed's choice)",
    )
    add("--backend", default="auto", help="kernel choice for load_compressed, where it has one")
    add("--seed", type=int, default=0, help="of the random prompt ids")
    add("--json", metavar="OUT", help="write the result there (atomically)")
    add("--quiet", action="store_true", help="do not print the table")
    return parser


def main(argv: Sequence[str] | None = None, *, clock: Clock = time.perf_counter) -> int:
    """Command line entry point; returns the exit status (bad input: exit 2 with the argument named).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        clock: seconds now, for the timings (tests inject a fake one).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if not Path(args.export_dir).is_dir():
        parser.error(f"EXPORT_DIR {args.export_dir}: no such folder")
    if args.json and Path(args.json).is_dir():
        parser.error(f"--json {args.json}: is a folder; give a file name")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = bench(
            args.export_dir,
            baseline=args.baseline,
            batches=args.batch,
            prompt=args.prompt,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            warmup=args.warmup,
            cache=args.cache,
            compile=args.compile,
            device=device,
            dtype=args.dtype,
            backend=args.backend,
            seed=args.seed,
            clock=clock,
        )
    except BenchError as err:
        parser.error(str(err))
    result["command"] = shlex.join(
        ["python", "-m", "lightcook.bench", *(sys.argv[1:] if argv is None else argv)]
    )
    if args.json:
        write_json_atomic(args.json, result)
    if not args.quiet:
        print(render_text(result), end="")
        if args.json:
            print(f"[lightcook] wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
