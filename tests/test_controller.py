"""The controller's step, phase by phase, with fake groups and no Ray: what runs, and in which order."""
from types import SimpleNamespace

import pytest

from rlkd.algorithms import build_method
from rlkd.config import load_config
from rlkd.controller import Controller, StepSettings
from rlkd.data import PromptSampler, TokenizedExample


class FakeActors:
    """An ActorGroup stand-in: records each call as (role, method)."""

    def __init__(self, role: str, log: list, n: int = 1):
        self.role, self.log, self.n, self.restarts, self.seconds, self.sync_bytes = role, log, n, 0, 0.0, 0

    def __len__(self):
        return self.n

    def split(self, method, items, seed, **kwargs):
        return self.collect(self.submit(method, items, seed, **kwargs))

    def submit(self, method, items, seed, **kwargs):
        self.log.append((self.role, method))
        return SimpleNamespace(version=0, out={"responses": [[7, 2]] * len(items),
                                               "logprobs": [[-1.0, -1.0]] * len(items)})

    def collect(self, pending):
        return pending.out

    def spread(self, method, calls, wait=True):
        self.log.append((self.role, method))
        return [object() for _ in calls]

    def wait(self, refs):
        pass

    def update_weights(self):
        self.log.append((self.role, "update_weights"))


class FakeLearners:
    size = 1

    def __init__(self, log: list):
        self.log = log

    def load_batch(self, shards, teacher_refs, n_tokens, snapshot_old_logp=False, slot="step"):
        self.log.append(("learners", f"load {slot} " + ",".join(shards[0])))
        self.loaded = shards[0]

    def train(self, objective, targets, check_sync=False, collapse=True, slot="step"):
        return self.result(self.submit_train(objective, targets, check_sync, collapse, slot))

    def submit_train(self, objective, targets, check_sync=False, collapse=True, slot="step"):
        targets = (targets,) if isinstance(targets, str) else targets
        self.log.append(("learners", f"train {slot} " + "+".join(targets)))
        return []

    def result(self, refs):
        return {}

    def evaluate(self, objective, slot="step"):
        self.log.append(("learners", f"evaluate {slot}"))
        return {"loss/sft": 1.0}


def _controller(*overrides, staleness: int = 0):
    cfg = load_config(None, ["rollout.sync_every=1", *overrides])
    log: list = []
    rows = [TokenizedExample(i, [5, 6, 3], [8, 2], ["x"]) for i in range(4)]
    settings = StepSettings(batch_size=2, max_new_tokens=4, temperature=1.0, top_p=1.0, sync_every=1,
                            sync_check_tol=1.0, pad_id=0, seed=0, max_staleness=staleness)
    method = build_method(cfg.algo, 0, total_steps=10)
    rollouts = FakeActors("rollout", log, n=int(method.uses_rollouts))  # launch starts none for gold methods
    ctl = Controller(method, settings, PromptSampler(rows, 0), FakeLearners(log), rollouts,
                     FakeActors("teacher", log), {}, rows)
    return ctl, log


def test_gold_method_scores_then_trains_the_student():
    ctl, log = _controller("algo.method=fkl")
    ctl.step(1)
    assert log == [("teacher", "score"), ("learners", "load step train"), ("learners", "train step student")]


def test_on_policy_method_generates_first_and_syncs_last():
    ctl, log = _controller("algo.method=gkd", "algo.gkd.lmbda=1.0")
    metrics = ctl.step(1)
    assert log == [("rollout", "generate"), ("teacher", "score"), ("learners", "load step train"),
                   ("learners", "train step student"), ("rollout", "update_weights")]
    assert metrics["tokens/generated"] == 4.0  # 2 prompts x 2 sampled tokens


@pytest.mark.parametrize("step", [1, 3])
def test_ammd_runs_k_critic_updates_before_the_student(step):
    ctl, log = _controller("algo.method=ammd", "algo.ammd.critic_steps=3", "algo.ammd.critic_warmup_steps=2")
    ctl.step(step)
    # the rollout is submitted first: the rollout actors generate while the teacher samples its responses,
    # and each batch is scored as soon as it exists (the teacher's 'off' while the student's 'on' generates)
    head = [("rollout", "generate"), ("teacher", "generate"), ("teacher", "score"), ("teacher", "score"),
            ("learners", "load step off,on")]
    critic = [("learners", "train step critic")] * 3
    student = [("learners", "train step student"), ("rollout", "update_weights")] if step > 2 else []  # warm-up
    assert log == head + critic + student


def test_teacher_generations_are_sampled_once_per_prompt():
    ctl, log = _controller("algo.method=seqkd")
    for step in (1, 2, 3):  # 4 prompts, 2 per step: the third step is a cache hit
        ctl.step(step)
    assert log.count(("teacher", "generate")) == 2 and ("teacher", "score") not in log


def test_validation_runs_after_the_update():
    ctl, log = _controller("algo.method=distillm", "algo.distillm.eval_every=1")
    metrics = ctl.step(1)
    # validation loads its own slot, after the update, so the step's batch is never overwritten
    assert log[-4:] == [("learners", "train step student"), ("rollout", "update_weights"),
                        ("learners", "load val train"), ("learners", "evaluate val")]
    assert metrics["val/ce"] == 1.0


def test_staleness_one_generates_the_next_step_during_the_update():
    ctl, log = _controller("algo.method=gkd", "algo.gkd.lmbda=1.0", staleness=1)
    first = ctl.step(1)
    assert log == [("rollout", "generate"), ("teacher", "score"),
                   ("rollout", "generate"),  # step 2's rollout, submitted before step 1 is loaded and trained
                   ("learners", "load step train"), ("learners", "train step student"),
                   ("teacher", "score"),  # step 2's batch, scored while step 1's update runs
                   ("rollout", "update_weights")]
    assert first["rollout/version_lag"] == 0 and first["rollout/queue_depth"] == 1
    assert ctl.learners.loaded["train"].behavior_logprobs is None  # fresh: no correction
    assert ctl.state_dict()["sampler"]["position"] == 2  # a checkpoint now replays step 2's prompts
    log.clear()
    second = ctl.step(2)
    assert log[:2] == [("rollout", "generate"), ("learners", "load step train")]  # scores and rollout were there
    assert second["rollout/version_lag"] == 1  # sampled before step 1's update
    stale = ctl.learners.loaded["train"]
    assert stale.behavior_logprobs is not None and (stale.behavior_logprobs == stale.rollout_logprobs).all()


def test_staleness_one_prefetches_teacher_samples_and_scores_every_batch_early():
    ctl, log = _controller("algo.method=ammd", "algo.ammd.critic_warmup_steps=1", staleness=1)
    ctl.step(1)  # warm-up: no student update, so step 2's prefetched batches are not scored during it
    assert log.count(("teacher", "generate")) == 2  # step 1's samples, and step 2's submitted with its rollout
    log.clear()
    ctl.step(2)
    before_load = log[:log.index(("learners", "load step off,on"))]
    assert ("teacher", "generate") not in before_load  # collected from the prefetch, not sampled again
    log.clear()
    ctl.step(3)  # both of step 3's batches (rollout and teacher samples) were scored during step 2's update
    assert log[:2] == [("rollout", "generate"), ("learners", "load step off,on")]


def test_staleness_needs_sync_every_one():
    from rlkd.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.sync_every"):
        load_config(None, ["rollout.max_staleness=1", "rollout.sync_every=2"])
    with pytest.raises(ConfigError, match="rollout.max_staleness=2"):
        load_config(None, ["rollout.max_staleness=2"])
