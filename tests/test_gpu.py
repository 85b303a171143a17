"""GPU paths (vLLM on CUDA, NCCL learner group, bf16): skipped without a GPU."""
import pytest
import torch

gpu_test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu_test
def test_smoke_run_on_gpu(ray_cluster, tmp_path):
    from rlkd.config import load_config
    from rlkd.launch import run
    from rlkd.outputs import COMPLETED

    cfg = load_config("configs/smoke_vllm.yaml", [
        f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}", "rollout.num_gpus=0.3",
        "teacher.num_gpus=0.3", "learner.num_gpus=0.3", "rollout.vllm_memory_fraction=0.2"])
    run_dir = run(cfg)
    assert (run_dir / COMPLETED).exists()
