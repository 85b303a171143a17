"""DeepSpeed checkpoints loaded without running code.

DeepSpeed's own TorchCheckpointEngine loads with torch.load(weights_only=False), which unpickles anything:
a file planted in a run directory would run code on `--resume`. This engine loads with weights_only=True,
allowing only the DeepSpeed types that its checkpoints hold (rlkd.checkpoint.DEEPSPEED_GLOBALS: a loss
scaler, an enum and a dataclass; plain data, nothing that runs code when built). Saving is unchanged.
"""
from __future__ import annotations

import importlib
import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from rlkd.checkpoint import DEEPSPEED_GLOBALS


def _allowed() -> list:
    out = []
    for dotted in DEEPSPEED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        out.append(getattr(importlib.import_module(module), name))
    return out


class SafeCheckpointEngine(TorchCheckpointEngine):
    """TorchCheckpointEngine whose load refuses arbitrary objects (weights_only=True + an allow-list)."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_allowed()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RuntimeError(f"refusing to load {path}: it holds objects a DeepSpeed checkpoint never "
                                   f"holds, which could run code ({first})") from None


def make_safe(engine) -> None:
    """Give a DeepSpeed engine the safe checkpoint engine (after deepspeed.initialize)."""
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
