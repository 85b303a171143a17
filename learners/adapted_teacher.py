"""OKD's online module: the frozen teacher with a trainable LoRA on its query and value projections.

h <- h + s·x·W_down·W_up (OKD eq. 15) is PEFT's standard LoRA with lora_alpha = s·r (scale
lora_alpha / r = s). No dropout and no nonlinearity: eq. 15 and "standard LoRA" (ALGORITHMS.md §5.7).
PEFT initialises W_up (lora_B) to zero, so training starts from the unadapted teacher.
"""
from __future__ import annotations


def lora_teacher(teacher_dir: str, rank: int, scale: float, targets: str, trust_remote_code: bool = False):
    """-> a peft model whose only trainable parameters are the LoRA matrices."""
    from peft import LoraConfig, get_peft_model

    from rlkd.models import load_model

    base = load_model(teacher_dir, trust_remote_code)
    modules = [m.strip() for m in targets.split(",") if m.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in modules if m not in present]
    if missing:
        raise ValueError(f"algo.okd.lora_targets={targets!r}: the teacher has no modules named {missing}; "
                         f"its linear layers include {sorted(n for n in present if 'proj' in n)[:8]}")
    config = LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=modules, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(base, config)
