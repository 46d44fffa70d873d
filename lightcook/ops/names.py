"""Names shared by every layer: the mask buffer, the gate attribute, Linear detection.

One constant per shared name, so the callbacks, the ops and the export agree by construction.

Example:
    >>> import torch
    >>> linear_like(torch.nn.Linear(2, 2)), is_conv1d(torch.nn.Linear(2, 2)), MASK_SUFFIX
    (True, False, '.weight_mask')
    >>> linear_names(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)))
    ['0', '2']
"""

from __future__ import annotations

from torch import nn

#: The boolean buffer an N:M / unstructured mask lives in, on the masked Linear (``<layer>.weight_mask``).
MASK = "weight_mask"
MASK_SUFFIX = "." + MASK
#: The attribute of the network that holds the structured-pruning :class:`~lightcook.ops.hard_concrete.GateSet`.
GATES = "lightcook_gates"


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's GPT-2 style ``Conv1D`` (a Linear stored transposed: weight ``(in, out)``)."""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)


def linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_names(network: nn.Module) -> list[str]:
    """Qualified names of every Linear / ``Conv1D`` inside ``network`` (the network itself excluded)."""
    return [name for name, module in network.named_modules() if name and linear_like(module)]
