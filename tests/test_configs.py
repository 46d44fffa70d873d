"""Every ``conf/**/*.yaml`` against the code it configures.

- each node with a ``_target_`` (at any depth) names something importable, and every key it gives is
  an argument of that target's signature (or the target takes ``**kwargs``; a compression callback's
  ``**options`` are the fields of its ``config_class`` dataclass) — checked in the file as
  written, and again in the composed group option (where ``defaults`` such as ``trainer/fast`` →
  ``trainer/cpu`` have supplied the ``_target_``);
- composed with Hydra's compose API, each ``compress/<name>.yaml`` lands under ``cfg.compress.<name>``
  and nowhere else.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightcook.app.config import CONFIG_DIR, compose_config, compress_names

YAMLS = sorted(CONFIG_DIR.rglob("*.yaml"))
#: Groups whose options are composed as ``group=option`` (compress: ``+compress=[option]``).
GROUPS = ["model", "data", "trainer", "callbacks", "logger", "report", "paths", "compress", "experiment"]
#: What a required ``???`` value needs to compose (only resolution needs it; keys are checked unresolved).
NEEDS = {("data", "text"): ["data.paths=[/tmp]"]}


def targets(node, where: str = "") -> Iterator[tuple[str, DictConfig]]:
    """``(key path, node)`` of every node with a ``_target_`` under ``node``, itself included."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield where or "<root>", node
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig | ListConfig):
                yield from targets(child, f"{where}.{key}".lstrip("."))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node._iter_ex(resolve=False)):
            yield from targets(child, f"{where}[{i}]")


def accepted(target) -> tuple[set[str], str] | None:
    """The keys ``target`` accepts and how to say so; ``None`` when it takes any ``**kwargs``.

    A callback whose ``**options`` build its ``config_class`` (a dataclass, lightcook's
    ``CompressionCallback`` convention) accepts its parameters and that dataclass's fields.
    """
    params = inspect.signature(target).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return named, f"it takes {', '.join(sorted(named))}"
    config_class = getattr(target, "config_class", None)
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return None
    fields = {f.name for f in dataclasses.fields(config_class)}
    return named | fields, f"nor a field of {config_class.__name__}: {', '.join(sorted(named | fields))}"


def problems(source: str, node: DictConfig, where: str) -> list[str]:
    """What is wrong with one ``_target_`` node: an unimportable target, or keys it does not accept."""
    name = node._target_
    try:
        target = get_object(name)
    except Exception as err:  # ImportError, AttributeError, Hydra's own wrappers
        return [f"{source}: {where}._target_={name!r} does not import ({type(err).__name__}: {err})"]
    allowed = accepted(target)
    if allowed is None:
        return []
    keys, takes = allowed
    hydra_keys = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}
    given = [str(k) for k in node if k not in hydra_keys and not (where == "<root>" and k == "defaults")]
    return [
        f"{source}: {where}.{key}: not an argument of {name} ({takes})" for key in given if key not in keys
    ]


def _with_targets(paths: list[Path]) -> list[Path]:
    return [p for p in paths if next(targets(OmegaConf.load(p)), None) is not None]


@pytest.mark.parametrize("path", _with_targets(YAMLS), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_target_in_the_file_imports_and_takes_the_keys_given(path):
    source = str(path.relative_to(CONFIG_DIR.parent))
    found = [msg for where, node in targets(OmegaConf.load(path)) for msg in problems(source, node, where)]
    assert not found, "\n".join(found)


def _options() -> list[tuple[str, str]]:
    return [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def _compose_option(group: str, option: str) -> tuple[DictConfig, object]:
    override = f"+compress=[{option}]" if group == "compress" else f"{group}={option}"
    cfg = compose_config([override, *NEEDS.get((group, option), [])])
    return cfg, (cfg if group == "experiment" else cfg.get(group))


@pytest.mark.parametrize(("group", "option"), _options(), ids=lambda v: v)
def test_every_composed_option_takes_the_keys_given(group, option):
    _, node = _compose_option(group, option)
    source = f"conf/{group}/{option}.yaml (composed)"
    found = [
        msg
        for where, sub in targets(node, "" if group == "experiment" else group)
        for msg in problems(source, sub, where)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", compress_names())
def test_each_compress_file_lands_under_its_own_key(name):
    baseline = compose_config([])
    cfg, _ = _compose_option("compress", name)
    assert list(cfg.compress) == [name], f"conf/compress/{name}.yaml: lands under {list(cfg.compress)}"
    assert set(cfg) == set(baseline) | {"compress"}, f"conf/compress/{name}.yaml: adds top-level keys"
    written = OmegaConf.load(CONFIG_DIR / "compress" / f"{name}.yaml")
    assert OmegaConf.to_container(cfg.compress[name]) == OmegaConf.to_container(written)


def test_two_compress_files_land_side_by_side():
    cfg = compose_config(["+compress=[quant,prune]"])
    assert sorted(cfg.compress) == ["prune", "quant"]
    assert cfg.compress.prune._target_ != cfg.compress.quant._target_


def test_the_checks_can_fail():
    bad = OmegaConf.create({"cb": {"_target_": "lightcook.callbacks.sparsity.SparsityCallback", "nn": 2}})
    ((where, node),) = targets(bad)
    (message,) = problems("x.yaml", node, where)
    assert message.startswith(
        "x.yaml: cb.nn: not an argument of lightcook.callbacks.sparsity.SparsityCallback"
    )
    missing = OmegaConf.create({"_target_": "lightcook.no_such_module.Thing"})
    assert "does not import" in problems("y.yaml", missing, "<root>")[0]
    assert problems("z.yaml", OmegaConf.create({"_target_": "collections.Counter", "any": 1}), "<root>") == []
