"""The sequential calibration pass against plain full forward passes of the Hugging Face models:
each layer's Hessian is that of its inputs in the model whose earlier blocks are already compressed;
GPT-2 Conv1D, padded batches, layers outside the blocks, the cross-process reduction, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from lightcook.ops.calibrate import HessianAccumulator, block_layers, dampen_, sequential_pass
from tests.helpers import TINY, VOCAB

LLAMA_BLOCK0 = [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
LLAMA_BLOCK1 = [f"model.layers.1.{p}" for p in ("self_attn.k_proj", "mlp.gate_proj")]


def tiny(kind: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    return auto.from_config(AutoConfig.for_model(**TINY[kind])).eval()


def batches(count: int = 3, seed: int = 0, padded: bool = False) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
        mask = torch.ones_like(ids)
        if padded:
            mask[0, 8:] = 0  # right padding in the first row
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return out


def reference_hessians(model, data, names, percdamp: float = 0.01) -> dict[str, torch.Tensor]:
    """Dampened ``2 XᵀX / rows`` of each layer's inputs over full forward passes (float64)."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _m, a, n=name: inputs[n].append(a[0]))
        for name in names
    ]
    with torch.no_grad():
        for batch in data:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for handle in handles:
        handle.remove()
    result = {}
    for name, xs in inputs.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        h = 2 * x.T @ x / x.shape[0]
        result[name] = h + percdamp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    return result


def recording(seen: dict[str, torch.Tensor], change=None):
    def visit(name, module, hessian):
        seen[name] = hessian.clone()
        if change is not None:
            change(module)

    return visit


@pytest.mark.parametrize("padded", [False, True])
def test_unchanged_weights_give_the_hessians_of_a_full_forward(padded):
    model, data = tiny(), batches(padded=padded)
    names = LLAMA_BLOCK0 + LLAMA_BLOCK1
    seen: dict[str, torch.Tensor] = {}
    visited = sequential_pass(model, data, names, recording(seen))
    assert visited == names
    for name, expected in reference_hessians(model, data, names).items():
        torch.testing.assert_close(seen[name].double(), expected, rtol=1e-4, atol=1e-5)


def test_later_blocks_see_the_outputs_of_the_compressed_blocks_before_them():
    model, data = tiny(), batches()
    halve = lambda module: module.weight.mul_(0.5)  # noqa: E731  (the "compression")
    seen: dict[str, torch.Tensor] = {}
    sequential_pass(model, data, LLAMA_BLOCK0 + LLAMA_BLOCK1, recording(seen, halve))
    before = tiny()  # the same weights, block 0 compressed by hand
    compressed = copy.deepcopy(before)
    with torch.no_grad():
        for name in LLAMA_BLOCK0:
            compressed.get_submodule(name).weight.mul_(0.5)
    expected = reference_hessians(compressed, data, LLAMA_BLOCK1)
    stale = reference_hessians(before, data, LLAMA_BLOCK1)
    for name in LLAMA_BLOCK1:
        torch.testing.assert_close(seen[name].double(), expected[name], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(seen[name].double(), stale[name], rtol=1e-3)
    # within a block every H comes from the block's inputs before any of its layers changed
    first = reference_hessians(before, data, LLAMA_BLOCK0)
    torch.testing.assert_close(seen[LLAMA_BLOCK0[-1]].double(), first[LLAMA_BLOCK0[-1]], rtol=1e-4, atol=1e-5)
    for name in LLAMA_BLOCK0 + LLAMA_BLOCK1:
        torch.testing.assert_close(
            model.get_submodule(name).weight,
            compressed.get_submodule(name).weight * (0.5 if name in LLAMA_BLOCK1 else 1.0),
        )


def test_gpt2_conv1d_inputs_and_lm_head_left_out():
    model, data = tiny("gpt2"), batches()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "lm_head"]
    seen: dict[str, torch.Tensor] = {}
    assert sequential_pass(model, data, names, recording(seen)) == names[:2]
    assert seen["transformer.h.0.attn.c_attn"].shape == (32, 32)
    assert seen["transformer.h.1.mlp.c_proj"].shape == (128, 128)  # Conv1D weight (in, out) = (128, 32)
    for name, expected in reference_hessians(model, data, names[:2]).items():
        torch.testing.assert_close(seen[name].double(), expected, rtol=1e-4, atol=1e-5)


