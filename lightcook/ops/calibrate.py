"""One block-by-block calibration pass for the one-shot methods (SparseGPT, GPTQ, ...), in pure torch.

:func:`sequential_pass` runs the calibration batches through a decoder stack one repeated block
(transformer layer) at a time, the sequential scheme of GPTQ / SparseGPT: the inputs of the first
block are caught once (with its keyword arguments: attention mask, position ids / embeddings; the
cache is off), then every block sees the outputs of the blocks before it *after* they were
compressed. For each block, forward hooks accumulate every targeted Linear's input Hessian
``H = 2 XᵀX / rows`` (float32; ``X`` is the layer input, ``(rows, in)``, for ``nn.Linear`` and GPT-2's
``Conv1D`` alike), ``H`` is dampened (:func:`dampen_`) and handed to ``visit(name, module, H)``, which
may change the module's weight (and mask) in place; the block's outputs are then recomputed with the
changed weights and become the next block's inputs. Memory: one block's activations plus one ``H``
per targeted Linear of that block.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> net = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> batches = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(2)]
    >>> seen = []
    >>> def halve(name, module, hessian):  # a "compression": halve the weight, record H's shape
    ...     module.weight.mul_(0.5)
    ...     seen.append((name, tuple(hessian.shape)))
    >>> visited = sequential_pass(net, batches, ["model.layers.0.mlp.down_proj",
    ...                                          "model.layers.1.self_attn.q_proj", "lm_head"], halve)
    >>> seen
    [('model.layers.0.mlp.down_proj', (64, 64)), ('model.layers.1.self_attn.q_proj', (32, 32))]
    >>> visited == [name for name, _ in seen]  # lm_head lies outside the blocks: not visited
    True
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightcook.ops.architectures import Architecture, get_architecture, iter_layers
from lightcook.ops.names import is_conv1d

__all__ = ["HessianAccumulator", "Visit", "block_layers", "dampen_", "sequential_pass"]

#: ``visit(name, module, H)``: compress the Linear ``module`` (qualified ``name``) in place given its
#: dampened float32 input Hessian ``H`` ``(in, in)``; the pass feeds the changed weights onward.
Visit = Callable[[str, nn.Module, Tensor], None]


class HessianAccumulator:
    """Running ``XᵀX`` (float32) and row count of one layer's inputs; :meth:`hessian` gives ``2 XᵀX / rows``.

    Example:
        >>> acc = HessianAccumulator(2, torch.device("cpu"))
        >>> acc.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        >>> acc.hessian()
        tensor([[2., 2.],
                [2., 4.]])
    """

    def __init__(self, features: int, device: torch.device) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)  # (in, in)
        self.rows = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x`` ``(..., in)``."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, in)
        self.sum.addmm_(flat.T, flat)
        self.rows += flat.shape[0]

    def hessian(self) -> Tensor:
        """``2 XᵀX / rows`` (zeros before any row was added)."""
        return self.sum * (2.0 / self.rows.clamp(min=1.0))


@torch.no_grad()
def dampen_(hessian: Tensor, percdamp: float = 0.01) -> Tensor:
    """Add ``percdamp`` x the mean diagonal to the diagonal of ``hessian``, in place, and return it.

    A diagonal entry still zero afterwards (an input that never varied, with ``percdamp=0`` or an
    all-zero ``H``) becomes 1, so the matrix stays invertible.

    Raises:
        ValueError: ``percdamp`` is negative.

    Example:
        >>> dampen_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), 0.5)
        tensor([[2.5000, 0.0000],
                [0.0000, 0.5000]])
    """
    if percdamp < 0:
        raise ValueError(f"percdamp: must be >= 0, got {percdamp!r}")
    diag = hessian.diagonal()
    diag.add_(percdamp * diag.mean())
    diag.masked_fill_(diag <= 0, 1.0)
    return hessian


def block_layers(
    network: nn.Module,
    names: Iterable[str],
    architecture: str | Mapping[str, Any] | Architecture | None = None,
) -> dict[str, list[str]]:
    """The repeated blocks of ``network``'s decoder stack (dotted path -> the ``names`` inside it).

    Every block appears, in order, also those holding none of ``names``; names outside every block
    (``lm_head``, embeddings) are left out.

    Raises:
        NotImplementedError: the layout has several stacks (an encoder-decoder such as T5).
        ValueError: no known layout (see :func:`~lightcook.ops.architectures.get_architecture`).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> net = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
        >>> block_layers(net, ["transformer.h.1.mlp.c_fc", "lm_head"])
        {'transformer.h.0': [], 'transformer.h.1': ['transformer.h.1.mlp.c_fc']}
    """
    arch = get_architecture(network, architecture)
    if len(arch.stacks) != 1:
        raise NotImplementedError(
            f"sequential calibration: architecture {arch.name!r} has {len(arch.stacks)} layer stacks "
            f"({', '.join(s.name for s in arch.stacks)}); only decoder-only models are supported"
        )
    wanted = list(names)
    blocks = [path for _stack, _i, path, _layer in iter_layers(network, arch)]
    return {path: [n for n in wanted if n.startswith(path + ".")] for path in blocks}


class _Caught(Exception):
    """Stops the forward pass once the first block's inputs are recorded."""


