"""The one place lightcook measures: held-out perplexity, interleaved timing, machine facts, bytes.

The report callback, ``lightcook.compare`` and the benchmark scripts under ``experiments/bench/`` all
call these helpers, so a number in the docs comes from the code users run. Pure torch + stdlib (no
Lightning): usable on any ``nn.Module`` and any list of batches.

- :func:`perplexity`: token-weighted perplexity over labels != -100 (causal shift by default).
- :func:`interleaved` / :func:`interleaved_runs`: several callables timed in one process, in
  interleaved rounds after a warm-up, medians (the clock is a parameter, so the logic is testable).
- :func:`prefill_and_decode`: prefill time, greedy decode time per step (KV cache, dynamic or
  static, one token per row per forward, as ``generate`` does) and time to first token of Hugging
  Face causal LMs, models interleaved; :func:`generation_speed`: the same at several batch sizes
  (what ``python -m lightcook.bench`` and the run's report measure).
- :func:`peak_memory`: peak bytes one call adds (CUDA allocator peak, or the process's peak RSS).
- :func:`machine`: CPU model, cores, threads, ISA flags, torch / Python versions, CUDA device, load
  average, date. :func:`bytes_on_disk`, :func:`safetensors_payload`, :func:`parameter_bytes`,
  :func:`loaded_bytes`: sizes.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    >>> ids = torch.randint(0, 64, (2, 8))
    >>> ppl = perplexity(model, [{"input_ids": ids, "labels": ids}])
    >>> ppl.tokens, abs(ppl.value - float(model(input_ids=ids, labels=ids).loss.exp())) < 1e-3
    (14, True)
    >>> sorted(interleaved({"a": lambda: None, "b": lambda: None}, repeats=3))
    ['a', 'b']
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import gc
import inspect
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightcook.io import bytes_on_disk

__all__ = [
    "CACHES",
    "IGNORE_INDEX",
    "MEMORY_KINDS",
    "Perplexity",
    "bytes_on_disk",
    "causal_shift",
    "cuda_sync",
    "generation_speed",
    "greedy_decode",
    "interleaved",
    "interleaved_runs",
    "loaded_bytes",
    "machine",
    "new_cache",
    "parameter_bytes",
    "peak_memory",
    "perplexity",
    "prefill_and_decode",
    "safetensors_payload",
]

#: Labels with this value are not predicted (padding, prompt tokens): the Hugging Face convention.
IGNORE_INDEX = -100
#: CPU flags that decide bf16 / int8 speed on x86 (reported by :func:`machine` when present).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")

Align = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
Clock = Callable[[], float]


# --------------------------------------------------------------------------- perplexity


class Perplexity(NamedTuple):
    """What :func:`perplexity` measured: ``value`` (``None`` without a predicted token), the number
    of predicted ``tokens`` and their summed negative log-likelihood ``nll`` (nats)."""

    value: float | None
    tokens: int
    nll: float


def causal_shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's logits ``(B, T, V)`` with its labels ``(B, T)``: position t predicts t+1.

    Example:
        >>> logits, labels = causal_shift(torch.zeros(1, 4, 3), torch.arange(4)[None])
        >>> tuple(logits.shape), labels.tolist()
        ((1, 3, 3), [[1, 2, 3]])
    """
    return logits[:, :-1], labels[:, 1:]


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every submodule's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def perplexity(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    align: Align = causal_shift,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    device: torch.device | str | None = None,
) -> Perplexity:
    """Token-weighted held-out perplexity: ``exp(sum of NLL / predicted tokens)`` over labels != -100.

    The model is called as ``model(**batch)`` (labels included, so encoder-decoders build their
    decoder inputs) in eval mode without gradients; its modes are restored afterwards.

    Args:
        model: a Hugging Face style model whose output has ``.logits`` ``(B, T, V)``.
        batches: dicts with ``labels`` and the model's inputs.
        align: maps ``(logits, labels)`` so that ``logits[:, t]`` predicts ``labels[:, t]``
            (default :func:`causal_shift`; an encoder-decoder needs the identity).
        prepare: applied to each batch first (e.g. a module's ``mask_padding``).
        device: move the batch tensors there first.

    Raises:
        KeyError: a batch has no ``labels``.

    Example:
        >>> class Uniform(nn.Module):  # every token equally likely among 8: perplexity 8
        ...     def forward(self, input_ids, labels=None):
        ...         return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 8)})()
        >>> ids = torch.tensor([[1, 2, 3, -100]])
        >>> ppl = perplexity(Uniform(), [{"input_ids": ids.clamp_min(0), "labels": ids}])
        >>> round(ppl.value, 4), ppl.tokens
        (8.0, 2)
    """
    nll, tokens = 0.0, 0
    with _evaluating(model):
        for batch in batches:
            batch = dict(batch)
            if device is not None:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            batch = prepare(batch) if prepare is not None else batch
            if "labels" not in batch:
                raise KeyError(f"perplexity: a batch has no 'labels' (keys: {sorted(batch)})")
            logits, labels = align(model(**batch).logits, batch["labels"])
            flat = logits.float().reshape(-1, logits.shape[-1])
            nll += float(
                F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            )
            tokens += int((labels != IGNORE_INDEX).sum())
    return Perplexity(math.exp(nll / tokens) if tokens else None, tokens, nll)


