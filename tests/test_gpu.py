"""GPU paths. The in-process check builds the learner worker, the teacher and the HF rollout actor classes
directly, without Ray (the GPU machine has no Ray): on CPU with gloo and fp32 in every run of the suite,
on one CUDA device with NCCL and bf16 learners where one exists. The full smoke run needs Ray and CUDA."""
import pytest
import torch

gpu_test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class InProcess:
    """An rlkd.cluster.ActorGroup stand-in over plain objects in this process."""

    def __init__(self, objs: list, weights=None):
        self.objs, self.weights, self.version, self.restarts, self.seconds = objs, weights, 0, 0, 0.0
        self.sync_bytes = 0

    def __len__(self):
        return len(self.objs)

    def split(self, method, items, seed, **kwargs):
        return self.collect(self.submit(method, items, seed, **kwargs))

    def submit(self, method, items, seed, **kwargs):  # runs at once: one process has nothing to overlap
        from types import SimpleNamespace

        out = getattr(self.objs[0], method)(items, seed=seed, **kwargs)
        return SimpleNamespace(version=self.version, out=out)

    def collect(self, pending):
        return {k: v for k, v in pending.out.items() if k not in ("seconds", "version")}

    def spread(self, method, calls, wait=True):
        return [getattr(self.objs[0], method)(*args) for args in calls]

    def wait(self, refs):
        pass

    def update_weights(self):
        self.version += 1
        for o in self.objs:
            o.update_weights(self.weights(), self.version)


class InProcessLearners:
    size = 1

    def __init__(self, worker):
        self.w = worker

    def load_batch(self, shards, refs, n_tokens, snapshot_old_logp=False, slot="step"):
        self.w.load_batch(shards[0], refs[0], n_tokens, snapshot_old_logp, slot)

    def train(self, *args, **kwargs):
        return self.w.train(*args, **kwargs)

    def submit_train(self, *args, **kwargs):  # in process: runs at once
        return self.w.train(*args, **kwargs)

    def result(self, metrics):
        return metrics

    def evaluate(self, *args, **kwargs):
        return self.w.evaluate(*args, **kwargs)

    def student_weights_ref(self):
        return self.w.student_weights()


def _two_steps(method: str, topk: int, tiny_models, tiny_data):
    from actors.engines import EngineSpec
    from actors.rollout import RolloutActor
    from actors.teacher import TeacherActor
    from learners.worker import LearnerWorker, free_port
    from rlkd.algorithms import build_method
    from rlkd.config import load_config
    from rlkd.controller import Controller, StepSettings
    from rlkd.data import PromptSampler

    (teacher_dir, student_dir), (tok, rows) = tiny_models, tiny_data
    cuda = torch.cuda.is_available()
    cfg = load_config(None, [f"algo.method={method}", "algo.ammd.critic_warmup_steps=0", "algo.ammd.critic_steps=2"])
    m, v = build_method(cfg.algo, 0, total_steps=2), len(tok)
    worker = LearnerWorker(0, 1)
    okd = {"teacher_dir": str(teacher_dir), "rank": 4, "scale": 2.0, "targets": "q_proj,v_proj", "lr": 0.0}
    worker.setup("127.0.0.1", free_port(), str(student_dir), v, 0, 1e-3, 1e-2, 0.0, 1.0,
                 critic_heads=m.critic_heads, critic_hidden=64 if m.critic_heads else None,
                 adapted_teacher=okd if m.adapted_teacher else None)
    assert worker.student.device.type == ("cuda" if cuda else "cpu")
    rollout = RolloutActor(EngineSpec(str(student_dir), tok.pad_token_id, tok.eos_token_id, vocab_size=v), "hf")
    teacher = TeacherActor(EngineSpec(str(teacher_dir), tok.pad_token_id, tok.eos_token_id, vocab_size=v,
                                      bf16_on_gpu=True), "hf", topk=topk)
    learners = InProcessLearners(worker)
    settings = StepSettings(batch_size=4, max_new_tokens=6, temperature=1.0, top_p=1.0, sync_every=1,
                            sync_check_tol=0.1 if cuda else 1e-3, pad_id=tok.pad_token_id, seed=0, vocab_size=v)
    ctl = Controller(m, settings, PromptSampler(rows, 0), learners,
                     InProcess([rollout] if m.uses_rollouts else [], learners.student_weights_ref),
                     InProcess([teacher]), {}, rows[:4])
    return [ctl.step(step) for step in (1, 2)]


@pytest.mark.parametrize("method,topk", [("ammd", 0), ("ammd", 16), ("okd", 0)])
def test_two_steps_in_one_process(method, topk, tiny_models, tiny_data):
    """Two AMMD steps (full and top-k teacher: the critic then runs at the top-k ids) and two OKD steps."""
    import math

    steps = _two_steps(method, topk, tiny_models, tiny_data)
    loss = "ammd/d_on" if method == "ammd" else "loss/student"
    assert all(math.isfinite(s[loss]) for s in steps)
    if method == "ammd":  # the second step checks the synced rollout actor against the learner
        assert steps[1]["sync/logprob_gap_on"] <= (0.1 if torch.cuda.is_available() else 1e-3)


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
