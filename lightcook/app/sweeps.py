"""W&B sweep YAML → the command lines a W&B agent would run, checked against the Hydra config first.

A sweep file (``experiments/sweeps/*.yaml``) is a W&B sweep configuration whose ``command`` ends in
``${args_no_hyphens}``, so the agent passes ``key=value`` (Hydra overrides) instead of ``--key=value``.
:func:`command_lines` expands the grid of ``values`` locally and builds each command with W&B's own
macro code (the same as ``wandb agent``), after composing every combination with Hydra: a parameter
that is not a config key fails here, naming it, before any run starts.

    python -m lightcook.app.sweeps experiments/sweeps/prune.yaml          # check, then print the commands
    python -m lightcook.app.sweeps experiments/sweeps/smoke.yaml --run    # ... and run them one after another
    wandb sweep experiments/sweeps/prune.yaml && wandb agent <id>     # the same commands, driven by W&B

Example:
    >>> sweep = {"program": "run.py", "method": "grid",
    ...          "parameters": {"model.lr": {"values": [0.001, 0.0001]}, "+compress": {"value": "[prune]"}},
    ...          "command": ["${env}", "${interpreter}", "${program}", "model=tiny_llama", "${args_no_hyphens}"]}
    >>> for line in command_lines(sweep, check=False):
    ...     print(" ".join(line))
    /usr/bin/env python run.py model=tiny_llama model.lr=0.001 +compress=[prune]
    /usr/bin/env python run.py model=tiny_llama model.lr=0.0001 +compress=[prune]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightcook.app.config import compose_config

#: ``wandb agent``'s command when a sweep has none (it passes ``--key=value``, which Hydra rejects).
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
METHODS = ("grid", "random", "bayes")


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """Read a sweep YAML file.

    Raises:
        ValueError: not a mapping with a ``parameters`` mapping, an unknown ``method``, or a
            ``command`` that does not pass the parameters as ``${args_no_hyphens}``.
    """
    sweep = yaml.safe_load(Path(path).read_text())
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        raise ValueError(f"{path}: a sweep needs a 'parameters' mapping")
    if sweep.get("method", "grid") not in METHODS:
        raise ValueError(f"{path}: method={sweep.get('method')!r}; allowed: {', '.join(METHODS)}")
    if "${args_no_hyphens}" not in (sweep.get("command") or DEFAULT_COMMAND):
        raise ValueError(
            f"{path}: command must pass the parameters as ${{args_no_hyphens}} (key=value, Hydra "
            "overrides); the agent's default ${args} passes --key=value, which Hydra rejects"
        )
    return sweep


def _choices(name: str, spec: Any, source: str) -> list[Any]:
    if not isinstance(spec, dict) or ("value" not in spec and "values" not in spec):
        raise ValueError(
            f"{source}: sweep parameter {name!r} needs 'value' or 'values' (distributions with min/max "
            "are sampled by a W&B server only)"
        )
    values = spec["values"] if "values" in spec else [spec["value"]]
    if not isinstance(values, list) or not values:
        raise ValueError(f"{source}: sweep parameter {name!r}: 'values' must be a non-empty list")
    if any(v is None for v in values):
        raise ValueError(
            f"{source}: sweep parameter {name!r}: the agent passes None as the string 'None'; "
            "write the Hydra null as the string 'null'"
        )
    return values


def parameter_grid(sweep: dict[str, Any], source: str = "sweep") -> list[dict[str, Any]]:
    """Every combination of the parameters' ``values`` (YAML order; the last parameter varies fastest).

    Locally ``random`` and ``bayes`` sweeps enumerate the same grid a W&B server would sample from.

    Example:
        >>> parameter_grid({"parameters": {"a": {"values": [1, 2]}, "b": {"value": "x"}}})
        [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}]
    """
    names = list(sweep["parameters"])
    choices = [_choices(n, sweep["parameters"][n], source) for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def agent_command(sweep: dict[str, Any], args: dict[str, Any]) -> list[str]:
    """The argv ``wandb agent`` builds for one run: W&B's macro expansion of ``sweep['command']``.

    ``${interpreter}`` is ``python`` and ``${env}`` is ``/usr/bin/env``, exactly as in the agent, so
    run the lines with the project's Python first on ``PATH``.
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep.get("command") or DEFAULT_COMMAND))
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in args.items()}})
    macros.update(interpreter=["python"], program=[sweep.get("program", "run.py")], env=["/usr/bin/env"])
    argv: list[str] = []
    for chunk in map(str, command):
        is_macro = chunk.startswith("${") and chunk.endswith("}")
        argv += (macros.get(chunk[2:-1]) or []) if is_macro else [chunk]
    return argv


