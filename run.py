"""lightcook's command line: ``python run.py +compress=[quant,prune]`` (Hydra app, conf/ folder)."""

import hydra
from omegaconf import DictConfig

from lightcook.app import register_resolvers, train

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
