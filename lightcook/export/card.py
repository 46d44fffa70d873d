"""The model card: the ``README.md`` that goes into every export folder lightcook writes.

A folder that leaves the machine it was made on (copied, uploaded to the Hugging Face Hub) has to
say what it is without lightcook around: which format, made from which model by which techniques
and command, what it measured (perplexity against a dense reference, bytes against the dense fp32
model, speed) and how to open it with the consumer that format is for. :func:`model_card` renders
that from :class:`CardFacts`: YAML front matter the Hub reads (``base_model``, ``library_name``,
``tags``, ``pipeline_tag``), then a Markdown body. Only the numbers that are given are printed; a
missing perplexity reads "not measured", nothing else is made up. :func:`write_model_card` writes
it as ``README.md`` atomically.

The four folder kinds (:data:`FORMATS`):

======================  ==========================================================================
``lightcook``           ``lightcook.json`` manifest; :func:`lightcook.export.load_compressed`, or
                        ``from_pretrained(..., trust_remote_code=True)`` with lightcook installed
``compressed-tensors``  ``config.json`` with a compressed-tensors ``quantization_config``; plain
                        transformers (``pip install compressed-tensors``) and vLLM
``gguf``                one ``.gguf`` file; llama.cpp, llama-cpp-python, transformers ``gguf_file=``
``transformers``        a plain ``save_pretrained`` folder (dense or uniformly sliced)
======================  ==========================================================================

Example:
    >>> import tempfile, yaml
    >>> facts = CardFacts(format="compressed-tensors", base_model="HuggingFaceTB/SmolLM2-135M",
    ...                   techniques=("nm", "quantized"), ppl=70.3, reference_ppl=52.61)
    >>> card = model_card(facts)
    >>> yaml.safe_load(card.split("---")[1])["tags"]
    ['lightcook', 'compressed', 'compressed-tensors', 'nm-sparse', 'quantized']
    >>> "| Perplexity vs reference | 1.34x |" in card, "pip install transformers compressed-tensors" in card
    (True, True)
    >>> write_model_card(tempfile.mkdtemp(), facts).name
    'README.md'
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightcook.io import write_text_atomic

__all__ = ["FORMATS", "TECHNIQUES", "CardFacts", "export_facts", "model_card", "write_model_card"]

FORMATS = ("lightcook", "compressed-tensors", "gguf", "transformers")

# technique name -> (Hub tag, what it is for a human reader)
TECHNIQUES: dict[str, tuple[str, str]] = {
    "quantized": ("quantized", "quantization (integer weights with scales)"),
    "nm": ("nm-sparse", "N:M semi-structured sparsity (N of every M consecutive weights kept, e.g. 2:4)"),
    "structured": ("pruned", "structured pruning (attention heads and FFN channels removed)"),
    "moe": ("moe", "MoEfication (dense FFNs split into experts behind a router)"),
    "kd": ("distillation", "knowledge distillation from the dense model"),
}

# library_name per format. GGUF is a file format, not a modelling library: the Hub recognises the
# .gguf file itself (the "gguf" tag is added), so no library_name is claimed for it.
_LIBRARY = {
    "lightcook": "lightcook",
    "compressed-tensors": "transformers",
    "gguf": None,
    "transformers": "transformers",
}
_FORMAT_TAG = {"compressed-tensors": "compressed-tensors", "gguf": "gguf"}
# the converter (compressed-tensors, GGUF) refuses networks of a different shape
_NOT_CONVERTIBLE = frozenset({"moe"})  # slices convert (uneven ones zero-padded: export.hf_padding)
_PATH = "path/to/this/folder"


@dataclass(frozen=True)
class CardFacts:
    """What the card says about one export folder; validates itself (``ValueError`` naming the field).

    Example:
        >>> CardFacts(format="gguf", gguf_file="model.gguf").gguf_file
        'model.gguf'
        >>> CardFacts(format="onnx")
        Traceback (most recent call last):
        ...
        ValueError: format: 'onnx' is not one of 'lightcook', 'compressed-tensors', 'gguf', 'transformers'
    """

    format: str
    base_model: str | None = None
    techniques: tuple[str, ...] = ()
    recipe: str | None = None
    command: str | None = None
    ppl: float | None = None
    reference_ppl: float | None = None
    reference: str | None = None
    bytes: int | None = None
    dense_bytes: int | None = None
    speed: Mapping[str, float] = field(default_factory=dict)
    gguf_file: str | None = None
    notes: tuple[str, ...] = ()
    measured: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format: {self.format!r} is not one of {', '.join(map(repr, FORMATS))}")
        for name in ("base_model", "recipe", "reference", "measured"):
            _check_text(name, getattr(self, name), one_line=True)
        _check_text("command", self.command, one_line=False)
        techniques = _names("techniques", self.techniques)
        unknown = [t for t in techniques if t not in TECHNIQUES]
        if unknown:
            raise ValueError(
                f"techniques: unknown {', '.join(map(repr, unknown))}; known: {', '.join(map(repr, TECHNIQUES))}"
            )
        object.__setattr__(self, "techniques", tuple(dict.fromkeys(techniques)))
        notes = _names("notes", self.notes)
        for note in notes:
            _check_text("notes", note, one_line=False)
        object.__setattr__(self, "notes", notes)
        for name in ("ppl", "reference_ppl"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a positive finite perplexity, got {value!r}")
        for name in ("bytes", "dense_bytes"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int) and not isinstance(value, bool) and value > 0
            ):
                raise ValueError(f"{name}: must be a positive whole number of bytes, got {value!r}")
        if not isinstance(self.speed, Mapping):
            raise ValueError(f"speed: must be a mapping of label -> number, got {type(self.speed).__name__}")
        for label, value in self.speed.items():
            _check_text("speed", label, one_line=True)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"speed: {label!r} must be a positive finite number, got {value!r}")
        object.__setattr__(self, "speed", dict(self.speed))
        if self.format == "gguf":
            if self.gguf_file is None:
                raise ValueError(
                    "gguf_file: format 'gguf' needs the name of the .gguf file inside the folder"
                )
            if (
                not isinstance(self.gguf_file, str)
                or not self.gguf_file.endswith(".gguf")
                or re.search(r"[/\\\n\"']", self.gguf_file)
            ):
                raise ValueError(
                    f"gguf_file: must be a bare file name ending in .gguf (no folders, quotes), got {self.gguf_file!r}"
                )
        elif self.gguf_file is not None:
            raise ValueError(f"gguf_file: only for format 'gguf', not {self.format!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_text(name: str, value: object, one_line: bool) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: must be a non-empty string, got {value!r}")
    if one_line and "\n" in value:
        raise ValueError(f"{name}: must be one line, got {value!r}")


def _names(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ValueError(f"{name}: must be a tuple of strings, got {value!r}")
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name}: must be a tuple of strings, got {value!r}")
    return tuple(value)


def model_card(facts: CardFacts) -> str:
    """The Markdown model card (YAML front matter + body) for one export folder.

    Example:
        >>> card = model_card(CardFacts(format="gguf", gguf_file="smol-q8_0.gguf", bytes=145_000_000))
        >>> "llama-cli -m \\"$path/smol-q8_0.gguf\\"" in card, "| Size on disk | 145.0 MB |" in card
        (True, True)
        >>> "not measured" in card, "None" in card
        (True, False)
    """
    parts = [_front_matter(facts), _title(facts), _about(facts), _results(facts)]
    if facts.command is not None:
        parts.append("## How it was made\n\n" + _fence("bash", facts.command))
    parts.append("## How to load\n\n" + _loading(facts))
    if facts.notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {' '.join(n.split())}" for n in facts.notes))
    parts.append("*Card written by lightcook when this folder was exported.*")
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def write_model_card(folder: str | Path, facts: CardFacts) -> Path:
    """Write :func:`model_card` as ``folder/README.md`` atomically (replacing one there); return its path.

    Raises:
        FileNotFoundError: ``folder`` does not exist. NotADirectoryError: it is a file.

    Example:
        >>> import tempfile
        >>> path = write_model_card(tempfile.mkdtemp(), CardFacts(format="transformers"))
        >>> path.read_text().startswith("---\\n")
        True
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such export folder to write the model card into")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder; the model card goes into the export folder")
    path = folder / "README.md"
    write_text_atomic(path, model_card(facts))
    return path