# --------------------------------------------------------------------------- timing


def cuda_sync(device: torch.device | str | None) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device (to pass as ``sync``), else ``None``.

    Example:
        >>> cuda_sync("cpu") is None
        True
    """
    if device is None or torch.device(device).type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


def interleaved_runs(
    run: Callable[[str], Sequence[float]], kinds: Sequence[str], repeats: int, *, rotate: bool = True
) -> dict[str, list[float]]:
    """``repeats`` rounds of one ``run(kind)`` per kind; each run returns its timed samples.

    Args:
        run: runs one kind once and returns its samples (seconds, e.g. the step times of a fit).
        kinds: the variants, in the order of the first round.
        repeats: rounds.
        rotate: shift the order by one every round (no kind always goes first).

    Returns:
        every kind's samples, in the order they were taken.

    Raises:
        ValueError: no kinds, or ``repeats < 1``.

    Example:
        >>> order = []
        >>> interleaved_runs(lambda k: order.append(k) or [len(order)], ["a", "b"], 2)
        {'a': [1, 4], 'b': [2, 3]}
        >>> order
        ['a', 'b', 'b', 'a']
    """
    if not kinds or repeats < 1:
        raise ValueError(f"interleaved_runs: needs kinds and repeats >= 1, got {list(kinds)}, {repeats}")
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_ in range(repeats):
        shift = round_ % len(kinds) if rotate else 0
        for kind in [*kinds[shift:], *kinds[:shift]]:
            samples[kind] += list(run(kind))
    return samples


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    inner: int = 1,
    sync: Callable[[], Any] | None = None,
    clock: Clock = time.perf_counter,
    rotate: bool = False,
    fresh: bool = False,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds in this process.

    ``warmup`` untimed rounds, then ``repeats`` timed rounds that call every function in turn, so a
    drift in machine load hits all of them alike; a sample is ``inner`` calls, divided by ``inner``.

    Args:
        fns: name -> zero-argument callable (or, with ``fresh``, a factory of one).
        repeats: timed rounds (samples per function).
        warmup: untimed rounds before them.
        inner: calls per sample.
        sync: called before starting and before stopping the clock (e.g. ``torch.cuda.synchronize``).
        clock: seconds now (injectable: tests pass a fake clock).
        rotate: shift the order by one every round.
        fresh: each value is a factory, called untimed before every sample; the callable it returns
            is what is timed (e.g. a decode loop that needs a fresh prefilled KV cache).

    Raises:
        ValueError: no functions, ``repeats < 1``, ``inner < 1`` or ``warmup < 0``.

    Example:
        >>> ticks = iter(range(100))
        >>> interleaved({"a": lambda: None}, repeats=3, warmup=0, clock=lambda: next(ticks))
        {'a': 1.0}
    """
    if not fns or repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(
            f"interleaved: needs functions, repeats >= 1, inner >= 1, warmup >= 0; got {len(fns)} "
            f"functions, repeats={repeats}, inner={inner}, warmup={warmup}"
        )
    sync = sync or (lambda: None)

    def sample(name: str) -> list[float]:
        fn = fns[name]() if fresh else fns[name]
        sync()
        start = clock()
        for _ in range(inner):
            fn()
        sync()
        return [(clock() - start) / inner]

    if warmup:
        interleaved_runs(sample, list(fns), warmup, rotate=rotate)
    samples = interleaved_runs(sample, list(fns), repeats, rotate=rotate)
    return {name: statistics.median(values) for name, values in samples.items()}


# --------------------------------------------------------------------------- decode


