"""The one home for the precision choice (bf16 on GPU, fp32 on CPU) and its autocast, shared by training and
inference, so both read ``--precision`` the same way."""

from __future__ import annotations

import contextlib

import torch

from utils.errors import ConfigError

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"


def resolve_precision(requested: str | None, device: torch.device, flag: str = "--precision") -> str:
    """bf16 on GPU and fp32 on CPU unless asked otherwise (None or "auto"); fp16 needs CUDA."""
    if requested in (None, AUTO):
        return "bf16" if device.type == "cuda" else "fp32"
    if requested not in DTYPES:
        raise ConfigError(f"{flag} {requested!r} is not one of {', '.join(DTYPES)}")
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError(f"{flag} fp16 needs a CUDA device: use bf16 or fp32 on the CPU")
    return requested


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
