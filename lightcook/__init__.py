"""lightcook: compress pre-trained language models while they train, as Lightning callbacks."""

__version__ = "0.1.0"
