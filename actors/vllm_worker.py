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

    def rlkd_join_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the learners' collective sync group (rlkd.weight_sync) from inside the worker."""
        from rlkd import weight_sync

        device = next(self.model_runner.model.parameters()).device
        self.rlkd_group = weight_sync.join(host, port, rank, world_size, device)

    def rlkd_receive_weights(self, layout: dict) -> int:
        """Receive the buckets rank 0 broadcasts and load them as they arrive; returns #tensors."""
        from rlkd import weight_sync

        layout = weight_sync.Layout.from_dict(layout)
        device = next(self.model_runner.model.parameters()).device
        self.model_runner.reload_weights(weights_iterator=weight_sync.receive(self.rlkd_group, layout, device))
        return len(layout.names)
