"""Weight sync over a gloo collective: the bucket layout, and a learner -> HF / vLLM-cpu rollout sync through
the real pipeline whose log-probs match the learner's."""
import json

import pytest
import torch
from conftest import BACKENDS

from rlkd import weight_sync


def test_layout_buckets_cover_every_tensor_once():
    named = [("a", torch.Size([4, 4])), ("b", torch.Size([10])), ("c", torch.Size([3, 2])), ("d", torch.Size([]))]
    layout = weight_sync.layout_of(named, "float32", bucket_bytes=64)  # a: 64 B fills a bucket alone
    assert layout.buckets == ((0, 1), (1, 3), (3, 4))
    assert layout.nbytes == (16 + 10 + 6 + 1) * 4
    half = weight_sync.layout_of(named, "bfloat16")
    assert half.buckets == ((0, 4),) and half.nbytes == 33 * 2


def test_broadcast_in_buckets_between_two_processes():
    """Rank 0 sends in its own dtype; the receiver gets every tensor in the layout's dtype and shape."""
    import threading

    from learners.worker import free_port

    tensors = [torch.randn(4, 4), torch.randn(10), torch.randn(3, 2)]
    layout = weight_sync.layout_of([(str(i), t.shape) for i, t in enumerate(tensors)], "bfloat16", bucket_bytes=40)
    port, got = free_port(), {}

    def member(rank):
        group = weight_sync.join("127.0.0.1", port, rank, 2, torch.device("cpu"))
        if rank == 0:
            weight_sync.send(group, tensors, layout)
        else:
            got.update(weight_sync.receive(group, layout, torch.device("cpu")))

    threads = [threading.Thread(target=member, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert list(got) == ["0", "1", "2"] and len(layout.buckets) > 1
    for i, t in enumerate(tensors):
        assert got[str(i)].dtype == torch.bfloat16 and torch.equal(got[str(i)], t.to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_collective_sync_run_passes_the_sync_check(backend, ray_cluster, tmp_path):
    """GKD on-policy steps with rollout.weight_sync=collective: every step's fresh rollouts are checked
    against the learner (sync/logprob_gap_train under rollout.sync_check_tol=1e-3)."""
    from rlkd.config import load_config
    from rlkd.launch import run

    cfg = load_config("configs/smoke.yaml", [
        f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}", "run.name=collective",
        "algo.method=gkd", "algo.gkd.lmbda=1.0", "train.steps=4", "eval.num_examples=0",
        f"rollout.backend={backend}", "rollout.weight_sync=collective", "rollout.sync_check_tol=1e-3",
        "rollout.vllm_cpu_kv_cache_gib=0.1"])
    run_dir = run(cfg)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["sync/logprob_gap_train"] for r in rows if "sync/logprob_gap_train" in r]
    assert len(gaps) == 4 and max(gaps[1:]) < 1e-3  # steps 2-4 sample with weights sent over gloo
    assert all(r["sync/bytes"] > 0 for r in rows)
