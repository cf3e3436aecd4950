"""Where tensors live: ``train.device`` (auto | cpu | cuda) resolved on this machine."""

from __future__ import annotations

import torch

from vaelab.errors import VaelabError


def resolve(requested: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without CUDA is a clear error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise VaelabError(
            "params.yaml: 'train.device' is 'cuda' but this machine has no usable CUDA device "
            f"(torch {torch.__version__}). Set train.device to 'auto' or 'cpu'."
        )
    return torch.device(requested)