@torch.inference_mode()
def greedy_decode(model: nn.Module, input_ids: Tensor, new_tokens: int, cache: str = "dynamic") -> Tensor:
    """Greedy decode with the KV cache, as ``generate(do_sample=False)`` does: one forward over the
    prompt (prefill), then one forward per new token; no stop on EOS.

    Args:
        model: a Hugging Face causal LM (``use_cache`` / ``past_key_values``).
        input_ids: the prompt ``(B, T)``.
        new_tokens: tokens to generate.
        cache: ``dynamic`` or ``static`` (see :func:`new_cache`).

    Returns:
        the prompt followed by the ``new_tokens`` generated ids ``(B, T + new_tokens)``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)).eval()
        >>> tuple(greedy_decode(gpt, torch.tensor([[1, 2, 3]]), 4).shape)
        (1, 7)
    """
    step = _decoder(model, input_ids, new_cache(model, cache, input_ids.shape[1] + new_tokens + 1))
    return torch.cat([input_ids, *(step() for _ in range(new_tokens))], dim=1)


CACHES = ("dynamic", "static")


def new_cache(model: nn.Module, cache: str, max_len: int) -> Any:
    """A fresh KV cache for ``model``: ``None`` for ``dynamic`` (the model builds one as it goes),
    a ``transformers.StaticCache`` of ``max_len`` positions for ``static`` (allocated on first use,
    fixed shapes: what ``torch.compile`` wants).

    Raises:
        ValueError: ``cache`` not in :data:`CACHES`.

    Example:
        >>> new_cache(nn.Linear(1, 1), "dynamic", 8) is None
        True
    """
    if cache not in CACHES:
        raise ValueError(f"cache: got {cache!r}, allowed: {', '.join(CACHES)}")
    if cache == "dynamic":
        return None
    from transformers import StaticCache

    config: Any = model.config
    return StaticCache(config=config, max_cache_len=max_len)


def _forward(model: nn.Module, input_ids: Tensor, cache: Any) -> Any:
    extra = {} if cache is None else {_cache_argument(model): cache}
    return model(input_ids=input_ids, use_cache=True, **extra)


def _decoder(model: nn.Module, input_ids: Tensor, cache: Any = None) -> Callable[[], Tensor]:
    """Prefill ``input_ids`` now (into ``cache``, else a dynamic one) and pick the first token; return
    a callable that generates the next token ``(B, 1)``."""
    key = _cache_argument(model)
    out = _forward(model, input_ids, cache)
    state = {"cache": _cache_of(out), "next": out.logits[:, -1:].argmax(-1)}

    def step() -> Tensor:
        token = state["next"]
        with torch.inference_mode():
            out = model(input_ids=token, use_cache=True, **{key: state["cache"]})
        state.update(cache=_cache_of(out), next=out.logits[:, -1:].argmax(-1))
        return token

    return step


