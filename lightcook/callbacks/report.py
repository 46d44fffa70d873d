"""What a compressed run cost and bought: :class:`CompressionReport`.

A thin callback: its hooks decide *when*; :mod:`lightcook.measure` (perplexity, interleaved timing,
machine facts, bytes) and :mod:`lightcook.render` (``report.md``, the plots) decide *what*.

During training, at the end of every validation (sanity check excluded) it *estimates* from the live
network what the compressed export will weigh (:func:`lightcook.export.estimate_bytes`, through
:func:`estimate_summary`), logs ``report/bytes_estimated``, ``report/bits_per_weight``,
``report/sparsity``, ``report/ffn_fraction`` (to ``trainer.loggers``, at ``trainer.global_step``) and
keeps a history (primitives, in the checkpoint: a resumed run keeps it).

What counts is the export's rule, so the estimate equals what the export writes:

* ``bytes_estimated``: the export's ``tensor_bytes`` (every stored tensor: packed codes, scales, N:M
  positions, MoE routers, embeddings, norms; masks and gates are not stored, tied weights once).
* ``bits_per_weight`` / ``sparsity`` (also per layer): over the Linears the export counts in
  ``weight_bytes`` — every Linear inside the repeated blocks and any other layer a codec stores
  compactly (a quantized LM head) — per weight of the *live* (unsliced) layer: stored weight bytes
  (codes + scales + zero points, kept values + positions, or the plain weight), and the share of
  weights neither masked nor removed by slicing. **MoE routers are not counted** there: they are
  added by MoEfication, not compressed, and stored as trained (their bytes are in
  ``bytes_estimated``).
* ``ffn_fraction``: the mean over FFNs of the share of FFN weights a token uses (``top_k /
  num_experts`` for a routed MoE FFN, else 1).

At the end of fit (rank 0, when any compression callback is present) it writes the ONE combined
export (:func:`lightcook.export.save_compressed` with the ``export_options`` of every compression
callback) and *measures* it: bytes on disk, held-out perplexity of the reloaded export
on the first ``eval_batches`` validation batches, the prefill time, the batch-1 greedy decode speed
(tokens/s, KV cache) and the time to first token against dense references built from the model's
original configuration (float32 and bfloat16), all models interleaved in one process, medians of
repeats: :func:`lightcook.measure.generation_speed`, what ``python -m lightcook.bench`` measures (an
encoder-decoder, or ``decode_tokens=0``: one forward with the cache off). The export's manifest
records the pretrained model the run started from (``base_model``), the bench's dense baseline.
Everything goes to ``<run_dir>/report.json``, ``report.md`` and ``report_layers.png``,
``report_history.png`` (and ``report_expert_load.png`` with MoE FFNs), written atomically.
``python -m lightcook.compare`` puts several runs side by side.

Example:
    >>> import json, tempfile, torch, lightning as L
    >>> from pathlib import Path
    >>> from lightcook.callbacks import QuantizationCallback
    >>> from lightcook.modules import CausalLMModule
    >>> tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    ...         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    >>> module = CausalLMModule(config=tiny, tokenizer=None)
    >>> ids = torch.randint(0, 64, (4, 8))
    >>> data = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    >>> report = CompressionReport(speed_batch=(1, 8), speed_repeats=1, plots=False, eval_batches=1,
    ...                            decode_tokens=2)
    >>> root = tempfile.mkdtemp()
    >>> trainer = L.Trainer(max_steps=2, callbacks=[QuantizationCallback(), report],
    ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
    ...                     enable_model_summary=False, limit_val_batches=1, default_root_dir=root)
    >>> trainer.fit(module, data, data)
    >>> saved = json.loads((Path(root) / "report.json").read_text())
    >>> saved["techniques"], len(saved["history"]), 8 < saved["bits_per_weight"] < 10
    (['quantized'], 1, True)
    >>> saved["speed"]["decode"]["measured"], saved["speed"]["decode"]["speedup_vs_bf16"] > 0
    (True, True)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightcook.callbacks.base import (
    CompressionCallback,
    check_primitive,
    compression_callbacks,
    find_network,
    first_loader,
)
from lightcook.export import (
    estimate_bytes,
    load_compressed,
    model_from_config,
    read_manifest,
    save_compressed,
)
from lightcook.export.card import export_facts, write_model_card
from lightcook.export.convert import ECOSYSTEM_FORMATS, convert, open_with_transformers
from lightcook.export.gguf import GGUF_TYPES
from lightcook.io import model_bytes, write_json_atomic, write_text_atomic
from lightcook.measure import (
    causal_shift,
    cuda_sync,
    generation_speed,
    interleaved,
    machine,
    parameter_bytes,
    perplexity,
    safetensors_payload,
)
from lightcook.ops.moe import moe_modules
from lightcook.render import EXPERT_PNG, HISTORY_PNG, LAYERS_PNG, report_markdown, write_report_plots

#: Dtypes the tensors stored as they are (embeddings, norms, float layers) may be cast to in the export.
EXPORT_DTYPES = ("float32", "bfloat16", "float16")

__all__ = [
    "merged_export_options",
    "EXPERT_PNG",  # the plot file names, re-exported from lightcook.render
    "HISTORY_PNG",
    "LAYERS_PNG",
    "REPORT_JSON",
    "REPORT_MD",
    "CompressionReport",
    "estimate_summary",
]

REPORT_JSON, REPORT_MD = "report.json", "report.md"
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- the estimate's view


def estimate_summary(
    model: nn.Module,
    nm: tuple[int, int] | None = (2, 4),
    dtype: torch.dtype | None = None,
    architecture: Any = None,
) -> dict[str, Any]:
    """What the report shows of :func:`lightcook.export.estimate_bytes` for the live ``model``.

    Args:
        model: the network being compressed (``pl_module.model``).
        nm: the ``(n, m)`` pattern the export packs (its ``nm`` argument).
        dtype: the export's ``dtype`` (cast of the floating tensors stored as they are).
        architecture: the structured-pruning layout override (its ``architecture`` export option).

    Returns:
        ``bytes_estimated`` (the export's ``tensor_bytes``), ``bits_per_weight`` and ``sparsity`` over
        the layers the export counts in ``weight_bytes`` (MoE routers not among them), per dense
        (live) weight, ``ffn_fraction`` and ``layers``: one row per such layer (``name``,
        ``params`` of the live layer, ``bits_per_weight``, ``sparsity``).

    Example:
        >>> net = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(8, 4, bias=False)})])  # "0.proj"
        >>> net[0]["proj"].register_buffer("weight_mask", torch.tensor([True, False]).repeat(4, 4))
        >>> summary = estimate_summary(net)
        >>> summary["bytes_estimated"], summary["sparsity"], summary["bits_per_weight"], summary["layers"]
        (68, 0.5, 17.0, [{'name': '0.proj', 'params': 32, 'bits_per_weight': 17.0, 'sparsity': 0.5}])
    """
    estimate = estimate_bytes(model, nm=nm, dtype=dtype, architecture=architecture)
    layers = estimate["layers"]
    live = sum(layer["live_params"] for layer in layers.values())
    kept = sum(layer["kept"] for layer in layers.values())
    return {
        "bytes_estimated": estimate["tensor_bytes"],
        "bits_per_weight": 8.0 * estimate["weight_bytes"] / live if live else 0.0,
        "sparsity": 1.0 - kept / live if live else 0.0,
        "ffn_fraction": _ffn_fraction(model),
        "layers": [_layer_entry(name, layer) for name, layer in layers.items() if layer["live_params"]],
    }


def _ffn_fraction(model: nn.Module) -> float:
    """Mean over FFNs of the share of FFN weights a token uses (``(shared_experts + top_k) / num_experts``
    for a routed MoE FFN; 1.0 for an FFN not yet split and without MoE FFNs)."""
    moes = moe_modules(model)
    if not moes:
        return 1.0
    shares = [m.compute_fraction if bool(m.routed) else 1.0 for m in moes.values()]
    return sum(shares) / len(shares)


def _layer_entry(name: str, layer: dict[str, Any]) -> dict[str, Any]:
    params = layer["live_params"]
    return {
        "name": name,
        "params": params,
        "bits_per_weight": _round(8.0 * layer["weight_bytes"] / params),
        "sparsity": _round(1.0 - layer["kept"] / params),
    }


def _metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The logged scalars: ``report/bytes_estimated``, ``bits_per_weight``, ``sparsity``, ``ffn_fraction``."""
    keys = ("bytes_estimated", "bits_per_weight", "sparsity", "ffn_fraction")
    return {f"report/{key}": float(summary[key]) for key in keys}


