"""What a compressed run cost and bought: :class:`CompressionReport`.

During training, at the end of every validation (sanity check excluded) it *estimates* from the live
network what the compressed export will weigh (:func:`estimate_compression`): every state-dict tensor
at its dtype size, except quantized Linear weights (packed integer codes + scales), N:M-masked
weights (kept values + 2-bit positions), structurally removed heads/neurons/blocks (deterministic
gates), and what is never stored (masks, gate logits, quantizer training state); tied weights count
once. Logged as ``report/bytes_estimated``, ``report/bits_per_weight``, ``report/sparsity``,
``report/ffn_fraction`` (to ``trainer.loggers``, at ``trainer.global_step``) and kept as a history
(primitives, in the checkpoint: a resumed run keeps it).

At the end of fit (rank 0, when any compression callback is present) it writes the ONE combined
export (:func:`lightcook.export.compressed.export_compressed` with the ``export_options`` of every
compression callback) and *measures* it: bytes on disk, held-out perplexity of the reloaded export
on the first ``eval_batches`` validation batches, and forward time against a dense reference built
from the model's original configuration (float32 and bfloat16, interleaved, median of repeats).
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
    >>> report = CompressionReport(speed_batch=(1, 8), speed_repeats=1, plots=False, eval_batches=1)
    >>> root = tempfile.mkdtemp()
    >>> trainer = L.Trainer(max_steps=2, callbacks=[QuantizationCallback(export_dir=None), report],
    ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
    ...                     enable_model_summary=False, limit_val_batches=1, default_root_dir=root)
    >>> trainer.fit(module, data, data)
    >>> saved = json.loads((Path(root) / "report.json").read_text())
    >>> saved["techniques"], len(saved["history"]), 8 < saved["bits_per_weight"] < 10
    (['quantized'], 1, True)
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightcook.callbacks.base import (
    check_primitive,
    compression_callbacks,
    eval_mode,
    first_loader,
    linear_like,
    target_model,
)
from lightcook.export.common import model_from_config
from lightcook.export.compressed import GATES, export_compressed, load_compressed, read_manifest
from lightcook.export.sparse import MASK_SUFFIX
from lightcook.io import bytes_on_disk, write_json_atomic, write_text_atomic
from lightcook.ops.architectures import is_conv1d, linear_dims
from lightcook.ops.hard_concrete import GateSet
from lightcook.ops.moe import moe_modules
from lightcook.ops.quant import QuantLinear, scale_shape
from lightcook.ops.sparsity import is_nm, nm_index_bits, nm_storage_bytes
from lightcook.plots import expert_load_figure, figure, save_figure, short_name

#: Dtypes the tensors stored as they are (embeddings, norms, float layers) may be cast to in the export.
EXPORT_DTYPES = ("float32", "bfloat16", "float16")

__all__ = ["CompressionReport", "Estimate", "LayerStats", "estimate_compression"]

REPORT_JSON, REPORT_MD = "report.json", "report.md"
LAYERS_PNG, HISTORY_PNG, EXPERT_PNG = "report_layers.png", "report_history.png", "report_expert_load.png"
SCHEMA_VERSION = 1
IGNORE_INDEX = -100
_IN_BLOCK = re.compile(r"(.*\.)?\d+\..*")  # a name inside a repeated block (base.BLOCK_LINEARS)
_TIMED = ("compressed", "dense_fp32", "dense_bf16")


# --------------------------------------------------------------------------- estimates (pure torch)


@dataclass(frozen=True)
class LayerStats:
    """One Linear layer inside the transformer blocks, as the export will store it.

    Attributes:
        name: qualified module name.
        params: weights of the dense layer (``in * out``).
        weight_bytes: stored bytes of its weight (integer codes + scales / kept values + positions),
            after structural removal (a removed head or neuron stores nothing).
        kept: weights neither masked nor structurally removed.
    """

    name: str
    params: int
    weight_bytes: float
    kept: float

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the dense layer."""
        return 8.0 * self.weight_bytes / self.params

    @property
    def sparsity(self) -> float:
        """Fraction of the dense layer's weights that are zero (masked) or removed."""
        return 1.0 - self.kept / self.params