def test_reduce_is_applied_to_sums_and_row_counts():
    model, data = tiny(), batches()
    plain: dict[str, torch.Tensor] = {}
    doubled: dict[str, torch.Tensor] = {}
    calls: list[tuple[int, ...]] = []

    def twice(tensor):  # two ranks that saw the same batches
        calls.append(tuple(tensor.shape))
        tensor.mul_(2)

    sequential_pass(model, data, LLAMA_BLOCK1, recording(plain))
    sequential_pass(model, data, LLAMA_BLOCK1, recording(doubled), reduce=twice)
    assert calls == [(32, 32), (), (32, 32), ()]
    for name in LLAMA_BLOCK1:
        torch.testing.assert_close(doubled[name], plain[name])


def test_progress_line_on_stderr(capsys):
    sequential_pass(tiny(), batches(1), LLAMA_BLOCK1, lambda *_: None, progress=True)
    err = capsys.readouterr().err
    assert "sequential calibration: block 1/2" in err and err.rstrip().endswith(")") and "block 2/2" in err


def test_block_layers_and_errors():
    model = tiny()
    assert block_layers(model, LLAMA_BLOCK1 + ["lm_head"]) == {
        "model.layers.0": [],
        "model.layers.1": LLAMA_BLOCK1,
    }
    with pytest.raises(
        NotImplementedError, match=r"architecture 't5' has 2 layer stacks \(encoder, decoder\)"
    ):
        sequential_pass(tiny("t5"), batches(), ["encoder.block.0.layer.0.SelfAttention.q"], lambda *_: None)
    with pytest.raises(RuntimeError, match="no calibration batch reached the first block"):
        sequential_pass(model, [], LLAMA_BLOCK1, lambda *_: None)
    with pytest.raises(ValueError, match=r"percdamp: must be >= 0"):
        sequential_pass(model, batches(), LLAMA_BLOCK1, lambda *_: None, percdamp=-0.1)


def test_dampen_and_accumulator():
    acc = HessianAccumulator(3, torch.device("cpu"))
    x = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -1.0]])
    acc.add(x[:1])
    acc.add(x[1:])
    torch.testing.assert_close(acc.hessian(), x.T @ x)
    h = dampen_(acc.hessian(), 0.1)
    mean = float((x.T @ x).diagonal().mean())
    torch.testing.assert_close(h.diagonal(), torch.tensor([10 + 0.1 * mean, 0.1 * mean, 5 + 0.1 * mean]))
    assert dampen_(torch.zeros(2, 2), 0.01).diagonal().tolist() == [1.0, 1.0]


LLAMA_ALL0 = [
    f"model.layers.0.{p}"
    for p in (
        "mlp.down_proj",  # given out of order: true_sequential visits in forward order
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    )
]


def test_true_sequential_visits_input_groups_in_forward_order_each_after_the_ones_before():
    model, data = tiny(), batches()
    halve = lambda module: module.weight.mul_(0.5)  # noqa: E731
    seen: dict[str, torch.Tensor] = {}
    visited = sequential_pass(model, data, LLAMA_ALL0, recording(seen, halve), true_sequential=True)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert visited == [attn + "q_proj", attn + "k_proj", attn + "v_proj", attn + "o_proj"] + [
        mlp + "gate_proj",
        mlp + "up_proj",
        mlp + "down_proj",
    ]
    # the reference: full forwards of the original model with the groups before each one halved by hand
    steps = [
        [attn + "q_proj", attn + "k_proj", attn + "v_proj"],
        [attn + "o_proj"],
        [mlp + "gate_proj", mlp + "up_proj"],
    ]
    reference, done = tiny(), []
    for group, following in zip([[]] + steps, steps + [[mlp + "down_proj"]], strict=True):
        with torch.no_grad():
            for name in group:
                reference.get_submodule(name).weight.mul_(0.5)
        done += group
        expected = reference_hessians(reference, data, following)
        for name in following:
            torch.testing.assert_close(seen[name].double(), expected[name], rtol=1e-4, atol=1e-5)
    stale = reference_hessians(tiny(), data, [attn + "o_proj"])[attn + "o_proj"]
    assert not torch.allclose(seen[attn + "o_proj"].double(), stale, rtol=1e-3)