def _cache_argument(model: nn.Module) -> str:
    """The forward argument of the KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    forward = getattr(model, "forward", model)
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a compiled forward without a signature
        parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def prefill_and_decode(
    models: Mapping[str, nn.Module],
    prompt: Tensor,
    new_tokens: int,
    repeats: int,
    *,
    sync: Callable[[], Any] | None = None,
    clock: Clock = time.perf_counter,
    cache: str = "dynamic",
    ttft: bool = False,
    warmup: int = 1,
) -> dict[str, dict[str, float]]:
    """Prefill seconds and greedy-decode seconds per step of causal LMs, interleaved.

    Prefill = one forward over ``prompt`` ``(B, T)`` with the cache on. Decode = ``new_tokens``
    one-token forwards (one token per row) on a freshly prefilled cache (the prefill itself is not
    timed), divided by ``new_tokens``. Time to first token (``ttft=True``) = the prefill of the
    first row alone ``(1, T)`` plus the greedy pick of the first new token. Each: ``warmup`` rounds,
    then ``repeats`` interleaved rounds, medians; cache allocation is never timed.

    Args:
        models: name -> Hugging Face causal LM (in eval mode).
        prompt: ``(B, T)`` token ids (``B = 1`` for batch-1 decode).
        new_tokens: generated tokens per decode sample (>= 1).
        repeats: timed rounds.
        sync: as in :func:`interleaved` (e.g. :func:`cuda_sync` of the device).
        clock: as in :func:`interleaved`.
        cache: ``dynamic`` (the model grows its cache) or ``static`` (see :func:`new_cache`).
        ttft: also time the first token of a batch-1 request.
        warmup: untimed rounds first.

    Returns:
        ``prefill`` (s), ``prefill_tokens_per_second`` (``B * T`` / s), ``decode`` (s per step) and
        ``tokens_per_second`` (``B`` / s per step), each ``{name: value}``; with ``ttft``, ``ttft`` (s).

    Raises:
        ValueError: ``new_tokens < 1``, an unknown ``cache`` (and what :func:`interleaved` raises).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)).eval()
        >>> out = prefill_and_decode({"gpt": gpt}, torch.tensor([[1, 2, 3]]), 2, repeats=1)
        >>> sorted(out), out["tokens_per_second"]["gpt"] > 0
        (['decode', 'prefill', 'prefill_tokens_per_second', 'tokens_per_second'], True)
    """
    if new_tokens < 1:
        raise ValueError(f"prefill_and_decode: new_tokens must be >= 1, got {new_tokens}")
    if cache not in CACHES:
        raise ValueError(f"cache: got {cache!r}, allowed: {', '.join(CACHES)}")
    rows, length = prompt.shape
    max_len = length + new_tokens + 1

    def prefill(model: nn.Module, ids: Tensor) -> Callable[[], Any]:
        return functools.partial(_forward, model, ids, new_cache(model, cache, max_len))

    def decoder(model: nn.Module, ids: Tensor) -> Callable[[], Any]:
        return _decoder(model, ids, new_cache(model, cache, max_len))

    def first_token(model: nn.Module) -> Callable[[], Any]:
        return functools.partial(_decoder, model, prompt[:1], new_cache(model, cache, max_len))

    timing = functools.partial(
        interleaved, repeats=repeats, warmup=warmup, sync=sync, clock=clock, fresh=True
    )
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        out["prefill"] = timing({n: functools.partial(prefill, m, prompt) for n, m in models.items()})
        out["decode"] = timing(
            {n: functools.partial(decoder, m, prompt) for n, m in models.items()}, inner=new_tokens
        )
        if ttft:
            out["ttft"] = timing({n: functools.partial(first_token, m) for n, m in models.items()})
    out["prefill_tokens_per_second"] = {n: _rate(rows * length, s) for n, s in out["prefill"].items()}
    out["tokens_per_second"] = {n: _rate(rows, s) for n, s in out["decode"].items()}
    return out


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.inf


def generation_speed(
    models: Mapping[str, nn.Module],
    prompt: Tensor,
    new_tokens: int,
    repeats: int,
    *,
    batches: Sequence[int] = (1,),
    sync: Callable[[], Any] | None = None,
    clock: Clock = time.perf_counter,
    cache: str = "dynamic",
    warmup: int = 1,
) -> dict[str, Any]:
    """What ``python -m lightcook.bench`` and the run's report measure: :func:`prefill_and_decode` at
    every batch size, and the time to first token, the models interleaved in each measurement.

    Args:
        models: name -> Hugging Face causal LM (in eval mode).
        prompt: ``(R, T)`` token ids; batch ``b`` uses its first ``b`` rows (rows repeated when
            ``R < b``); the time to first token uses row 0.
        new_tokens, repeats, sync, clock, cache, warmup: as for :func:`prefill_and_decode`.
        batches: batch sizes (each >= 1, no repeats).

    Returns:
        ``{"batches": {b: prefill_and_decode(...) at batch b}, "ttft": {name: s}}``.

    Raises:
        ValueError: no batch sizes, one < 1 or repeated (and what :func:`prefill_and_decode` raises).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)).eval()
        >>> out = generation_speed({"gpt": gpt}, torch.tensor([[1, 2, 3]]), 2, 1, batches=(1, 2))
        >>> sorted(out["batches"]), sorted(out["batches"][2]), out["ttft"]["gpt"] > 0
        ([1, 2], ['decode', 'prefill', 'prefill_tokens_per_second', 'tokens_per_second'], True)
    """
    batches = list(batches)
    if (
        not batches
        or any(not isinstance(b, int) or b < 1 for b in batches)
        or len(set(batches)) != len(batches)
    ):
        raise ValueError(f"batches: must be distinct integers >= 1, got {batches}")
    measure = functools.partial(
        prefill_and_decode,
        new_tokens=new_tokens,
        repeats=repeats,
        sync=sync,
        clock=clock,
        cache=cache,
        warmup=warmup,
    )
    out: dict[str, Any] = {"batches": {}, "ttft": {}}
    for i, b in enumerate(batches):
        rows = prompt.repeat(-(-b // prompt.shape[0]), 1)[:b]
        timing = measure(models, rows, ttft=i == 0)
        out["ttft"] = timing.pop("ttft", out["ttft"])
        out["batches"][b] = timing
    return out


# --------------------------------------------------------------------------- memory


#: What :func:`peak_memory` reports on each kind of device.
MEMORY_KINDS = {
    "cuda": "torch.cuda.max_memory_allocated during the call minus memory_allocated before it",
    "cpu": "growth of the process's peak resident set (VmHWM, reset first) over its resident set "
    "before the call, after gc and malloc_trim (Linux; approximate: the allocator may keep memory)",
}


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int | None:
    """Peak bytes one call of ``fn`` adds on top of what was in use before it (activations, KV cache);
    what each device measures is in :data:`MEMORY_KINDS`. ``None`` where it cannot be measured (CPU
    without Linux ``/proc``).

    Example:
        >>> grown = peak_memory(lambda: torch.ones(16, 1024, 1024).sum())  # a 64 MiB temporary
        >>> grown is None or grown > 50 * 2**20
        True
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    gc.collect()
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_bytes("VmRSS")
        fn()
        return max(0, _status_bytes("VmHWM") - before)
    except (OSError, ValueError):
        return None


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024  # kB
    raise ValueError(f"/proc/self/status has no {key}")


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --------------------------------------------------------------------------- machine