@dataclass(frozen=True)
class Estimate:
    """What :func:`estimate_compression` found (see there)."""

    bytes: int
    layers: list[LayerStats] = field(default_factory=list)
    ffn_fraction: float = 1.0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight over the block Linears (scales and N:M positions included)."""
        params = sum(layer.params for layer in self.layers)
        return 8.0 * sum(layer.weight_bytes for layer in self.layers) / params if params else 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of zero-or-removed weights over the block Linears."""
        params = sum(layer.params for layer in self.layers)
        return 1.0 - sum(layer.kept for layer in self.layers) / params if params else 0.0

    def metrics(self) -> dict[str, float]:
        """The logged scalars: ``report/bytes_estimated``, ``bits_per_weight``, ``sparsity``, ``ffn_fraction``."""
        return {
            "report/bytes_estimated": float(self.bytes),
            "report/bits_per_weight": self.bits_per_weight,
            "report/sparsity": self.sparsity,
            "report/ffn_fraction": self.ffn_fraction,
        }


def estimate_compression(
    model: nn.Module, nm: tuple[int, int] | None = (2, 4), dtype: torch.dtype | None = None
) -> Estimate:
    """Estimate, from the live network, what :func:`~lightcook.export.compressed.export_compressed`
    stores (the tensor payload, without file headers and the JSON manifest).

    Args:
        model: the network being compressed (``pl_module.model``).
        nm: the ``(n, m)`` pattern the export packs (as its ``nm`` argument); other masks only zero
            weights, which are then stored dense.
        dtype: the export's ``dtype`` (cast of the floating tensors stored as they are).

    Returns:
        bytes of every state-dict tensor at its (cast) dtype size, except: a
        :class:`~lightcook.ops.quant.QuantLinear` weight at ``bits`` per weight + scales (+ zero
        points); an N:M-masked weight at ``n/m`` of its values + packed positions
        (:func:`~lightcook.ops.sparsity.nm_storage_bytes`); masks, structured-pruning gates and
        quantizer training parameters count 0; Linear layers of a gated block scale by the share of
        units (heads, neurons) the deterministic gates keep (0 for a removed block); tied weights
        count once. Also per-layer statistics of the block Linears and the share of FFN parameters
        used per token (``top_k / num_experts`` for routed MoE FFNs, else 1, averaged over FFNs).

    Example:
        >>> net = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(8, 4, bias=False)})])  # "0.proj"
        >>> net[0]["proj"].register_buffer("weight_mask", torch.tensor([True, False]).repeat(4, 4))
        >>> est = estimate_compression(net)
        >>> est.bytes == nm_storage_bytes(4, 8, 2, 4, 4), est.sparsity, est.bits_per_weight
        (True, 0.5, 17.0)
    """
    fractions = _structural_fractions(model)
    handled: set[str] = set()
    total = 0.0
    layers = []
    for name, module in model.named_modules():
        if not name or not linear_like(module) or name.split(".")[0] == GATES:
            continue
        weight_bytes, extra, keys, kept = _layer_storage(name, module, nm, dtype)
        fraction = fractions.get(name, 1.0)
        if keys:  # compressed: stored in its own form; its tensors skip the generic pass below
            handled |= keys
            total += (weight_bytes + extra) * fraction
        if _IN_BLOCK.fullmatch(name):
            n_in, n_out, _ = linear_dims(module)
            layers.append(LayerStats(name, n_in * n_out, weight_bytes * fraction, kept * fraction))
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in handled or key.endswith(MASK_SUFFIX) or key.split(".")[0] == GATES:
            continue
        ptr = tensor.data_ptr() if tensor.numel() else None
        if ptr is not None and ptr in seen:
            continue  # tied weight: stored once
        if ptr is not None:
            seen.add(ptr)
        owner = key.rsplit(".", 1)[0]
        total += tensor.numel() * _itemsize(tensor, dtype) * fractions.get(owner, 1.0)
    return Estimate(round(total), layers, ffn_fraction(model))