def _front_matter(facts: CardFacts) -> str:
    meta: dict[str, object] = {}
    if facts.base_model is not None:
        meta["base_model"] = facts.base_model
    library = _LIBRARY[facts.format]
    if library is not None:
        meta["library_name"] = library
    tags = ["lightcook", "compressed"]
    if facts.format in _FORMAT_TAG:
        tags.append(_FORMAT_TAG[facts.format])
    tags += [TECHNIQUES[t][0] for t in facts.techniques]
    meta["tags"] = list(dict.fromkeys(tags))
    meta["pipeline_tag"] = "text-generation"
    body = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False, width=10_000)
    return f"---\n{body}---"


def _title(facts: CardFacts) -> str:
    if facts.base_model is None:
        return "# A model compressed with lightcook"
    name = facts.base_model.rstrip("/").rsplit("/", 1)[-1] or facts.base_model
    return f"# {_inline(name)}, compressed with lightcook"


_WHAT = {
    "lightcook": "lightcook's own export folder: `model.safetensors` holds each compressed layer in its "
    "compact form and the `lightcook.json` manifest says which technique stored which layer. Opening it "
    "needs lightcook installed.",
    "compressed-tensors": "A compressed-tensors folder: `config.json` carries a compressed-tensors "
    "`quantization_config`, so plain transformers (with the `compressed-tensors` package) and vLLM open "
    "it. lightcook is not needed to load it.",
    "gguf": "A GGUF file, `{gguf_file}`, for llama.cpp and the tools built on it; transformers reads it "
    "too (`gguf_file=`), dequantizing the weights to float. lightcook is not needed to load it.",
    "transformers": "A plain Hugging Face `save_pretrained` folder (dense weights, or uniformly sliced "
    "layers described by a smaller `config.json`) that any transformers install opens. lightcook is "
    "not needed to load it.",
}


