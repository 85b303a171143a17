"""vLLM worker extension: methods added to every vLLM worker, called with `llm.collective_rpc`.

The method name is prefixed `rlkd_` so it never clashes with vLLM's own worker methods
(vLLM 0.32 already defines `update_weights`, `start_weight_update`, ...).
"""
from __future__ import annotations


class RlkdWorkerExtension:
    def rlkd_load_weights(self, blob: bytes) -> int:
        """Load a safetensors-serialised HF state dict into the running engine; returns #tensors.

        Bytes, not tensors: tensors inside collective_rpc arguments arrive as lists (measured).
        """
        from safetensors.torch import load

        state = load(blob)
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