def ffn_fraction(model: nn.Module) -> float:
    """Mean over FFNs of the share of FFN parameters a token uses (1.0 without routed MoE FFNs)."""
    moes = moe_modules(model)
    if not moes:
        return 1.0
    shares = [m.top_k / m.num_experts if bool(m.routed) else 1.0 for m in moes.values()]
    return sum(shares) / len(shares)


def _itemsize(tensor: Tensor, dtype: torch.dtype | None) -> int:
    if dtype is not None and tensor.is_floating_point():
        return torch.empty((), dtype=dtype).element_size()
    return tensor.element_size()


def _nm_packed(module: nn.Module, nm: tuple[int, int] | None) -> bool:
    mask = module._buffers.get("weight_mask")
    if nm is None or not isinstance(mask, Tensor):
        return False
    return is_nm(mask.t() if is_conv1d(module) else mask, *nm)


def _layer_storage(
    name: str, module: nn.Module, nm: tuple[int, int] | None, dtype: torch.dtype | None
) -> tuple[float, float, set[str], float]:
    """``(weight bytes, other stored bytes, state keys accounted for, kept weights)`` of one Linear.

    The keys are empty for a plain layer: its tensors are counted as they are by the generic pass.
    """
    n_in, n_out, _ = linear_dims(module)
    mask = module._buffers.get("weight_mask")
    kept = float(mask.sum()) if isinstance(mask, Tensor) else float(n_in * n_out)
    packed = _nm_packed(module, nm)
    keys = {k for k in module.state_dict(prefix=f"{name}.", keep_vars=True)}
    if isinstance(module, QuantLinear):
        spec = module.weight_quantizer.spec
        cols = n_in // nm[1] * nm[0] if packed else n_in
        positions = n_out * math.ceil(cols / (8 // nm_index_bits(nm[1]))) if packed else 0
        scales = math.prod(scale_shape((n_out, n_in), spec))
        scale_bytes = 8 if module.weight.dtype == torch.float64 else 4
        weight = n_out * math.ceil(cols * spec.bits / 8) + positions
        weight += scales * scale_bytes + (0 if spec.symmetric else scales)
        extra = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
        extra += 4 if module.input_quantizer.mode == "static" else 0
        return float(weight), float(extra), keys, kept
    size = _itemsize(module.weight, dtype)
    if packed:
        weight_keys = {
            k for k in keys if k.removeprefix(f"{name}.") in ("weight", "parametrizations.weight.original")
        }
        return float(nm_storage_bytes(n_out, n_in, *nm, size)), 0.0, weight_keys, kept
    return float(n_in * n_out * size), 0.0, set(), kept


@torch.no_grad()
def _structural_fractions(model: nn.Module) -> dict[str, float]:
    """Linear layer name → share of it the deterministic gates keep (units kept / units; 0 when the
    block goes), for the layers of every gated block; empty without structured-pruning gates."""
    gates = getattr(model, GATES, None)
    if not isinstance(gates, GateSet):
        return {}
    values = gates.deterministic()
    fractions = {}
    for block in gates.blocks:
        units, scale = gates.block_factors(block, values)
        share = 1.0 if units is None else float((units > 0).sum()) / block.units
        if scale is not None and float(scale) <= 0:
            share = 0.0
        for name, module in model.get_submodule(block.name).named_modules(prefix=block.name):
            if linear_like(module):
                fractions[name] = share
    return fractions


# --------------------------------------------------------------------------- the callback


class CompressionReport(Callback):
    """Estimate compression during training; at fit end export once, measure, and write a report.

    Args:
        export_dir: the combined export folder under ``trainer.default_root_dir`` (``None``: no export;
            the report then holds the estimates only).
        measure_speed: time the reloaded export against dense float32 and bfloat16 references built
            from the model's configuration as it was at ``setup`` (random weights).
        speed_batch: ``(batch, tokens)`` of the random token ids used for timing (tokens capped at the
            model's context).
        speed_repeats: timed forward passes per model (median; one warm-up; the models interleaved).
        plots: write the PNG plots.
        eval_batches: first validation batches on which the reloaded export's perplexity is measured
            (and the live model's, for comparison); 0: skip.

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
    ) -> None:
        super().__init__()
        self.export_dir, self.measure_speed, self.plots = export_dir, measure_speed, plots
        if export_dtype is not None and export_dtype not in EXPORT_DTYPES:
            raise ValueError(
                f"report.export_dtype: got {export_dtype!r}, allowed: null, {', '.join(EXPORT_DTYPES)}"
            )
        self.export_dtype = export_dtype
        self.speed_batch = tuple(speed_batch) if isinstance(speed_batch, Sequence) else speed_batch
        self.speed_repeats, self.eval_batches = speed_repeats, eval_batches
        self._check_args()
        self.state: dict[str, Any] = {"history": []}
        self.report: dict[str, Any] = {}
        self.exports: dict[str, str] = {}
        self._dense_config: Any = None
        self._config_of: int | None = None
        self._load_before: list[Tensor] = []
        self._expert_load: Tensor | None = None  # (layers, experts) tokens of the last validation

    def _check_args(self) -> None:
        if self.export_dir is not None and (
            not isinstance(self.export_dir, str) or not self.export_dir.strip()
        ):
            raise ValueError(f"report.export_dir: must be null or a folder name, got {self.export_dir!r}")
        for arg in ("measure_speed", "plots"):
            if not isinstance(getattr(self, arg), bool):
                raise ValueError(f"report.{arg}: got {getattr(self, arg)!r}, allowed: true, false")
        batch = self.speed_batch
        if not (isinstance(batch, tuple) and len(batch) == 2 and all(_is_int(v) and v >= 1 for v in batch)):
            raise ValueError(f"report.speed_batch: must be [batch, tokens], two integers >= 1, got {batch!r}")
        if not _is_int(self.speed_repeats) or self.speed_repeats < 1:
            raise ValueError(f"report.speed_repeats: must be an integer >= 1, got {self.speed_repeats!r}")
        if not _is_int(self.eval_batches) or self.eval_batches < 0:
            raise ValueError(
                f"report.eval_batches: must be an integer >= 0 (0: skip), got {self.eval_batches!r}"
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

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._config_of != id(pl_module):  # the configuration before any slicing, once per model
            self._dense_config = copy.deepcopy(getattr(target_model(pl_module), "config", None))
            self._config_of = id(pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._load_before = [m.load_counts.clone() for m in moe_modules(target_model(pl_module)).values()]

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        model = target_model(pl_module)
        self._note_expert_load(model)
        estimate = estimate_compression(model, **self._estimate_options(trainer))
        metrics = estimate.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        row = {"step": trainer.global_step, "val_ppl": _metric(trainer, "val/ppl")}
        row.update({key.removeprefix("report/"): _round(value) for key, value in metrics.items()})
        row["bytes_estimated"] = estimate.bytes
        self.history.append(row)

    def _note_expert_load(self, model: nn.Module) -> None:
        moes = list(moe_modules(model).values())
        if not moes:
            return
        before = self._load_before if len(self._load_before) == len(moes) else [0] * len(moes)
        self._expert_load = torch.stack([m.load_counts - b for m, b in zip(moes, before)])

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        callbacks = compression_callbacks(trainer.callbacks)
        if not callbacks:
            rank_zero_info("CompressionReport: no compression callback; nothing exported, no report")
            return
        if any(getattr(cb, "requeued", False) is True for cb in trainer.callbacks):
            rank_zero_info("CompressionReport: the job is being requeued; the report waits for the real end")
            return
        if trainer.is_global_zero:
            self.report = self.build_report(trainer, pl_module, callbacks)
            self.write(Path(trainer.default_root_dir), self.report)
        trainer.strategy.barrier("compression-report")
        path = Path(trainer.default_root_dir) / (self.export_dir or "")
        if self.export_dir is not None and path.is_dir():
            self.exports = {"compressed": str(path)}

    # ------------------------------------------------------------------ measuring

    def _estimate_options(self, trainer: Trainer) -> dict[str, Any]:
        options = _merged_options(compression_callbacks(trainer.callbacks))
        return {"nm": options.get("nm", (2, 4)), "dtype": options.get("dtype")}

    def build_report(
        self, trainer: Trainer, pl_module: LightningModule, callbacks: Sequence[Callback]
    ) -> dict[str, Any]:
        """Export, measure and assemble the ``report.json`` content (rank 0; no file but the export)."""
        model = target_model(pl_module)
        run_dir = Path(trainer.default_root_dir)
        estimate = estimate_compression(model, **self._estimate_options(trainer))
        export, error = self._export(model, run_dir, callbacks)
        loaded = load_compressed(export, pl_module.device) if export is not None else None
        dense_fp32 = _parameter_bytes(self._dense_config, torch.float32)
        measured = bytes_on_disk(export) if export is not None else None
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
            "bytes": {
                "measured": measured,
                "tensors_measured": _safetensors_payload(export) if export is not None else None,
                "estimated": estimate.bytes,
                "dense_fp32": dense_fp32,
                "compression_ratio": _ratio(dense_fp32, measured or estimate.bytes),
            },
            "bits_per_weight": _round(estimate.bits_per_weight),
            "sparsity": _round(estimate.sparsity),
            "ffn_fraction": _round(estimate.ffn_fraction),
            "ppl": self._perplexities(trainer, pl_module, loaded),
            "speed": self._speed(loaded, pl_module.device),
            "layers": [_layer_entry(layer) for layer in estimate.layers],
            "expert_load": self._expert_load_entry(model),
            "history": copy.deepcopy(self.history),
            "plots": [],
        }

    def _export(
        self, model: nn.Module, run_dir: Path, callbacks: Sequence[Callback]
    ) -> tuple[Path | None, str | None]:
        if self.export_dir is None:
            return None, None
        options = _merged_options(callbacks)
        extra = {"compress": [cb.config_key for cb in callbacks], **options.pop("extra", {})}
        try:
            dtype = None if self.export_dtype is None else getattr(torch, self.export_dtype)
            path = export_compressed(model, run_dir / self.export_dir, **options, dtype=dtype, extra=extra)
            return path, None
        except ValueError as err:  # e.g. SR-STE weights still parametrized: keep the report
            rank_zero_warn(f"CompressionReport: the combined export failed: {err}")
            return None, str(err)

    def _perplexities(
        self, trainer: Trainer, pl_module: LightningModule, loaded: nn.Module | None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"val": _metric(trainer, "val/ppl"), "live": None, "export": None}
        out.update(eval_batches=0, eval_tokens=0, note=None)
        loader = first_loader(trainer.val_dataloaders)
        if not self.eval_batches or loaded is None or loader is None:
            out["note"] = (
                "eval_batches=0: perplexity of the export not measured"
                if not self.eval_batches
                else "no export: its perplexity is not measured"
                if loaded is None
                else "no validation data: perplexity of the export not measured"
            )
            return out
        batches = [b for _, b in zip(range(self.eval_batches), loader)]
        batches = [move_data_to_device(b, pl_module.device) for b in batches]
        model = target_model(pl_module)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and not hasattr(
            pl_module, "aligned_logits_and_labels"
        ):
            out["note"] = "encoder-decoder model without aligned_logits_and_labels: perplexity skipped"
            return out
        with eval_mode(model), torch.no_grad():
            out["live"], tokens = _perplexity(model, batches, pl_module)
        out["export"], _ = _perplexity(loaded, batches, pl_module)
        out.update(eval_batches=len(batches), eval_tokens=tokens)
        return out

    def _speed(self, loaded: nn.Module | None, device: torch.device) -> dict[str, Any]:
        out: dict[str, Any] = {
            "measured": False,
            "batch": list(self.speed_batch),
            "repeats": self.speed_repeats,
        }
        out.update(threads=torch.get_num_threads(), device=str(device), note=None)
        if not self.measure_speed or loaded is None or self._dense_config is None:
            out["note"] = "not measured" if not self.measure_speed else "no export or no model config"
            return out
        config = self._dense_config
        batch, tokens = self.speed_batch
        tokens = min(tokens, _context(config) or tokens)
        ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
        inputs = {"input_ids": ids.to(device), "use_cache": False}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = inputs["input_ids"]
        models = {
            "compressed": loaded,
            "dense_fp32": _dense_model(config, torch.float32, device),
            "dense_bf16": _dense_model(config, torch.bfloat16, device),
        }
        seconds = _time_interleaved(models, inputs, self.speed_repeats, device)
        out.update(measured=True, seconds={k: _round(v, 6) for k, v in seconds.items()}, tokens=tokens)
        out["speedup_vs_fp32"] = _round(seconds["dense_fp32"] / seconds["compressed"])
        out["speedup_vs_bf16"] = _round(seconds["dense_bf16"] / seconds["compressed"])
        return out

    def _expert_load_entry(self, model: nn.Module) -> dict[str, Any] | None:
        moes = moe_modules(model)
        if not moes:
            return None
        load = self._expert_load
        if load is None or int(load.sum()) == 0:
            load = torch.stack([m.load_counts for m in moes.values()])
        return {"layers": list(moes), "tokens": load.long().tolist(), "source": "last validation"}

    # ------------------------------------------------------------------ writing

    def write(self, run_dir: Path, report: dict[str, Any]) -> None:
        """Write the plots (if enabled), ``report.json`` and ``report.md`` into ``run_dir``, atomically."""
        if self.plots:
            report["plots"] = _write_plots(run_dir, report)
        write_json_atomic(run_dir / REPORT_JSON, report)
        write_text_atomic(run_dir / REPORT_MD, render_markdown(report))


# --------------------------------------------------------------------------- measuring helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def _metric(trainer: Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else _round(float(value))


def _merged_options(callbacks: Iterable[Callback]) -> dict[str, Any]:
    """The ``export_options`` of every compression callback in one dict.

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


def _layer_entry(layer: LayerStats) -> dict[str, Any]:
    return {
        "name": layer.name,
        "params": layer.params,
        "bits_per_weight": _round(layer.bits_per_weight),
        "sparsity": _round(layer.sparsity),
    }


def _safetensors_payload(path: Path) -> int:
    """Bytes of the tensor data in the export's safetensors files (file minus its JSON header)."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            header = int.from_bytes(f.read(8), "little")
        total += file.stat().st_size - 8 - header
    return total


def _context(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if _is_int(value):
            return value
    return None


def _dense_model(config: Any, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A randomly initialised dense model of ``config`` (the configuration before compression)."""
    return model_from_config(copy.deepcopy(config)).to(device=device, dtype=dtype).eval()


def _parameter_bytes(config: Any, dtype: torch.dtype) -> int | None:
    """Bytes of the dense model's distinct parameters at ``dtype`` (built on the meta device)."""
    if config is None:
        return None
    with torch.device("meta"):
        model = model_from_config(copy.deepcopy(config))
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * size


def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _time_interleaved(
    models: Mapping[str, nn.Module], inputs: Mapping[str, Any], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of one forward per model: one warm-up round, then ``repeats`` rounds, the
    models interleaved inside every round (so drifts in machine load hit all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            _sync(device)
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def _perplexity(
    model: nn.Module, batches: Sequence[Mapping[str, Any]], pl_module: LightningModule
) -> tuple[float | None, int]:
    """Token-weighted perplexity over labels != -100, aligned like the module's validation
    (``mask_padding``, ``aligned_logits_and_labels``; a causal shift by one otherwise)."""
    nll, tokens = 0.0, 0
    for batch in batches:
        batch = pl_module.mask_padding(batch) if hasattr(pl_module, "mask_padding") else dict(batch)
        logits = model(**batch).logits  # (B, T, V)
        labels = batch["labels"]
        if hasattr(pl_module, "aligned_logits_and_labels"):
            logits, labels = pl_module.aligned_logits_and_labels(logits, labels)
        else:
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll += float(
            F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        tokens += int((labels != IGNORE_INDEX).sum())
    return (_round(math.exp(nll / tokens)) if tokens else None), tokens


# --------------------------------------------------------------------------- markdown


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.3f} MB"


def _num(value: Any, fmt: str = "{:.2f}", suffix: str = "") -> str:
    return "n/a" if value is None else fmt.format(value) + suffix


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the headline numbers, the validation history, the callbacks, the plots."""
    size, ppl, speed = report["bytes"], report["ppl"], report["speed"]
    seconds = speed.get("seconds", {})
    lines = [
        "# Compression report",
        "",
        f"Run `{report['run_dir']}` at step {report['step']} ({report['model']}). "
        f"Techniques stored: {', '.join(report['techniques']) or 'none'}; "
        f"callbacks: {', '.join(report['callbacks'])}.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| export folder | `{report['export_dir'] or 'none'}` |",
        f"| size on disk, measured (folder) | {_mb(size['measured'])} |",
        f"| size, estimated during training (tensor payload) | {_mb(size['estimated'])} |",
        f"| tensor payload, measured | {_mb(size['tensors_measured'])} |",
        f"| dense float32 parameters | {_mb(size['dense_fp32'])} |",
        f"| compression ratio vs float32 | {_num(size['compression_ratio'], suffix=' x')} |",
        f"| bits per weight (block Linears, scales and positions included) | {_num(report['bits_per_weight'])} |",
        f"| sparsity (block Linears: masked or removed) | {_num(_pct(report['sparsity']), '{:.1f}', ' %')} |",
        f"| FFN parameters used per token | {_num(_pct(report['ffn_fraction']), '{:.1f}', ' %')} |",
        f"| perplexity, live model, last validation | {_num(ppl['val'])} |",
        f"| perplexity on {ppl['eval_batches']} val batches ({ppl['eval_tokens']} tokens): live / export "
        f"| {_num(ppl['live'])} / {_num(ppl['export'])} |",
        f"| forward, {_speed_shape(speed)}: export / dense fp32 / dense bf16 "
        f"| {' / '.join(_num(_ms(seconds.get(k)), '{:.2f}', ' ms') for k in _TIMED)} |",
        f"| speedup vs dense fp32 / bf16 | {_num(speed.get('speedup_vs_fp32'), suffix=' x')} / "
        f"{_num(speed.get('speedup_vs_bf16'), suffix=' x')} |",
    ]
    notes = [n for n in (report.get("export_error"), ppl.get("note"), speed.get("note")) if n]
    lines += ["", *[f"Note: {n}" for n in notes]] if notes else []
    lines += [
        "",
        "## Validation history",
        "",
        "| step | val ppl | est. size | bits/weight | sparsity | FFN used |",
    ]
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for row in report["history"]:
        lines.append(
            f"| {row['step']} | {_num(row['val_ppl'])} | {_mb(row['bytes_estimated'])} | "
            f"{_num(row['bits_per_weight'])} | {_num(_pct(row['sparsity']), '{:.1f}', ' %')} | "
            f"{_num(_pct(row['ffn_fraction']), '{:.1f}', ' %')} |"
        )
    lines += ["", "## Callbacks", ""]
    for key, entry in report["callbacks"].items():
        lines.append(f"- `{key}` ({entry['class']}): state `{entry['state']}`")
    if report["plots"]:
        lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in report["plots"]]]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _ms(value: float | None) -> float | None:
    return None if value is None else 1000.0 * value


def _speed_shape(speed: Mapping[str, Any]) -> str:
    if not speed.get("measured"):
        return "not measured"
    return f"{speed['batch'][0]}x{speed['tokens']} tokens, {speed['threads']} threads, {speed['device']}"


# --------------------------------------------------------------------------- plots (matplotlib, Agg)


def _write_plots(run_dir: Path, report: Mapping[str, Any]) -> list[str]:
    written = []
    if report["layers"]:
        save_figure(_layers_figure(report), run_dir / LAYERS_PNG)
        written.append(LAYERS_PNG)
    if report["history"]:
        save_figure(_history_figure(report), run_dir / HISTORY_PNG)
        written.append(HISTORY_PNG)
    if report.get("expert_load"):
        load = report["expert_load"]
        save_figure(expert_load_figure(load["tokens"], load["layers"], load["source"]), run_dir / EXPERT_PNG)
        written.append(EXPERT_PNG)
    return written


def _layers_figure(report: Mapping[str, Any]) -> Any:
    layers = report["layers"]
    names = [short_name(layer["name"]) for layer in layers]
    fig, (top, bottom) = figure(max(8.0, 0.22 * len(layers) + 2.0), 7.0, rows=2)
    x = range(len(layers))
    top.bar(x, [100 * (layer["sparsity"] or 0) for layer in layers], color="tab:red")
    top.set(ylabel="sparsity (%)", ylim=(0, 100), title="Weights masked or removed, per layer")
    bottom.bar(x, [layer["bits_per_weight"] or 0 for layer in layers], color="tab:blue")
    bottom.axhline(32, color="grey", linestyle="--", linewidth=0.8, label="float32")
    bottom.set_ylim(0, max(34.0, *(1.05 * (layer["bits_per_weight"] or 0) for layer in layers)))
    bottom.set(
        ylabel="stored bits per weight",
        title="Storage bits per dense weight (scales, N:M positions included)",
    )
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.set_xticks(list(x), names, rotation=90, fontsize=7)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    bottom.set_xlabel("layer (block index . module)")
    fig.suptitle(f"{report['model']}: {', '.join(report['compress'])}")
    return fig


def _history_figure(report: Mapping[str, Any]) -> Any:
    rows = report["history"]
    steps = [row["step"] for row in rows]
    fig, (top, bottom) = figure(8.0, 6.0, rows=2)
    ppl = [(row["step"], row["val_ppl"]) for row in rows if row["val_ppl"] is not None]
    top.plot([s for s, _ in ppl], [p for _, p in ppl], marker="o", color="tab:purple", label="live model")
    export_ppl = report["ppl"].get("export")
    if export_ppl is not None:
        top.scatter(
            [report["step"]],
            [export_ppl],
            marker="*",
            s=150,
            color="tab:orange",
            label=f"export ({report['ppl']['eval_batches']} val batches)",
            zorder=3,
        )
    top.set(ylabel="validation perplexity", title="Perplexity during training")
    top.legend(loc="best")
    bottom.plot(steps, [row["bytes_estimated"] / 1e6 for row in rows], marker="o", color="tab:green")
    bottom.set(xlabel="optimizer step", ylabel="estimated size (MB)", title="Estimated export size")
    from matplotlib.ticker import MaxNLocator

    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig
