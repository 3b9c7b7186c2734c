"""Which implementation of a kernel runs: Triton or the PyTorch fallback.

  auto    Triton on CUDA tensors, the PyTorch fallback on CPU
  triton  forced; needs a CUDA device, or CPU tensors under TRITON_INTERPRET=1 (how CI tests it)
  torch   forced

The choice comes from the caller (the run's config, `kernels.attention` / `kernels.cross_entropy`)
when it is not "auto", else from the environment variable KERNELS_BACKEND, else auto.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "KERNELS_BACKEND"


class KernelBackendError(ValueError):
    """A backend was asked for that cannot run here (or does not exist)."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> str | None:
    """None when triton imports, else the reason it does not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as err:  # ImportError, or a broken install raising anything
        return f"triton does not import ({err})"
    return None


def resolve(requested: str | None, device: torch.device) -> str:
    """The backend to use for tensors on `device`: "triton" or "torch"."""
    choice = requested or "auto"
    if choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto") or "auto"
    if choice not in BACKENDS:
        source = f"{ENV_VAR}={choice}" if requested in (None, "auto") else f"backend {choice!r}"
        raise KernelBackendError(f"{source} is not one of {', '.join(BACKENDS)}")
    if choice == "auto":
        usable = device.type == "cuda" and triton_importable() is None
        return "triton" if usable else "torch"
    if choice == "triton":
        reason = triton_importable()
        if reason is None and device.type != "cuda" and not interpreting():
            reason = (f"the tensors are on {device.type}, and Triton runs on CUDA, or on CPU "
                      f"only under TRITON_INTERPRET=1")
        if reason:
            raise KernelBackendError(f"the triton kernel backend was forced but cannot run: {reason}. "
                                     f"Use {ENV_VAR}=torch (or auto), or run on a GPU")
    return choice