def machine(cpuinfo: str | None = None) -> dict[str, Any]:
    """Facts about this machine that decide a timing, for the report and the benchmark docs.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read when ``None``; tests pass their own).

    Returns:
        ``cpu`` (model name), ``logical_cores``, ``physical_cores`` (``None`` when unknown),
        ``usable_cores`` (this process's affinity), ``torch_threads``, ``isa`` (the flags of
        :data:`ISA_FLAGS` the CPU has), ``torch``, ``python``, ``cuda`` (device name or ``None``),
        ``load_average`` (1, 5, 15 min, or ``None``), ``date`` (local, ISO, minutes).

    Example:
        >>> facts = machine("model name : Fake CPU\\nphysical id : 0\\ncpu cores : 4\\nflags : avx2 sse\\n")
        >>> facts["cpu"], facts["physical_cores"], facts["isa"]
        ('Fake CPU', 4, ['avx2'])
    """
    fields = _cpuinfo_fields(_read_cpuinfo() if cpuinfo is None else cpuinfo)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": fields.get("model name", [platform.processor() or platform.machine()])[0],
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(fields),
        "usable_cores": len(affinity) if affinity is not None else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": [f for f in ISA_FLAGS if f in " ".join(fields.get("flags", [""])[:1]).split()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": None if load is None else [round(v, 2) for v in load],
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
    }


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_fields(text: str) -> dict[str, list[str]]:
    """``key -> values`` of every ``key : value`` line (one value per logical CPU)."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), []).append(value.strip())
    return fields


def _physical_cores(fields: Mapping[str, list[str]]) -> int | None:
    cores, sockets = fields.get("cpu cores"), set(fields.get("physical id", []))
    if not cores or not cores[0].isdigit():
        return None
    return int(cores[0]) * max(1, len(sockets))


# --------------------------------------------------------------------------- bytes


def safetensors_payload(path: str | os.PathLike) -> int:
    """Bytes of tensor data in the ``*.safetensors`` files of a folder (each file minus its header).

    Raises:
        ValueError: a file too short to hold a safetensors header (names the file).

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> folder = Path(tempfile.mkdtemp())
        >>> save_file({"w": torch.zeros(3, 4)}, str(folder / "model.safetensors"))
        >>> safetensors_payload(folder)
        48
    """
    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with file.open("rb") as f:
            head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: {len(head)} bytes, too short for a safetensors header")
        total += file.stat().st_size - 8 - int.from_bytes(head, "little")
    return total


def parameter_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of a model's distinct parameters (tied ones once), at ``dtype`` if given (works on
    the meta device, so no memory is needed).

    Example:
        >>> parameter_bytes(nn.Linear(4, 2), torch.bfloat16)
        20
    """
    params = {id(p): p for p in model.parameters()}.values()
    if dtype is None:
        return sum(p.numel() * p.element_size() for p in params)
    return sum(p.numel() for p in params) * torch.empty((), dtype=dtype).element_size()


def loaded_bytes(model: nn.Module) -> int:
    """Bytes of a model's distinct parameters and buffers as loaded (tied ones once): what it holds
    in memory, packed int8 codes and scales included.

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> layer.register_buffer("codes", torch.zeros(8, dtype=torch.int8))
        >>> loaded_bytes(layer)
        48
    """
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)
