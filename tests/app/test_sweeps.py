"""lightcook.app.sweeps: W&B sweep YAML -> checked agent command lines -> offline W&B runs, and bad
sweeps that fail before any run, naming the parameter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lightcook.app.sweeps import command_lines, hydra_overrides, load_sweep, parameter_grid
from tests.helpers import REPO
from tests.helpers.app import run_cli

SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_gives_checked_agent_commands(path):
    sweep = load_sweep(path)
    lines = command_lines(sweep, source=str(path))  # composes every combination with Hydra
    assert lines and all(line[:3] == ["/usr/bin/env", "python", "run.py"] for line in lines)
    assert all(not a.startswith("--") for line in lines for a in line)  # Hydra overrides, not flags
    assert len({tuple(line) for line in lines}) == len(lines)


def _wandb_records(path: Path) -> list:
    """Records of an offline ``run-*.wandb`` file (LevelDB log format: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pos, chunk = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _offline_run(run_dir: Path) -> dict[str, object]:
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    kinds: dict[str, list] = {}
    for record in _wandb_records(log):
        kinds.setdefault(record.WhichOneof("record_type"), []).append(record)
    config = {_key(u): json.loads(u.value_json) for r in kinds["config"] for u in r.config.update}
    summary = {_key(u): json.loads(u.value_json) for r in kinds["summary"] for u in r.summary.update}
    history = {_key(i) for r in kinds["history"] for i in r.history.item}
    files = {f.path for r in kinds.get("files", []) for f in r.files.files}
    return {"config": config, "summary": summary, "history": history, "files": files, "exit": kinds["exit"]}


def test_sweep_commands_run_as_offline_wandb_runs(tmp_path):
    lines = command_lines(load_sweep(REPO / "experiments" / "sweeps" / "smoke.yaml"))
    for line in lines:
        run_cli(line, tmp_path)
    runs = sorted((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == len(lines) == 2
    seen = []
    for run in runs:
        wandb_run = _offline_run(run)
        assert wandb_run["exit"][0].exit.exit_code == 0
        assert wandb_run["config"]["model"]["lr"] == 2.0e-3  # the swept value reached the run's config
        seen.append(sorted(wandb_run["config"].get("compress") or {}))
        assert {"train/loss", "val/ppl"} <= wandb_run["history"]
        summary = json.loads((run / "summary.json").read_text())
        assert wandb_run["summary"]["summary/val_ppl_after"] == pytest.approx(summary["val_ppl_after"])
        assert wandb_run["summary"]["summary/train_tokens_per_second"] > 0
        assert "summary.json" in wandb_run["files"]
    assert sorted(seen) == [["none"], ["prune"]]


# --------------------------------------------------------------------------- bad input


def _sweep_file(tmp_path: Path, parameters: dict, args: str = "${args_no_hyphens}") -> Path:
    import yaml

    sweep = {"program": "run.py", "method": "grid", "parameters": parameters}
    sweep["command"] = ["${env}", "${interpreter}", "${program}", "model=tiny_llama", args]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ({"model.lrr": {"values": [0.1]}}, r"sweep parameter 'model.lrr' is not a config key"),
        (
            {"+compress": {"values": ["[prune]", "[none]"]}, "compress.prune.n": {"value": 1}},
            r"sweep parameter 'compress.prune.n' is not a config key .* combination \+compress=\[none\]",
        ),
        (
            {"+compress": {"values": ["[prnue]"]}},
            r"in the combination \+compress=\[prnue\]: compress: unknown technique\(s\) \['prnue'\]",
        ),
        ({"compress.prune.end_step": {"values": [None]}}, r"'compress.prune.end_step'.*string 'null'"),
        ({"model.lr": {"min": 0.1, "max": 0.2}}, r"'model.lr' needs 'value' or 'values'"),
    ],
)
def test_bad_sweep_fails_before_any_run_naming_the_parameter(tmp_path, parameters, match):
    path = _sweep_file(tmp_path, parameters)
    with pytest.raises(ValueError, match=match):
        command_lines(load_sweep(path), source=str(path))


def test_sweep_without_args_no_hyphens_is_refused(tmp_path):
    path = _sweep_file(tmp_path, {"model.lr": {"values": [0.1]}}, args="${args}")
    with pytest.raises(ValueError, match=r"must pass the parameters as \$\{args_no_hyphens\}"):
        load_sweep(path)


def test_bad_sweep_cli_runs_nothing(tmp_path):
    path = _sweep_file(tmp_path, {"model.lr": {"values": [0.1]}, "trainer.max_stepz": {"value": 1}})
    done = run_cli([sys.executable, "-m", "lightcook.app.sweeps", str(path), "--run"], tmp_path, check=False)
    assert done.returncode != 0 and "sweep parameter 'trainer.max_stepz'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_grid_order_and_overrides_after_the_program():
    sweep = {"parameters": {"a": {"values": [1, 2]}, "b": {"values": ["x", "y"]}, "c": {"value": 0}}}
    assert [tuple(p.values()) for p in parameter_grid(sweep)] == [
        (1, "x", 0),
        (1, "y", 0),
        (2, "x", 0),
        (2, "y", 0),
    ]
    argv = ["/usr/bin/env", "python", "run.py", "--flag", "model=tiny_llama", "+compress=[prune]"]
    assert hydra_overrides(argv) == ["model=tiny_llama", "+compress=[prune]"]
