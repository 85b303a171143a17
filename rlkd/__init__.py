"""rlkd: Ray-based RL-style knowledge distillation for causal language models."""
__version__ = "0.1.0"
