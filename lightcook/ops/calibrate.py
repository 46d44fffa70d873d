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

Two refinements, both on by default in the callbacks:

- **true sequential** (``true_sequential=True``): the Linears of a block are visited in groups that
  share one input, in forward order (Llama: q/k/v, o, gate/up, down), and each group's ``H`` is
  taken *after* the groups before it were compressed — so ``o_proj`` sees the outputs of the
  compressed q/k/v, not of the dense ones.
- **dense targets** (``dense_targets=True``): the pass also runs the *dense* model alongside (a
  reference copy of each block, one at a time) and, before ``visit``, moves each Linear's weight to
  the ridge least-squares map from the compressed inputs ``X̂`` to the *dense* outputs ``XWᵀ``:
  ``W* = (W XᵀX̂ + λW)(X̂ᵀX̂ + λI)⁻¹`` (``λ`` = ``dense_damp`` x mean diagonal). Since
  ``‖XWᵀ − X̂Ŵᵀ‖² + λ‖Ŵ − W‖² = tr((Ŵ − W*)(H + λI)(Ŵ − W*)ᵀ) + const`` exactly, SparseGPT / GPTQ
  on ``W*`` with the dampened ``H`` minimise the error against the dense layer's output rather
  than against the output of the layer fed compressed inputs, so errors stop piling up block after
  block (the asymmetric calibration of GPTAQ, Li et al. 2025, reduced to one least-squares solve).
  Layers whose mask already holds zeros (GPTQ after SparseGPT) keep their weights: the unmasked
  ``W*`` would refill the pruned entries.

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
import copy
import inspect
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightcook.ops.architectures import Architecture, get_architecture, iter_layers
from lightcook.ops.names import MASK, is_conv1d
from lightcook.ops.sparsity import as_out_in, dense_weight

__all__ = [
    "HessianAccumulator",
    "Visit",
    "block_layers",
    "dampen_",
    "dense_target_weight",
    "sequential_pass",
]

#: ``visit(name, module, H)``: compress the Linear ``module`` (qualified ``name``) in place given its
#: dampened float32 input Hessian ``H`` ``(in, in)``; the pass feeds the changed weights onward.
Visit = Callable[[str, nn.Module, Tensor], None]


class HessianAccumulator:
    """Running ``XᵀX`` (float32) and row count of one layer's inputs; :meth:`hessian` gives ``2 XᵀX / rows``.

    With ``cross=True`` it also sums ``XᵀD`` for the matching rows ``D`` of the dense model's input
    to the same layer (:meth:`cross_term` gives ``2 XᵀD / rows``).

    Example:
        >>> acc = HessianAccumulator(2, torch.device("cpu"))
        >>> acc.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        >>> acc.hessian()
        tensor([[2., 2.],
                [2., 4.]])
    """

    def __init__(self, features: int, device: torch.device, cross: bool = False) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)  # (in, in)
        self.rows = torch.zeros((), dtype=torch.float32, device=device)
        self.cross = torch.zeros_like(self.sum) if cross else None  # (in, in): XᵀD

    def add(self, x: Tensor, dense: Tensor | None = None) -> None:
        """Add the rows of ``x`` ``(..., in)`` (and, with ``cross``, of the dense input ``dense``, same shape)."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, in)
        self.sum.addmm_(flat.T, flat)
        self.rows += flat.shape[0]
        if self.cross is not None:
            if dense is None or dense.shape != x.shape:
                raise ValueError("dense: the dense input must be given with the shape of x")
            self.cross.addmm_(flat.T, dense.detach().reshape(flat.shape).float())

    def hessian(self) -> Tensor:
        """``2 XᵀX / rows`` (zeros before any row was added)."""
        return self.sum * (2.0 / self.rows.clamp(min=1.0))

    def cross_term(self) -> Tensor:
        """``2 XᵀD / rows`` (needs ``cross=True``)."""
        if self.cross is None:
            raise ValueError("cross_term: the accumulator was made with cross=False")
        return self.cross * (2.0 / self.rows.clamp(min=1.0))


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


@torch.no_grad()
def dense_target_weight(weight: Tensor, hessian: Tensor, cross: Tensor, damp: float = 0.01) -> Tensor:
    """``W* = (W Cᵀ + λW)(H + λI)⁻¹``: the ridge least-squares weight mapping the compressed inputs to the
    dense outputs (``H = 2X̂ᵀX̂/r``, ``C = 2X̂ᵀX/r`` for compressed inputs ``X̂`` and dense inputs ``X``;
    ``λ = damp`` x mean diagonal of ``H``, which pulls ``W*`` towards ``W`` where the inputs say little).

    Args:
        weight: ``W`` ``(out, in)``.
        hessian: ``H`` ``(in, in)``, undampened.
        cross: ``C`` ``(in, in)``.
        damp: ridge weight, a fraction of the mean diagonal (> 0 keeps inputs that never varied at ``W``).

    Returns:
        ``W*`` ``(out, in)``, float32.

    Raises:
        ValueError: ``damp`` is negative.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, noise = torch.randn(512, 4), 0.1 * torch.randn(512, 4)
        >>> w, x_hat = torch.randn(3, 4), x + noise  # the compressed model's inputs drifted
        >>> ws = dense_target_weight(w, 2 * x_hat.T @ x_hat / 512, 2 * x_hat.T @ x / 512, damp=0.0)
        >>> reference = torch.linalg.lstsq(x_hat, x @ w.T).solution.T  # outside reference
        >>> torch.allclose(ws, reference, atol=1e-4)
        True
    """
    if damp < 0:
        raise ValueError(f"dense_damp: must be >= 0, got {damp!r}")
    w, h = weight.detach().float(), hessian.float()
    lam = damp * float(h.diagonal().mean())
    system = h + lam * torch.eye(len(h), dtype=h.dtype, device=h.device)
    rhs = cross.float() @ w.T + lam * w.T  # (in, out) = (H + λI) W*ᵀ
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor).T
    return torch.linalg.lstsq(system, rhs).solution.T  # singular (λ = 0, inputs that never varied)


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


class _GroupDone(Exception):
    """Stops a block's forward once every layer of the group being calibrated has seen its input."""


