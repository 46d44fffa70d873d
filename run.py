"""lightcook's command line: ``python run.py +compress=[quant,prune]`` (Hydra app, conf/ folder)."""

import sys

import hydra
from omegaconf import DictConfig

from lightcook.app import check_compress_overrides, register_resolvers, train

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    try:
        check_compress_overrides(sys.argv[1:])
    except ValueError as err:
        sys.exit(f"error: {err}")
    main()
