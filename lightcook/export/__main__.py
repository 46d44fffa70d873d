"""``python -m lightcook.export SRC --format {lightcook,compressed-tensors,gguf} --out DIR``; see
:mod:`lightcook.export.convert`."""

from lightcook.export.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