def _features(module: nn.Module) -> int:
    weight = cast(Tensor, module.weight)
    return int(weight.shape[0] if is_conv1d(module) else weight.shape[-1])  # Conv1D: (in, out)


def _on_inputs(modules: Mapping[str, nn.Module], record: Callable[[str, Tensor], None]) -> list[Any]:
    """Pre-hooks calling ``record(name, input)``; the last layer of ``modules`` to fire stops the forward."""
    pending: set[str] = set()

    def hook(name: str, _module: nn.Module, args: tuple) -> None:
        if name not in pending:  # a new batch after a forward that did not reach every layer
            pending.update(modules)
        record(name, args[0])
        pending.discard(name)
        if not pending:
            pending.update(modules)  # ready for the next batch
            raise _GroupDone

    pending.update(modules)
    return [
        m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, mod, args)) for n, m in modules.items()
    ]


def _forward_block(block: nn.Module, item: tuple[Any, ...]) -> None:
    hidden, args, kwargs = item
    with contextlib.suppress(_GroupDone):
        block(hidden, *args, **kwargs)


def _input_groups(
    block: nn.Module, item: tuple[Any, ...], names: list[str], modules: Mapping[str, nn.Module]
) -> list[list[str]]:
    """``names`` in groups that share one input tensor, in the order the block's forward reaches them
    (layers the forward never reached come last, one group)."""
    order: list[tuple[str, Tensor]] = []  # the inputs themselves: an id() could be reused once freed

    def note(name: str, module: nn.Module, args: tuple) -> None:
        order.append((name, args[0]))

    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: note(n, m, a)) for n in names]
    try:
        hidden, args, kwargs = item
        block(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    last: Tensor | None = None
    seen: set[str] = set()
    for name, source in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and source is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = source
    rest = [n for n in names if n not in seen]
    return groups + ([rest] if rest else [])


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
    true_sequential: bool = False,
    dense_targets: bool = False,
    dense_damp: float = 0.01,
    reference: Callable[[nn.Module], nn.Module] | None = None,
) -> list[str]:
    """Calibrate block by block and call ``visit(name, module, H)`` for every targeted Linear in a block.

    Args:
        network: a decoder-only model with a registered layout (Llama / Mistral / Qwen2, GPT-2, ...).
            Run it in eval mode; the caller chooses device and autocast.
        batches: calibration batches: mappings of forward keyword arguments (``labels`` dropped,
            ``use_cache=False`` added when the forward takes it) or input-id tensors.
        layers: qualified names (in ``network``) of the Linear / ``Conv1D`` layers to visit; a mapping
            of names to modules works too. Names outside the repeated blocks are not visited.
        visit: called once per targeted layer with the layer's name, the module and its dampened
            float32 Hessian ``2 XᵀX / rows`` ``(in, in)``. It may change the module's weight (and
            buffers) in place: the pass recomputes the block's outputs with them, and those feed the
            next block.
        percdamp: damping, a fraction of the mean diagonal added to the diagonal (:func:`dampen_`).
        reduce: called on each ``XᵀX`` sum (and cross sum) and row count before ``H`` is formed, to
            sum them in place across processes (DDP); ``None``: one process.
        architecture: the layout, when ``config.model_type`` does not name one.
        progress: print a progress line over the blocks to stderr.
        true_sequential: visit a block's layers in groups sharing one input, in forward order, each
            group's ``H`` taken after the groups before it changed (else: one ``H`` per layer from
            one forward of the block, visited in the order of ``layers``).
        dense_targets: move each layer to :func:`dense_target_weight` (the least-squares map from
            the compressed inputs to the dense model's outputs) before ``visit``; the dense model
            runs alongside, one reference block at a time.
        dense_damp: the ridge weight of that map (fraction of the mean diagonal of ``H``).
        reference: makes the dense reference of one block before any layer of it is visited
            (default :func:`copy.deepcopy`; e.g. a copy with fake quantization switched off).

    Returns:
        The names visited, in order.

    Raises:
        NotImplementedError: an encoder-decoder layout (T5).
        ValueError: no known layout, ``percdamp < 0`` or ``dense_damp < 0``.
        RuntimeError: no calibration batch reached the first block.
    """
    if percdamp < 0:
        raise ValueError(f"percdamp: must be >= 0, got {percdamp!r}")
    if dense_damp < 0:
        raise ValueError(f"dense_damp: must be >= 0, got {dense_damp!r}")
    blocks = block_layers(network, layers, architecture)
    paths = list(blocks)
    caught = _catch_inputs(network, network.get_submodule(paths[0]), batches)
    if not caught:
        raise RuntimeError("sequential calibration: no calibration batch reached the first block")
    dense = list(caught) if dense_targets else None  # the dense model's stream (the embeddings are shared)
    visited: list[str] = []
    started = time.perf_counter()
    for index, path in enumerate(paths):
        block, names = network.get_submodule(path), blocks[path]
        ref = block
        if dense is not None and names:
            ref = (reference or copy.deepcopy)(block)
        if names:
            modules = {name: network.get_submodule(name) for name in names}
            groups = _input_groups(block, caught[0], names, modules) if true_sequential else [names]
            for group in groups:
                pair = None if dense is None else (ref, dense, path)
                _calibrate_group(
                    block, caught, {n: modules[n] for n in group}, visit, percdamp, reduce, pair, dense_damp
                )
            visited += [n for group in groups for n in group]
        if index + 1 < len(paths):  # the last block's outputs feed nothing we compress
            caught = _run_block(block, caught)
            if dense is not None:
                dense = _run_block(ref, dense)
        del ref
        if progress:
            _progress(index + 1, len(paths), time.perf_counter() - started)
    return visited


