"""The Hydra application, as a package with arrows pointing one way:

    train.py    train(cfg): validate -> fit -> validate, summary.json          (imports all below)
    launch.py   module, data, callbacks, loggers, Trainer from the config       (imports slurm)
    config.py   conf/ location, run-id resolvers, +compress check, compose     (imports slurm)
    sweeps.py   W&B sweep YAML -> checked agent command lines                  (imports config)
    slurm.py    launch checks, spawned ranks, Slurm requeue, environment       (imports no app module)
    order.py    the resumable training order (ResumableSampler)
    timing.py   StepTimer: time inside training steps and their tokens

``run.py`` is a thin ``@hydra.main`` wrapper around :func:`train`; tests call it with configs made by
:func:`compose_config`. Note that ``lightcook.app.train`` is the function (re-exported here); the
module is ``sys.modules["lightcook.app.train"]`` (``from lightcook.app.train import ...`` works).

Example:
    >>> from lightcook.app import compose_config
    >>> cfg = compose_config(["model=tiny_llama", "trainer=fast"])
    >>> cfg.model._target_
    'lightcook.modules.CausalLMModule'
"""

from lightcook.app.config import (
    CONFIG_DIR,
    check_compress_overrides,
    compose_config,
    compress_names,
    new_run_id,
    register_resolvers,
)
from lightcook.app.launch import (
    AtomicCheckpointIO,
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_module,
    build_trainer,
    instantiate_named,
    instantiate_nodes,
    named_callbacks,
)
from lightcook.app.train import compress_summaries, save_model, train

__all__ = [
    "CONFIG_DIR",
    "AtomicCheckpointIO",
    "build_callbacks",
    "build_datamodule",
    "build_loggers",
    "build_module",
    "build_trainer",
    "check_compress_overrides",
    "compose_config",
    "compress_names",
    "compress_summaries",
    "instantiate_named",
    "instantiate_nodes",
    "named_callbacks",
    "new_run_id",
    "register_resolvers",
    "save_model",
    "train",
]
