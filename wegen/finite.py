"""Finite numbers only: the one check every entry point runs on the numbers and tensors it is given.

NaN or inf in an image, mask, reference, condition or setting would flow through the UNet into a black
picture (and, in a chat, into every later turn). Every entry (engine API, nodes, command line) calls
check_finite, so the error names the input; chat turns also check what the model made before saving it.
"""
from __future__ import annotations

import math


def check_finite(value, name: str, hint: str = ""):
    """`value` (a number or a tensor) unchanged; ValueError naming `name` when it holds NaN or +-inf."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf) among {value.numel()}; "
                                 f"only finite numbers are allowed{hint}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}{hint}")
    return value
