"""OKD's online module: the frozen teacher with a trainable LoRA on its query and value projections.

h <- h + s·x·W_down·W_up (OKD eq. 15) is PEFT's standard LoRA with lora_alpha = s·r (scale
lora_alpha / r = s). No dropout and no nonlinearity: eq. 15 and "standard LoRA" (docs/algorithms.md#okd).
PEFT initialises W_up (lora_B) to zero, so training starts from the unadapted teacher.
"""
from __future__ import annotations


def lora_teacher(teacher_dir: str, rank: int, scale: float, targets: str, trust_remote_code: bool = False):
    """-> a peft model whose only trainable parameters are the LoRA matrices."""
    from peft import LoraConfig, get_peft_model

    from rlkd.models import check_lora_targets, load_model

    modules = check_lora_targets(teacher_dir, targets, trust_remote_code)
    base = load_model(teacher_dir, trust_remote_code)
    config = LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=modules, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(base, config)