class CompressionReport(Callback):
    """Estimate compression during training; at fit end export once, measure, and write a report.

    Args:
        export_dir: the combined export folder under ``trainer.default_root_dir`` (``None``: no export;
            the report then holds the estimates only).
        measure_speed: time the reloaded export against dense float32 and bfloat16 references built
            from the model's configuration as it was at ``setup`` (random weights).
        speed_batch: ``(batch, tokens)`` of the random token ids of the timed forward (tokens capped
            at the model's context); the decode prompt is its first row.
        speed_repeats: timed rounds per measurement (median; one warm-up; the models interleaved).
        plots: write the PNG plots.
        eval_batches: first validation batches on which the reloaded export's perplexity is measured
            (and the live model's, for comparison); 0: skip.
        export_dtype: cast of the floating tensors the export stores as they are (``None``: keep).
        decode_tokens: new tokens per timed batch-1 greedy decode (KV cache), causal LMs only; 0: skip.
        formats: ecosystem formats written from the export at fit end, each into
            ``<run_dir>/<format>/`` (``compressed-tensors``: transformers / vLLM; ``gguf``:
            llama.cpp), reloaded with transformers and scored on the same batches; a combination a
            format cannot hold is recorded with the reason, not raised.
        gguf_type: the type of the GGUF file's float weights (``bf16``, ``f16``, ``f32``, ``q8_0``,
            ``q4_0``; trained codes are kept where a block type holds them).

    Raises:
        ValueError: an argument outside its allowed values (the message names ``report.<arg>``).

    Example:
        >>> report = CompressionReport(export_dir=None, measure_speed=False)
        >>> report.state_key, report.state
        ('CompressionReport', {'history': []})
    """

    def __init__(
        self,
        export_dir: str | None = "compressed",
        measure_speed: bool = True,
        speed_batch: Sequence[int] = (4, 128),
        speed_repeats: int = 5,
        plots: bool = True,
        eval_batches: int = 8,
        export_dtype: str | None = None,
        decode_tokens: int = 16,
        formats: Sequence[str] = (),
        gguf_type: str = "bf16",
    ) -> None:
        super().__init__()
        self.formats, self.gguf_type = tuple(formats), gguf_type
        self.export_dir, self.measure_speed, self.plots = export_dir, measure_speed, plots
        self.export_dtype = export_dtype
        self.speed_batch = tuple(speed_batch) if isinstance(speed_batch, Sequence) else speed_batch
        self.speed_repeats, self.eval_batches, self.decode_tokens = speed_repeats, eval_batches, decode_tokens
        self._check_args()
        self.state: dict[str, Any] = {"history": []}
        self.report: dict[str, Any] = {}
        self.exports: dict[str, str] = {}
        self._dense_config: Any = None
        self._config_of: int | None = None
        self._load_before: list[Tensor] = []
        self._expert_load: Tensor | None = None  # (layers, experts) tokens of the last validation

    def _check_args(self) -> None:
        for fmt in self.formats:
            if fmt not in ECOSYSTEM_FORMATS:
                raise ValueError(f"report.formats: got {fmt!r}, allowed: {', '.join(ECOSYSTEM_FORMATS)}")
        if self.gguf_type not in GGUF_TYPES:
            raise ValueError(f"report.gguf_type: got {self.gguf_type!r}, allowed: {', '.join(GGUF_TYPES)}")
        if self.export_dir is not None and (
            not isinstance(self.export_dir, str) or not self.export_dir.strip()
        ):
            raise ValueError(f"report.export_dir: must be null or a folder name, got {self.export_dir!r}")
        if self.export_dtype is not None and self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(
                f"report.export_dtype: got {self.export_dtype!r}, allowed: null, {', '.join(EXPORT_DTYPES)}"
            )
        for arg in ("measure_speed", "plots"):
            if not isinstance(getattr(self, arg), bool):
                raise ValueError(f"report.{arg}: got {getattr(self, arg)!r}, allowed: true, false")
        batch = self.speed_batch
        if not (isinstance(batch, tuple) and len(batch) == 2 and all(_is_int(v) and v >= 1 for v in batch)):
            raise ValueError(f"report.speed_batch: must be [batch, tokens], two integers >= 1, got {batch!r}")
        for arg, low, what in (
            ("speed_repeats", 1, ""),
            ("eval_batches", 0, " (0: skip)"),
            ("decode_tokens", 0, " (0: skip)"),
        ):
            if not _is_int(getattr(self, arg)) or getattr(self, arg) < low:
                raise ValueError(
                    f"report.{arg}: must be an integer >= {low}{what}, got {getattr(self, arg)!r}"
                )

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        check_primitive(self.state, "CompressionReport.state_dict()")
        return copy.deepcopy(self.state)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = {"history": [], **copy.deepcopy(dict(state_dict))}

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per validation: ``step``, ``val_ppl``, ``bytes_estimated``, ``bits_per_weight``,
        ``sparsity``, ``ffn_fraction``.

        A checkpoint that ``ModelCheckpoint(every_n_train_steps=k)`` writes at a step that also
        validates is saved *before* that validation, and Lightning does not repeat it on resume: a run
        resumed from such a checkpoint has no row for that step.
        """
        return self.state["history"]

    # ------------------------------------------------------------------ hooks

    @staticmethod
    def _network(trainer: Trainer, pl_module: LightningModule) -> nn.Module:
        """The network the compression callbacks compress (their ``network=``), else the default one."""
        callbacks = compression_callbacks(trainer.callbacks)  # type: ignore[attr-defined]
        return callbacks[0].network(pl_module) if callbacks else find_network(pl_module)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._config_of != id(pl_module):  # the configuration before any slicing, once per model
            self._dense_config = copy.deepcopy(getattr(self._network(trainer, pl_module), "config", None))
            self._config_of = id(pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._load_before = [
            m.load_counts.clone() for m in moe_modules(self._network(trainer, pl_module)).values()
        ]

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        model = self._network(trainer, pl_module)
        self._note_expert_load(model)
        summary = estimate_summary(model, **self._estimate_options(trainer))
        metrics = _metrics(summary)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        row = {"step": trainer.global_step, "val_ppl": _metric(trainer, "val/ppl")}
        row.update({key.removeprefix("report/"): _round(value) for key, value in metrics.items()})
        row["bytes_estimated"] = summary["bytes_estimated"]
        self.history.append(row)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        callbacks = compression_callbacks(trainer.callbacks)  # type: ignore[attr-defined]
        if not callbacks:
            rank_zero_info("CompressionReport: no compression callback; nothing exported, no report")
            return
        if any(getattr(cb, "requeued", False) is True for cb in trainer.callbacks):  # type: ignore[attr-defined]
            rank_zero_info("CompressionReport: the job is being requeued; the report waits for the real end")
            return
        if trainer.is_global_zero:
            self.report = self.build_report(trainer, pl_module, callbacks)
            self.write(Path(trainer.default_root_dir), self.report)
        trainer.strategy.barrier("compression-report")
        path = Path(trainer.default_root_dir) / (self.export_dir or "")
        if self.export_dir is not None and path.is_dir():
            self.exports = {"compressed": str(path)}
        for fmt, entry in self.report.get("formats", {}).items():
            if entry.get("path"):
                self.exports[fmt] = entry["path"]

    # ------------------------------------------------------------------ what the report holds

    def build_report(
        self, trainer: Trainer, pl_module: LightningModule, callbacks: Sequence[CompressionCallback]
    ) -> dict[str, Any]:
        """Export, measure and assemble the ``report.json`` content (rank 0; no file but the export)."""
        model = self._network(trainer, pl_module)
        run_dir = Path(trainer.default_root_dir)
        summary = estimate_summary(model, **self._estimate_options(trainer))
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        export, error = self._export(model, run_dir, callbacks, _base_model(pl_module, model), tokenizer)
        loaded = load_compressed(export, pl_module.device) if export is not None else None
        return {
            "version": SCHEMA_VERSION,
            "run_dir": str(run_dir),
            "step": trainer.global_step,
            "model": type(model).__name__,
            "techniques": read_manifest(export)["techniques"] if export is not None else [],
            "compress": [cb.config_key.removeprefix("compress.") for cb in callbacks],
            "callbacks": {cb.config_key: _callback_entry(cb) for cb in callbacks},
            "export_dir": None if export is None else str(export),
            "export_error": error,
            "bytes": self._bytes(export, summary["bytes_estimated"]),
            "bits_per_weight": _round(summary["bits_per_weight"]),
            "sparsity": _round(summary["sparsity"]),
            "ffn_fraction": _round(summary["ffn_fraction"]),
            "ppl": self._perplexities(trainer, pl_module, loaded),
            "formats": self._ecosystem_formats(trainer, pl_module, export),
            "speed": self._speed(loaded, pl_module.device),
            "machine": machine(),
            "layers": summary["layers"],
            "expert_load": self._expert_load_entry(model),
            "history": copy.deepcopy(self.history),
            "plots": [],
        }

    def _estimate_options(self, trainer: Trainer) -> dict[str, Any]:
        options = merged_export_options(compression_callbacks(trainer.callbacks))  # type: ignore[attr-defined]
        return {key: options[key] for key in ("nm", "dtype", "architecture") if key in options}

    def _export(
        self,
        model: nn.Module,
        run_dir: Path,
        callbacks: Sequence[CompressionCallback],
        base_model: str | None = None,
        tokenizer: Any = None,
    ) -> tuple[Path | None, str | None]:
        if self.export_dir is None:
            return None, None
        options = merged_export_options(callbacks)
        extra = {"compress": [cb.config_key for cb in callbacks], **options.pop("extra", {})}
        if base_model is not None:  # the dense model `python -m lightcook.bench` compares against
            extra.setdefault("base_model", base_model)
        try:
            dtype = None if self.export_dtype is None else getattr(torch, self.export_dtype)
            path = save_compressed(model, run_dir / self.export_dir, **options, dtype=dtype, extra=extra)
            if tokenizer is not None:  # beside the weights, as transformers users expect
                tokenizer.save_pretrained(str(path))
            write_model_card(path, export_facts("lightcook", read_manifest(path), bytes=model_bytes(path)))
            return path, None
        except ValueError as err:  # e.g. SR-STE weights still parametrized: keep the report
            rank_zero_warn(f"CompressionReport: the combined export failed: {err}")
            return None, str(err)

    def _bytes(self, export: Path | None, estimated: int) -> dict[str, Any]:
        dense_fp32 = None
        if self._dense_config is not None:
            with torch.device("meta"):
                dense_fp32 = parameter_bytes(
                    model_from_config(copy.deepcopy(self._dense_config)), torch.float32
                )
        measured = model_bytes(export) if export is not None else None
        return {
            "measured": measured,
            "tensors_measured": safetensors_payload(export) if export is not None else None,
            "estimated": estimated,
            "dense_fp32": dense_fp32,
            "compression_ratio": _ratio(dense_fp32, measured or estimated),
        }

    def _perplexities(
        self, trainer: Trainer, pl_module: LightningModule, loaded: nn.Module | None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"val": _metric(trainer, "val/ppl"), "live": None, "export": None}
        out.update(eval_batches=0, eval_tokens=0, note=None)
        loader = first_loader(trainer.val_dataloaders)
        model = self._network(trainer, pl_module)
        align = getattr(pl_module, "aligned_logits_and_labels", None)
        if not self.eval_batches:
            out["note"] = "eval_batches=0: perplexity of the export not measured"
        elif loaded is None:
            out["note"] = "no export: its perplexity is not measured"
        elif loader is None:
            out["note"] = "no validation data: perplexity of the export not measured"
        elif align is None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            out["note"] = "encoder-decoder model without aligned_logits_and_labels: perplexity skipped"
        if out["note"]:
            return out
        batches = self._eval_batches(trainer, pl_module)
        score = self._scorer(pl_module, batches)
        live, export = score(model), score(cast(nn.Module, loaded))  # None returned above
        out.update(live=_round(live.value), export=_round(export.value))
        out.update(eval_batches=len(batches), eval_tokens=live.tokens)
        return out

    def _eval_batches(self, trainer: Trainer, pl_module: LightningModule) -> list[Any]:
        loader = first_loader(trainer.val_dataloaders)
        if loader is None or not self.eval_batches:
            return []
        return [move_data_to_device(b, pl_module.device) for _, b in zip(range(self.eval_batches), loader)]

    @staticmethod
    def _scorer(pl_module: LightningModule, batches: list[Any]) -> Any:
        align = getattr(pl_module, "aligned_logits_and_labels", None)
        return partial(
            perplexity,
            batches=batches,
            align=align or causal_shift,
            prepare=getattr(pl_module, "mask_padding", None),
        )

    def _ecosystem_formats(
        self, trainer: Trainer, pl_module: LightningModule, export: Path | None
    ) -> dict[str, Any]:
        """Write each of ``formats`` from the export, reload it with transformers, and score it."""
        out: dict[str, Any] = {}
        if not self.formats:
            return out
        batches = self._eval_batches(trainer, pl_module)
        for fmt in self.formats:
            entry: dict[str, Any] = {"path": None, "bytes": None, "ppl": None, "error": None}
            out[fmt] = entry
            if export is None:
                entry["error"] = "no lightcook export to convert"
                continue
            try:
                path = convert(export, Path(trainer.default_root_dir) / fmt, fmt, self.gguf_type)
            except ValueError as err:
                rank_zero_warn(f"CompressionReport: report.formats {fmt}: {err}")
                entry["error"] = str(err)
                continue
            entry.update(path=str(path), bytes=model_bytes(path))
            if fmt == "gguf":
                entry["gguf_type"] = self.gguf_type
            if batches:
                reloaded = open_with_transformers(path, fmt).to(pl_module.device)
                entry["ppl"] = _round(self._scorer(pl_module, batches)(reloaded).value)
                entry["loaded_with"] = "transformers"
                del reloaded
        return out

    def _speed(self, loaded: nn.Module | None, device: torch.device) -> dict[str, Any]:
        out: dict[str, Any] = {
            "measured": False,
            "batch": list(self.speed_batch),
            "repeats": self.speed_repeats,
        }
        out.update(threads=torch.get_num_threads(), device=str(device), note=None, decode=None)
        if not self.measure_speed or loaded is None or self._dense_config is None:
            out["note"] = "not measured" if not self.measure_speed else "no export or no model config"
            return out
        config = self._dense_config
        batch, tokens = self.speed_batch
        decode_note = self._decode_note(config)
        context = _context(config)
        if context is not None:
            tokens = min(tokens, context - (self.decode_tokens if decode_note is None else 0))
        ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
        models = {
            "compressed": loaded,
            "dense_fp32": _dense_model(config, torch.float32, device),
            "dense_bf16": _dense_model(config, torch.bfloat16, device),
        }
        if decode_note is None:  # what `python -m lightcook.bench` measures: prefill, decode, first token
            timing = generation_speed(
                models,
                ids.to(device),
                self.decode_tokens,
                self.speed_repeats,
                batches=sorted({batch, 1}, reverse=True),
                sync=cuda_sync(device),
            )
            seconds = timing["batches"][batch]["prefill"]
            out["decode"] = self._decode_entry(timing, tokens)
        else:  # one forward with the cache off (encoder-decoders: decoder inputs = the ids)
            seconds = self._forward_seconds(models, ids.to(device), config, device)
            out["decode"] = {"measured": False, "new_tokens": self.decode_tokens, "note": decode_note}
        out.update(measured=True, seconds={k: _round(v, 6) for k, v in seconds.items()}, tokens=tokens)
        out["speedup_vs_fp32"] = _round(seconds["dense_fp32"] / seconds["compressed"])
        out["speedup_vs_bf16"] = _round(seconds["dense_bf16"] / seconds["compressed"])
        return out

    def _forward_seconds(
        self, models: dict[str, nn.Module], ids: Tensor, config: Any, device: torch.device
    ) -> dict[str, float]:
        inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids
        with torch.inference_mode():
            fns = {name: partial(model, **inputs) for name, model in models.items()}
            return interleaved(fns, self.speed_repeats, sync=cuda_sync(device))

    def _decode_note(self, config: Any) -> str | None:
        """Why batch-1 decode is not timed (``None``: it is)."""
        context = _context(config)
        if not self.decode_tokens:
            return "decode_tokens=0: not measured"
        if getattr(config, "is_encoder_decoder", False):
            return "encoder-decoder model: batch-1 decode not timed"
        if context is not None and context <= self.decode_tokens:
            return f"context {context} leaves no room for a prompt and {self.decode_tokens} new tokens"
        return None

    def _decode_entry(self, timing: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
        """Batch-1 greedy decode (and time to first token) of :func:`generation_speed`'s result."""
        one = timing["batches"][1]
        step = one["decode"]
        out: dict[str, Any] = {"measured": True, "new_tokens": self.decode_tokens, "note": None}
        out["prompt_tokens"] = prompt_tokens
        out["prefill_seconds"] = {k: _round(v, 6) for k, v in one["prefill"].items()}
        out["ttft_seconds"] = {k: _round(v, 6) for k, v in timing["ttft"].items()}
        out["seconds_per_token"] = {k: _round(v, 6) for k, v in step.items()}
        out["tokens_per_second"] = {k: _round(v, 2) for k, v in one["tokens_per_second"].items()}
        out["speedup_vs_fp32"] = _round(step["dense_fp32"] / step["compressed"])
        out["speedup_vs_bf16"] = _round(step["dense_bf16"] / step["compressed"])
        return out

    def _note_expert_load(self, model: nn.Module) -> None:
        moes = list(moe_modules(model).values())
        if not moes:
            return
        before: Sequence[Tensor | int] = (
            self._load_before if len(self._load_before) == len(moes) else [0] * len(moes)
        )
        self._expert_load = torch.stack([m.load_counts - b for m, b in zip(moes, before)])

    def _expert_load_entry(self, model: nn.Module) -> dict[str, Any] | None:
        moes = moe_modules(model)
        if not moes:
            return None
        load = self._expert_load
        if load is None or int(load.sum()) == 0:
            load = torch.stack([m.load_counts for m in moes.values()])
        return {"layers": list(moes), "tokens": load.long().tolist(), "source": "last validation"}

    def write(self, run_dir: Path, report: dict[str, Any]) -> None:
        """Write the plots (if enabled), ``report.json`` and ``report.md`` into ``run_dir``, atomically."""
        if self.plots:
            report["plots"] = write_report_plots(run_dir, report)
        write_json_atomic(run_dir / REPORT_JSON, report)
        write_text_atomic(run_dir / REPORT_MD, report_markdown(report))


