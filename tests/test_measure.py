"""lightcook.measure against references: perplexity = exp of Hugging Face's own loss; greedy decode =
``generate``; interleaving order and medians with an injected fake clock (no real timing); machine
facts from a given /proc/cpuinfo; safetensors payload and parameter bytes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from lightcook import io
from lightcook.measure import (
    IGNORE_INDEX,
    bytes_on_disk,
    generation_speed,
    greedy_decode,
    interleaved,
    interleaved_runs,
    loaded_bytes,
    machine,
    parameter_bytes,
    peak_memory,
    perplexity,
    prefill_and_decode,
    safetensors_payload,
)
from tests.helpers import TINY_LLAMA


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def batch(seed: int, rows: int = 2, length: int = 12, ignore: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :ignore] = IGNORE_INDEX  # e.g. a prompt that is not scored
    return {"input_ids": ids, "labels": labels}


# --------------------------------------------------------------------------- perplexity


def test_perplexity_is_exp_of_the_hf_loss(llama):
    one = batch(0)
    with torch.no_grad():
        loss = float(llama(**one).loss)
    ppl = perplexity(llama, [one])
    assert ppl.tokens == 2 * 11 and ppl.value == pytest.approx(math.exp(loss), rel=1e-5)
    assert ppl.nll == pytest.approx(loss * 22, rel=1e-5)


def test_perplexity_weights_batches_by_their_scored_tokens(llama):
    batches = [batch(1, ignore=0), batch(2, rows=3, ignore=5)]
    with torch.no_grad():
        losses = [float(llama(**b).loss) for b in batches]
    counts = [2 * 11, 3 * 7]  # labels[:, 1:] that are not -100 (labels 1..4 of each row are)
    expected = math.exp(sum(loss * n for loss, n in zip(losses, counts)) / sum(counts))
    ppl = perplexity(llama, batches)
    assert ppl.tokens == sum(counts) and ppl.value == pytest.approx(expected, rel=1e-5)
    # the unweighted mean of the two losses is a different number: the weighting is what is tested
    assert ppl.value != pytest.approx(math.exp(sum(losses) / 2), rel=1e-4)


def test_encoder_decoder_needs_the_identity_alignment():
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
        )
    ).eval()
    ids = torch.randint(1, 64, (2, 7))
    data = [{"input_ids": ids, "labels": ids.flip(1)}]
    with torch.no_grad():
        loss = float(t5(**data[0]).loss)
    same = perplexity(t5, data, align=lambda logits, labels: (logits, labels))
    assert same.tokens == 14 and same.value == pytest.approx(math.exp(loss), rel=1e-5)
    assert perplexity(t5, data).tokens == 12  # the causal shift drops one token per row


def test_perplexity_restores_modes_and_applies_prepare_and_device(llama):
    llama.train()
    llama.model.layers[0].eval()
    seen = []

    def prepare(b: dict) -> dict:
        seen.append(b["input_ids"].device.type)
        return {**b, "labels": b["labels"].masked_fill(b["input_ids"] % 2 == 0, IGNORE_INDEX)}

    one = batch(3)
    ppl = perplexity(llama, [one], prepare=prepare, device="cpu")
    assert llama.training and not llama.model.layers[0].training and llama.model.layers[1].training
    assert seen == ["cpu"] and ppl.tokens == int((one["input_ids"][:, 1:] % 2 == 1).sum())
    llama.eval()


def test_perplexity_without_tokens_or_labels(llama):
    empty = batch(4, ignore=12)
    assert perplexity(llama, [empty]) == (None, 0, 0.0)
    with pytest.raises(KeyError, match="no 'labels'"):
        perplexity(llama, [{"input_ids": empty["input_ids"]}])


# --------------------------------------------------------------------------- timing with a fake clock


class FakeClock:
    """Time moves only when a timed function runs: each call of ``name`` takes the next of its durations."""

    def __init__(self, durations: dict[str, list[float]]) -> None:
        self.now, self.calls, self.durations = 0.0, [], {k: list(v) for k, v in durations.items()}

    def __call__(self) -> float:
        return self.now

    def fn(self, name: str):
        def run() -> None:
            self.calls.append(name)
            self.now += self.durations[name].pop(0)

        return run


def test_interleaved_rounds_order_and_medians():
    clock = FakeClock({"a": [100.0, 5.0, 1.0, 3.0], "b": [100.0, 2.0, 9.0, 2.0]})  # first: warm-up
    medians = interleaved({"a": clock.fn("a"), "b": clock.fn("b")}, repeats=3, clock=clock)
    assert clock.calls == ["a", "b"] * 4  # one warm-up round, then three interleaved rounds
    assert medians == {"a": 3.0, "b": 2.0}  # the warm-up's 100 s is not a sample


def test_interleaved_rotation_inner_and_sync():
    clock = FakeClock({"a": [1.0] * 6, "b": [3.0] * 6})
    syncs = []
    medians = interleaved(
        {"a": clock.fn("a"), "b": clock.fn("b")},
        repeats=2,
        warmup=0,
        inner=3,
        sync=lambda: syncs.append(clock.calls.copy()),
        clock=clock,
        rotate=True,
    )
    assert clock.calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert medians == {"a": 1.0, "b": 3.0}  # per call: each sample is 3 calls, divided by 3
    assert len(syncs) == 8 and syncs[1] == ["a"] * 3  # before start and before stop of every sample


def test_interleaved_fresh_factories_are_not_timed():
    clock = FakeClock({"work": [2.0, 2.0], "setup": [50.0, 50.0]})

    def factory():
        clock.fn("setup")()  # slow preparation: must not count
        return clock.fn("work")

    assert interleaved({"x": factory}, repeats=1, clock=clock, fresh=True) == {"x": 2.0}
    assert clock.calls == ["setup", "work", "setup", "work"]


def test_interleaved_runs_rotates_and_collects_samples():
    order = []
    samples = interleaved_runs(lambda k: order.append(k) or [float(len(order))] * 2, ["a", "b", "c"], 3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert samples["a"] == [1.0, 1.0, 6.0, 6.0, 8.0, 8.0]
    assert interleaved_runs(lambda k: order.append(k) or [0.0], ["x", "y"], 2, rotate=False) == {
        "x": [0.0, 0.0],
        "y": [0.0, 0.0],
    }
    assert order[-4:] == ["x", "y", "x", "y"]


@pytest.mark.parametrize(
    "kwargs",
    [{"fns": {}}, {"repeats": 0}, {"inner": 0}, {"warmup": -1}],
    ids=["empty", "repeats", "inner", "warmup"],
)
def test_interleaved_rejects_bad_arguments(kwargs):
    args = {"fns": {"a": lambda: None}, "repeats": 1, **kwargs}
    with pytest.raises(ValueError, match="interleaved: needs functions"):
        interleaved(**args)
    with pytest.raises(ValueError, match="interleaved_runs"):
        interleaved_runs(lambda k: [], [], 1)


# --------------------------------------------------------------------------- decode


def test_greedy_decode_equals_generate(llama):
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = llama.generate(
            prompt, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0
        )
    assert torch.equal(greedy_decode(llama, prompt, 6), reference)


def test_prefill_and_decode_times_one_forward_per_new_token(llama):
    forwards = []
    handle = llama.register_forward_hook(lambda *_: forwards.append(1))
    try:
        clock = lambda: float(len(forwards))  # noqa: E731  (one "second" per forward)
        prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(6))
        out = prefill_and_decode({"m": llama, "n": llama}, prompt, new_tokens=4, repeats=3, clock=clock)
    finally:
        handle.remove()
    assert out["prefill"] == {"m": 1.0, "n": 1.0}
    assert out["decode"] == {"m": 1.0, "n": 1.0}  # 4 forwards / 4 tokens: the fresh prefill is not timed
    assert out["tokens_per_second"] == {"m": 1.0, "n": 1.0}
    # prefill: (1 warm-up + 3) rounds x 2 models x 1; decode: 4 rounds x 2 models x (1 prefill + 4)
    assert len(forwards) == 8 + 40
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        prefill_and_decode({"m": llama}, prompt, 0, 1)


def test_greedy_decode_with_a_static_cache_equals_generate(llama):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = llama.generate(
            prompt, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0
        )
    assert torch.equal(greedy_decode(llama, prompt, 6, cache="static"), reference)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_prefill_and_decode_at_batch_2_with_time_to_first_token(llama, cache):
    shapes = []
    handle = llama.register_forward_hook(
        lambda _m, args, kwargs, out: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        clock = lambda: float(len(shapes))  # noqa: E731  (one "second" per forward)
        prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(6))
        out = prefill_and_decode({"m": llama}, prompt, 4, repeats=2, clock=clock, cache=cache, ttft=True)
    finally:
        handle.remove()
    assert out["prefill"] == {"m": 1.0} and out["prefill_tokens_per_second"] == {"m": 12.0}
    assert out["decode"] == {"m": 1.0} and out["tokens_per_second"] == {"m": 2.0}  # 2 rows per step
    assert out["ttft"] == {"m": 1.0}  # one batch-1 prefill; the pick of the first token is no forward
    assert shapes[-1] == (1, 6) and shapes.count((2, 1)) == 3 * 4  # ttft last; 3 decode rounds x 4 steps
    with pytest.raises(ValueError, match="cache: got 'paged'"):
        prefill_and_decode({"m": llama}, prompt, 1, 1, cache="paged")


def test_generation_speed_measures_every_batch_and_the_first_token_once(llama):
    ticks = iter(range(10_000))
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(7))
    out = generation_speed({"a": llama, "b": llama}, prompt, 2, 1, batches=(1, 3), clock=lambda: next(ticks))
    assert sorted(out["batches"]) == [1, 3] and out["ttft"] == {"a": 1.0, "b": 1.0}
    assert out["batches"][3]["tokens_per_second"] == {"a": 6.0, "b": 6.0}  # 3 rows / (1/2 s per step)
    assert out["batches"][3]["prefill_tokens_per_second"] == {"a": 15.0, "b": 15.0}
    for bad in ((), (0,), (2, 2)):
        with pytest.raises(ValueError, match="batches: must be distinct integers >= 1"):
            generation_speed({"a": llama}, prompt, 2, 1, batches=bad)


def test_peak_memory_sees_a_temporary_and_loaded_bytes_count_buffers():
    grown = peak_memory(lambda: torch.ones(8, 1024, 1024).add_(1).sum())  # 32 MiB
    assert grown is None or grown >= 30 * 2**20
    layer = torch.nn.Linear(4, 2)
    layer.register_buffer("codes", torch.zeros(8, dtype=torch.int8))
    assert loaded_bytes(layer) == parameter_bytes(layer) + 8 == 48


# --------------------------------------------------------------------------- machine, bytes


CPUINFO = """processor : 0
model name : Test CPU @ 2.0GHz
physical id : 0
cpu cores : 2
flags : fpu avx2 avx512f avx512_vnni