def _calibrate_group(
    block: nn.Module,
    caught: list[tuple[Any, ...]],
    modules: dict[str, nn.Module],
    visit: Visit,
    percdamp: float,
    reduce: Callable[[Tensor], Any] | None,
    pair: tuple[nn.Module, list[tuple[Any, ...]], str] | None,
    dense_damp: float,
) -> None:
    """Accumulate the group's Hessians over every caught input (with ``pair``: also the cross terms
    against the dense reference block), then correct and visit each layer."""
    accs = {
        n: HessianAccumulator(_features(m), cast(Tensor, m.weight).device, cross=pair is not None)
        for n, m in modules.items()
    }
    dense_inputs: dict[str, Tensor] = {}
    ref_handles: list[Any] = []
    if pair is not None:
        ref, _stream, path = pair
        refs = {n: ref.get_submodule(n[len(path) + 1 :]) for n in modules}
        ref_handles = _on_inputs(refs, lambda n, x: dense_inputs.__setitem__(n, x))
    handles = _on_inputs(modules, lambda n, x: accs[n].add(x, dense_inputs.get(n)))
    try:
        for i, item in enumerate(caught):
            if pair is not None:
                _forward_block(pair[0], pair[1][i])
            _forward_block(block, item)
            dense_inputs.clear()
    finally:
        for handle in handles + ref_handles:
            handle.remove()
    for name, module in modules.items():
        acc = accs.pop(name)
        if reduce is not None:
            reduce(acc.sum)
            reduce(acc.rows)
            if acc.cross is not None:
                reduce(acc.cross)
        hessian = acc.hessian()
        if acc.cross is not None and float(acc.rows) > 0 and not _pruned(module):
            stored = as_out_in(dense_weight(module).detach(), module)
            stored.copy_(dense_target_weight(stored, hessian, acc.cross_term(), dense_damp))
        visit(name, module, dampen_(hessian, percdamp))
        del acc, hessian  # free this layer's H before the next one


def _pruned(module: nn.Module) -> bool:
    """Whether the layer's mask already drops weights (then its weight is not moved: see the module doc)."""
    mask = getattr(module, MASK, None)
    return isinstance(mask, Tensor) and not bool(mask.all())


def _progress(done: int, total: int, seconds: float) -> None:
    end = "\n" if done == total else ""
    print(
        f"\rsequential calibration: block {done}/{total} ({seconds:.1f} s)",
        end=end,
        file=sys.stderr,
        flush=True,
    )
