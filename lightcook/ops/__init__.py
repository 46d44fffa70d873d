"""Pure-torch compression math: no Lightning, no Hydra."""