def _about(facts: CardFacts) -> str:
    lines = [_WHAT[facts.format].format(gguf_file=facts.gguf_file), ""]
    if facts.base_model is not None:
        lines.append(f"- **Base model:** {_code(facts.base_model)}")
    if facts.techniques:
        lines.append("- **Techniques:** " + "; ".join(TECHNIQUES[t][1] for t in facts.techniques))
    if facts.recipe is not None:
        lines.append(f"- **Recipe:** {facts.recipe.strip()}")
    return "\n".join(lines)


def _results(facts: CardFacts) -> str:
    rows = [("Perplexity (held-out)", f"{facts.ppl:.2f}" if facts.ppl is not None else "not measured")]
    if facts.reference_ppl is not None:
        label = "Reference perplexity" + (f" ({facts.reference.strip()})" if facts.reference else "")
        rows.append((label, f"{facts.reference_ppl:.2f}"))
        if facts.ppl is not None:
            rows.append(("Perplexity vs reference", f"{facts.ppl / facts.reference_ppl:.2f}x"))
    if facts.bytes is not None:
        rows.append(("Size on disk", _mb(facts.bytes)))
    if facts.dense_bytes is not None:
        rows.append(("Dense fp32 size", _mb(facts.dense_bytes)))
        if facts.bytes is not None:
            rows.append(("Compression vs dense fp32", f"{facts.dense_bytes / facts.bytes:.2f}x"))
    rows += [(label, f"{value:,.2f}") for label, value in facts.speed.items()]
    table = ["| Metric | Value |", "|---|---|"] + [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    out = "## Results\n\n" + "\n".join(table)
    if facts.measured is not None:
        out += f"\n\nMeasured on: {facts.measured.strip()}"
    return out


def _mb(n: int) -> str:
    """Bytes as megabytes (10^6): one decimal from 1 MB up, three below."""
    return f"{n / 1e6:,.1f} MB" if n >= 1_000_000 else f"{n / 1e6:.3f} MB"


def _py(imports: str, body: str, hub: bool = False) -> str:
    where = "the folder holding this README" + (" (or its Hub repo id)" if hub else "")
    return _fence("python", f'{imports}\n\npath = "{_PATH}"  # {where}\n{body}')


def _sh(body: str) -> str:
    return _fence("bash", f"path={_PATH}  # the folder holding this README\n{body}")


def _loading(facts: CardFacts) -> str:
    fmt = facts.format
    if fmt == "lightcook":
        blocks = [
            "With lightcook installed:",
            _py("from lightcook.export import load_compressed", "model = load_compressed(path)"),
            "or through transformers, which runs lightcook's loader from the folder (lightcook must be "
            "installed; plain `from_pretrained(path)` without `trust_remote_code=True` refuses on purpose):",
            _py(
                "from transformers import AutoModelForCausalLM",
                "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
            ),
        ]
        blocked = [t for t in facts.techniques if t in _NOT_CONVERTIBLE]
        if blocked:
            blocks.append(
                f"This folder holds {' and '.join(TECHNIQUES[t][1].split(' (')[0] for t in blocked)}, which "
                "compressed-tensors and GGUF cannot express (a different network shape): open it with lightcook."
            )
        else:
            blocks += [
                "To serve it without lightcook, convert it (codes and scales are carried over, not re-quantized):",
                _sh(
                    'python -m lightcook.export "$path" --format compressed-tensors --out "$path-compressed-tensors"\n'
                    'python -m lightcook.export "$path" --format gguf --out "$path-gguf"'
                ),
            ]
        return "\n\n".join(blocks)
    if fmt == "compressed-tensors":
        return "\n\n".join(
            [
                "With transformers (`pip install transformers compressed-tensors`):",
                _py(
                    "from transformers import AutoModelForCausalLM",
                    "model = AutoModelForCausalLM.from_pretrained(path)",
                    hub=True,
                ),
                "With vLLM (`pip install vllm`), as a server or in Python:",
                _sh('vllm serve "$path"'),
                _py(
                    "from vllm import LLM",
                    "llm = LLM(model=path)  # add tokenizer=<the base model's Hub id> if this folder holds none\n"
                    'print(llm.generate(["The capital of France is"])[0].outputs[0].text)',
                    hub=True,
                ),
            ]
        )
    if fmt == "gguf":
        file = facts.gguf_file
        return "\n\n".join(
            [
                "With llama.cpp:",
                _sh(
                    f'llama-cli -m "$path/{file}" -p "The capital of France is" -n 32\n'
                    f'llama-server -m "$path/{file}" --port 8080'
                ),
                "With llama-cpp-python (`pip install llama-cpp-python`):",
                _py(
                    "from llama_cpp import Llama",
                    f'llm = Llama(model_path=f"{{path}}/{file}")\n'
                    'print(llm("The capital of France is", max_tokens=32)["choices"][0]["text"])',
                ),
                "With transformers (`pip install transformers gguf`; the weights are dequantized to float):",
                _py(
                    "from transformers import AutoModelForCausalLM",
                    f'model = AutoModelForCausalLM.from_pretrained(path, gguf_file="{file}")',
                ),
            ]
        )
    return "\n\n".join(
        [
            "With transformers (`pip install transformers`):",
            _py(
                "from transformers import AutoModelForCausalLM",
                "model = AutoModelForCausalLM.from_pretrained(path)",
                hub=True,
            ),
        ]
    )


def _fence(lang: str, text: str) -> str:
    """``text`` in a fenced code block whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.strip(chr(10))}\n{fence}"


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (pipes escaped, one line)."""
    return " ".join(text.split()).replace("|", "\\|")


def _inline(text: str) -> str:
    return " ".join(text.split())


def _code(text: str) -> str:
    ticks = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def export_facts(fmt: str, manifest: Mapping[str, Any] | None = None, **measured: Any) -> CardFacts:
    """The card facts of an export folder of format ``fmt`` from its lightcook manifest (base model,
    techniques, the ``+compress`` recipe, the notes each format needs) plus ``measured`` fields
    (``ppl``, ``bytes``, ``speed``, ``command``, ...).

    Example:
        >>> facts = export_facts("gguf", {"techniques": ["nm", "quantized"], "compress": ["compress.prune", "compress.kd"]})
        >>> facts.techniques, facts.recipe, facts.gguf_file
        (('nm', 'quantized', 'kd'), '+compress=[prune,kd]', 'model.gguf')
    """
    manifest = manifest or {}
    compress = [str(k).removeprefix("compress.") for k in manifest.get("compress", [])]
    techniques = [t for t in manifest.get("techniques", []) if t in TECHNIQUES]
    if "kd" in compress:
        techniques.append("kd")
    notes = list(measured.pop("notes", ()))
    if "nm" in techniques and fmt in ("compressed-tensors", "gguf"):
        notes.append(
            "N:M zeros are stored dense: this format has no sparse kernel, so the size and speed are those of the quantization alone"
        )
    if fmt == "gguf" and "quantized" in techniques:
        notes.append(
            "Trained integer codes are kept where a GGUF block type holds them (Q8_0 / Q4_0 / Q4_1, "
            "scales rounded to float16); llama.cpp quantizes activations itself"
        )
    base = manifest.get("base_model")
    return CardFacts(
        format=fmt,
        base_model=str(base) if base else None,
        techniques=tuple(techniques),
        recipe=f"+compress=[{','.join(compress)}]" if compress else None,
        gguf_file="model.gguf" if fmt == "gguf" else None,
        notes=tuple(notes),
        **measured,
    )