# --------------------------------------------------------------------------- small helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def _metric(trainer: Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else _round(float(value))


def merged_export_options(callbacks: Iterable[CompressionCallback]) -> dict[str, Any]:
    """The ``export_options`` of every compression callback in one dict (the keyword arguments of
    :func:`~lightcook.export.save_compressed` for their combination).

    Raises:
        ValueError: two callbacks ask for different values of one option (names both).
    """
    options: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for cb in callbacks:
        for key, value in cb.export_options().items():
            if key in options and options[key] != value:
                raise ValueError(
                    f"{cb.config_key} cannot be combined with {owners[key]}: export option {key!r} "
                    f"is {value!r} for one and {options[key]!r} for the other"
                )
            options[key], owners[key] = value, cb.config_key
    return options


def _callback_entry(cb: Any) -> dict[str, Any]:
    state = cb.state_dict()
    try:
        check_primitive(state, cb.config_key)
    except TypeError:
        state = {k: v for k, v in state.items() if isinstance(v, bool | int | float | str | type(None))}
    return {"class": type(cb).__name__, "state": state}


def _context(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if _is_int(value):
            return value
    return None


def _base_model(pl_module: LightningModule, model: nn.Module) -> str | None:
    """The pretrained model the run started from: the module's ``name_or_path`` hyperparameter, else
    the folder its HF config was loaded from (``None`` for a randomly initialised model)."""
    name = getattr(pl_module, "hparams", {}).get("name_or_path")
    if isinstance(name, str) and name:
        return name
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return path if isinstance(path, str) and path and Path(path).is_dir() else None


def _dense_model(config: Any, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A randomly initialised dense model of ``config`` (the configuration before compression)."""
    return model_from_config(copy.deepcopy(config)).to(device=device, dtype=dtype).eval()