processor : 1
model name : Test CPU @ 2.0GHz
physical id : 1
cpu cores : 2
flags : fpu avx2 avx512f avx512_vnni
"""


def test_machine_facts():
    facts = machine(CPUINFO)
    assert facts["cpu"] == "Test CPU @ 2.0GHz" and facts["physical_cores"] == 4  # 2 sockets x 2 cores
    assert facts["isa"] == ["avx2", "avx512f", "avx512_vnni"]
    assert facts["torch"] == torch.__version__ and facts["torch_threads"] == torch.get_num_threads()
    assert facts["cuda"] is None if not torch.cuda.is_available() else isinstance(facts["cuda"], str)
    assert len(facts["load_average"]) == 3 and facts["date"][:2] == "20"
    bare = machine("")
    assert bare["physical_cores"] is None and bare["isa"] == [] and bare["cpu"]


def test_safetensors_payload_and_parameter_bytes(tmp_path):
    save_file(
        {"a": torch.zeros(10, 3), "b": torch.zeros(7, dtype=torch.int8)}, str(tmp_path / "x.safetensors")
    )
    save_file({"c": torch.zeros(2, dtype=torch.bfloat16)}, str(tmp_path / "y.safetensors"))
    (tmp_path / "manifest.json").write_text("{}")
    assert safetensors_payload(tmp_path) == 10 * 3 * 4 + 7 + 2 * 2
    assert bytes_on_disk is io.bytes_on_disk and bytes_on_disk(tmp_path) > safetensors_payload(tmp_path)
    (tmp_path / "z.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"z\.safetensors: 3 bytes, too short"):
        safetensors_payload(tmp_path)
    with torch.device("meta"):
        tied = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}))
    distinct = sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert parameter_bytes(tied, torch.bfloat16) == 2 * distinct and parameter_bytes(tied) == 4 * distinct
