"""LearnerConfig values -> a DeepSpeed config dict (flat arguments in, dict out; pure)."""
from __future__ import annotations


def deepspeed_config(zero_stage: int, lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0,
                     bf16: bool = False) -> dict:
    """One optimizer step per `engine.step()`: micro batch 1, no DeepSpeed-side accumulation.

    rlkd sizes batches itself (global batch split over ranks), so DeepSpeed's batch fields only
    satisfy its bookkeeping. On CPU the optimizer is torch's AdamW (`torch_adam`): no op build.
    """
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True}},
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