def hydra_overrides(argv: Sequence[str], program: str = "run.py") -> list[str]:
    """The Hydra overrides in an agent command: the arguments after ``program`` that are not flags.

    Example:
        >>> hydra_overrides(["/usr/bin/env", "python", "run.py", "--x", "model.lr=0.1", "trainer=fast"])
        ['model.lr=0.1', 'trainer=fast']
    """
    start = next((i + 1 for i, a in enumerate(argv) if Path(a).name == Path(program).name), len(argv))
    return [a for a in argv[start:] if "=" in a and not a.startswith("-")]


def check_overrides(overrides: list[str], params: dict[str, Any], source: str) -> None:
    """Compose the config with ``overrides`` as Hydra would; on failure name the sweep parameter.

    Raises:
        ValueError: a parameter (or a fixed command argument) is not a config key or group option.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose_config(overrides)
    except ValueError as err:  # a bad +compress selection (lightcook.app.config.check_compress_overrides)
        combo = " ".join(f"{k}={v}" for k, v in params.items())
        raise ValueError(f"{source}: in the combination {combo}: {err}") from err
    except (HydraException, OmegaConfBaseException) as err:
        culprit = _culprit(str(err), params)
        what = f"sweep parameter {culprit!r}" if culprit else f"command arguments {overrides}"
        first = str(err).strip().splitlines()[0]
        combo = " ".join(f"{k}={v}" for k, v in params.items())
        raise ValueError(
            f"{source}: {what} is not a config key or group option in the combination {combo} ({first})"
        ) from err


def _culprit(message: str, params: dict[str, Any]) -> str | None:
    """The sweep parameter a Hydra error message is about (``'a.b'``, ``full_key: a.b``, ``'a/b'``)."""
    keys = set(re.findall(r"'([^']+)'", message)) | set(re.findall(r"full_key: (\S+)", message))
    keys |= {k.replace("/", ".") for k in keys}
    exact = [name for name in params if name.lstrip("+~") in keys]
    if exact:
        return exact[0]
    near = [name for name in params if any(_related(name.lstrip("+~"), k) for k in keys)]
    return max(near, key=len, default=None)


def _related(bare: str, key: str) -> bool:
    return key.startswith(f"{bare}.") or bare.startswith(f"{key}.")


def command_lines(sweep: dict[str, Any], source: str = "sweep", check: bool = True) -> list[list[str]]:
    """Agent command lines for every grid combination, each checked against the config first."""
    lines = []
    for params in parameter_grid(sweep, source):
        argv = agent_command(sweep, params)
        if check:
            check_overrides(hydra_overrides(argv, sweep.get("program", "run.py")), params, source)
        lines.append(argv)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightcook.app.sweeps SWEEP.yaml [--run]``: check and print (or run) the commands."""
    parser = argparse.ArgumentParser(
        prog="python -m lightcook.app.sweeps", description=__doc__.split("\n")[0]
    )
    parser.add_argument("sweep", help="a W&B sweep YAML (experiments/sweeps/*.yaml)")
    parser.add_argument("--run", action="store_true", help="run the commands one after another")
    args = parser.parse_args(argv)
    lines = command_lines(load_sweep(args.sweep), source=args.sweep)
    for line in lines:
        print(shlex.join(line), flush=True)
        if args.run and subprocess.run(line).returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