def _outputs(model, data, name):
    """Inputs and outputs of layer ``name`` over full forwards."""
    xs, ys = [], []
    layer = model.get_submodule(name)

    def keep(_module, args, out):
        xs.append(args[0])
        ys.append(out)

    handle = layer.register_forward_hook(keep)
    with torch.no_grad():
        for batch in data:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]), torch.cat(
        [y.reshape(-1, y.shape[-1]) for y in ys]
    )


def test_dense_targets_fit_each_layer_to_the_dense_models_outputs():
    data, target = batches(4), "model.layers.1.self_attn.q_proj"
    dense = tiny()
    model = tiny()

    def compress(name, module, hessian):  # block 0 is "compressed", the target layer only observed
        if name.startswith("model.layers.0."):
            module.weight.mul_(0.7)

    names = LLAMA_BLOCK0 + [target]
    sequential_pass(model, data, names, compress, dense_targets=True, dense_damp=0.0)
    x_dense, y_dense = _outputs(dense, data, target)
    x_hat, _ = _outputs(model, data, target)
    fitted = model.get_submodule(target).weight
    reference = torch.linalg.lstsq(x_hat.double(), y_dense.double()).solution.T  # outside reference
    torch.testing.assert_close(fitted.double(), reference, rtol=1e-3, atol=1e-4)
    before = dense.get_submodule(target).weight
    assert (x_hat @ fitted.T - y_dense).norm() < 0.9 * (x_hat @ before.T - y_dense).norm()


def test_dense_targets_leave_weights_alone_when_nothing_was_compressed_and_skip_pruned_layers():
    data = batches()
    model = tiny()
    sequential_pass(model, data, LLAMA_ALL0, lambda *_: None, true_sequential=True, dense_targets=True)
    for name in LLAMA_ALL0:
        torch.testing.assert_close(
            model.get_submodule(name).weight, tiny().get_submodule(name).weight, atol=1e-5, rtol=1e-4
        )
    # a layer whose mask already drops weights keeps them (the dense fit would refill the pruned entries)
    model = tiny()
    down = model.get_submodule("model.layers.1.mlp.down_proj")
    mask = torch.rand_like(down.weight) > 0.5
    down.register_buffer("weight_mask", mask)
    with torch.no_grad():
        down.weight.mul_(mask)
    kept = down.weight.clone()
    shrink = lambda name, module, _h: module.weight.mul_(0.5) if name.startswith("model.layers.0") else None  # noqa: E731
    sequential_pass(model, data, LLAMA_ALL0 + ["model.layers.1.mlp.down_proj"], shrink, dense_targets=True)
    assert torch.equal(down.weight, kept)


def test_dense_target_options_are_checked():
    with pytest.raises(ValueError, match="dense_damp"):
        sequential_pass(
            tiny(), batches(1), LLAMA_BLOCK1, lambda *_: None, dense_targets=True, dense_damp=-1.0
        )
    acc = HessianAccumulator(2, torch.device("cpu"), cross=True)
    with pytest.raises(ValueError, match="dense"):
        acc.add(torch.ones(3, 2))


@pytest.mark.parametrize("make", ["sparsity", "quant"])
def test_configs_refuse_dense_targets_without_true_sequential(make):
    from lightcook.ops.quant import QuantConfig
    from lightcook.ops.sparsity import NMConfig

    config = {"sparsity": NMConfig, "quant": QuantConfig}[make]
    with pytest.raises(ValueError, match=r"^dense_targets: needs true_sequential=true"):
        config(true_sequential=False, dense_targets=True)
    assert config(true_sequential=False, dense_targets=False).dense_targets is False
    assert config().true_sequential and config().dense_targets  # the defaults: both on