def _catch_inputs(network: nn.Module, first: nn.Module, batches: Iterable[Any]) -> list[tuple[Any, ...]]:
    """``(hidden, args, kwargs)`` of the first block for every batch (the forward stops there)."""
    caught: list[tuple[Any, ...]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if "hidden_states" in kwargs:
            caught.append((kwargs.pop("hidden_states"), args, kwargs))
        else:
            caught.append((args[0], args[1:], kwargs))
        raise _Caught

    no_cache = "use_cache" in inspect.signature(network.forward).parameters
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Caught):
                _forward(network, batch, no_cache)
    finally:
        handle.remove()
    return caught


def _forward(network: nn.Module, batch: Any, no_cache: bool) -> None:
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        network(**kwargs, **({"use_cache": False} if no_cache else {}))
    else:
        network(batch)


def _run_block(block: nn.Module, caught: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The block's outputs for every caught input, as the next block's ``(hidden, args, kwargs)``."""
    outputs = []
    for hidden, args, kwargs in caught:
        out = block(hidden, *args, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple | list) else out, args, kwargs))
    return outputs


def _accumulate(modules: Mapping[str, nn.Module]) -> tuple[dict[str, HessianAccumulator], list[Any]]:
    accs, handles = {}, []
    for name, module in modules.items():
        weight = cast(Tensor, module.weight)
        features = weight.shape[0] if is_conv1d(module) else weight.shape[-1]  # Conv1D: (in, out)
        accs[name] = acc = HessianAccumulator(int(features), weight.device)
        handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    return accs, handles


@torch.no_grad()
def sequential_pass(
    network: nn.Module,
    batches: Iterable[Any],
    layers: Iterable[str],
    visit: Visit,
    *,
    percdamp: float = 0.01,
    reduce: Callable[[Tensor], Any] | None = None,
    architecture: str | Mapping[str, Any] | Architecture | None = None,
    progress: bool = False,
) -> list[str]:
    """Calibrate block by block and call ``visit(name, module, H)`` for every targeted Linear in a block.

    Args:
        network: a decoder-only model with a registered layout (Llama / Mistral / Qwen2, GPT-2, ...).
            Run it in eval mode; the caller chooses device and autocast.
        batches: calibration batches: mappings of forward keyword arguments (``labels`` dropped,
            ``use_cache=False`` added when the forward takes it) or input-id tensors.
        layers: qualified names (in ``network``) of the Linear / ``Conv1D`` layers to visit; a mapping
            of names to modules works too. Names outside the repeated blocks are not visited.
        visit: called once per targeted layer, in the order of ``layers`` within each block, with the
            layer's name, the module and its dampened float32 Hessian ``2 XᵀX / rows`` ``(in, in)``.
            It may change the module's weight (and buffers) in place: the pass recomputes the block's
            outputs with them, and those feed the next block.
        percdamp: damping, a fraction of the mean diagonal added to the diagonal (:func:`dampen_`).
        reduce: called on each ``XᵀX`` sum and row count before ``H`` is formed, to sum them in place
            across processes (DDP); ``None``: one process.
        architecture: the layout, when ``config.model_type`` does not name one.
        progress: print a progress line over the blocks to stderr.

    Returns:
        The names visited, in order.

    Raises:
        NotImplementedError: an encoder-decoder layout (T5).
        ValueError: no known layout, ``percdamp < 0``.
        RuntimeError: no calibration batch reached the first block.
    """
    if percdamp < 0:
        raise ValueError(f"percdamp: must be >= 0, got {percdamp!r}")
    blocks = block_layers(network, layers, architecture)
    paths = list(blocks)
    caught = _catch_inputs(network, network.get_submodule(paths[0]), batches)
    if not caught:
        raise RuntimeError("sequential calibration: no calibration batch reached the first block")
    visited: list[str] = []
    started = time.perf_counter()
    for index, path in enumerate(paths):
        block = network.get_submodule(path)
        if blocks[path]:
            _calibrate_block(network, block, caught, blocks[path], visit, percdamp, reduce)
            visited += blocks[path]
        if index + 1 < len(paths):  # the last block's outputs feed nothing we compress
            caught = _run_block(block, caught)
        if progress:
            _progress(index + 1, len(paths), time.perf_counter() - started)
    return visited


def _calibrate_block(
    network: nn.Module,
    block: nn.Module,
    caught: list[tuple[Any, ...]],
    names: list[str],
    visit: Visit,
    percdamp: float,
    reduce: Callable[[Tensor], Any] | None,
) -> None:
    modules = {name: network.get_submodule(name) for name in names}
    accs, handles = _accumulate(modules)
    try:
        for hidden, args, kwargs in caught:
            block(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        acc = accs.pop(name)
        if reduce is not None:
            reduce(acc.sum)
            reduce(acc.rows)
        visit(name, modules[name], dampen_(acc.hessian(), percdamp))
        del acc  # free this layer's H before the next one


def _progress(done: int, total: int, seconds: float) -> None:
    end = "\n" if done == total else ""
    print(
        f"\rsequential calibration: block {done}/{total} ({seconds:.1f} s)",
        end=end,
        file=sys.stderr,
        flush=True,
    )
