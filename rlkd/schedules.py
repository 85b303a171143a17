"""Data schedules: which sequences a method trains on at each step.

Each step the controller asks the schedule for a plan, {batch name: source}, produces the planned
sequences (gold responses, cached teacher generations, fresh student rollouts, teacher-mixed rollouts),
and hands them back to `settle`, which applies the schedule's replay buffer if it has one. Methods whose
data never changes use `Fixed`; GKD, ImitKD and DistiLLM pick per step, with a seeded RNG so a run is
reproducible. Pure Python: the controller owns every actor call, and nothing here calls back into it.
"""
from __future__ import annotations

import random
from collections import deque

from rlkd.batch import SequenceBatch
from rlkd.data import rng_state, set_rng_state

# where a batch's sequences come from; REPLAY needs no generation (a sample of the schedule's buffer)
GOLD, TEACHER_GEN, ROLLOUT, MIXED = "gold", "teacher_generated", "rollout", "teacher_mixed_rollout"
REPLAY = "replay"
Batches = dict[str, SequenceBatch]


class ReplayBuffer:
    """FIFO buffer of (prompt ids, response ids); sampled uniformly (distillm `ReplayBuffer`)."""

    def __init__(self, capacity: int, seed: int):
        self.items: deque = deque(maxlen=capacity)
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, batch: SequenceBatch) -> None:
        self.items.extend(batch.to_lists())

    def sample(self, n: int, pad_id: int) -> SequenceBatch:
        picked = self.rng.sample(list(self.items), min(n, len(self.items)))
        return SequenceBatch.collate([p for p, _ in picked], [r for _, r in picked], pad_id)

    def state_dict(self) -> dict:
        return {"items": [list(x) for x in self.items], "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        self.items.clear()
        self.items.extend(tuple(x) for x in state["items"])
        set_rng_state(self.rng, state["rng"])


class _Stateful:
    """state_dict / load_state_dict over the listed attributes (checkpoints: JSON, no pickles)."""

    _state: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self._state}
        if getattr(self, "rng", None) is not None:
            out["rng"] = rng_state(self.rng)
        if getattr(self, "buffer", None) is not None:
            out["buffer"] = self.buffer.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        for k in self._state:
            setattr(self, k, state[k])
        if "rng" in state:
            set_rng_state(self.rng, state["rng"])
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])


class Fixed(_Stateful):
    """The same sources every step, e.g. {'gold': GOLD} or AMMD's {'off': TEACHER_GEN, 'on': ROLLOUT}."""

    def __init__(self, sources: dict[str, str]):
        self.sources = sources
        self.uses = frozenset(sources.values())

    def plan(self, step: int) -> dict[str, str]:
        return dict(self.sources)

    def settle(self, batches: Batches, n: int, pad_id: int) -> Batches:
        return batches

    def keeps(self, name: str) -> bool:
        """Whether `settle` trains on produced batch `name` as it is (then it can be scored at once)."""
        return True

    def metrics(self) -> dict[str, float]:
        return {}


class OnPolicyMix(_Stateful):
    """GKD / ImitKD: with probability λ train on fresh student generations, else on `off_source`.

    With a replay buffer (ImitKD as distillm runs it) the fresh batch is pushed into the buffer and
    the step trains on a uniform sample of the buffer instead (docs/algorithms.md#gkd, #imitkd).
    """

    _state = ("last_on_policy",)

    def __init__(self, lmbda: float, off_source: str, seed: int, capacity: int = 0):
        self.lmbda, self.off_source = lmbda, off_source
        self.rng = random.Random(seed)
        self.buffer = ReplayBuffer(capacity, seed + 1) if capacity else None
        self.uses = frozenset(({ROLLOUT} if lmbda > 0 else set()) | ({off_source} if lmbda < 1 else set()))
        self.last_on_policy = 0.0

    def plan(self, step: int) -> dict[str, str]:
        on = self.rng.random() < self.lmbda
        self.last_on_policy = float(on)
        return {"train": ROLLOUT if on else self.off_source}

    def settle(self, batches: Batches, n: int, pad_id: int) -> Batches:
        if self.buffer is None or not self.last_on_policy:
            return batches
        self.buffer.add(batches["train"])
        return {"train": self.buffer.sample(n, pad_id)}

    def keeps(self, name: str) -> bool:
        return self.buffer is None or not self.last_on_policy

    def metrics(self) -> dict[str, float]:
        out = {"data/on_policy": self.last_on_policy}
        if self.buffer is not None:
            out["data/replay_size"] = float(len(self.buffer))
        return out


class AdaptiveSGO(_Stateful):
    """DistiLLM's adaptive off-policy student-generated outputs (`--type adaptive-*`, docs/algorithms.md#distillm).

    Each step draws r ~ U(0,1). With threshold th and the decreasing ratio s = th·(1 − step/total):
    r < s, or r < th with the buffer not yet full -> fresh student batch (pushed to the buffer);
    r < th -> a uniform batch from the buffer; otherwise the gold batch. At each validation the
    threshold rises by 0.1 (max 1) if the validation CE grew by at least loss_eps.
    """

    _state = ("threshold", "prev_loss", "last")

    def __init__(self, init_threshold: float, loss_eps: float, capacity: int, total_steps: int, seed: int):
        self.threshold, self.loss_eps, self.total = init_threshold, loss_eps, total_steps
        self.buffer = ReplayBuffer(capacity, seed + 1)
        self.rng = random.Random(seed)
        self.prev_loss: float | None = None
        self.uses = frozenset({GOLD, ROLLOUT})
        self.last = "gold"

    def plan(self, step: int) -> dict[str, str]:
        r = self.rng.random()
        s = self.threshold * (1 - step / self.total)
        if r < s or (r < self.threshold and len(self.buffer) < self.buffer.items.maxlen):
            self.last = "fresh"
        else:
            self.last = "replay" if r < self.threshold else "gold"
        return {"train": {"fresh": ROLLOUT, "replay": REPLAY, "gold": GOLD}[self.last]}

    def settle(self, batches: Batches, n: int, pad_id: int) -> Batches:
        if self.last == "fresh":
            self.buffer.add(batches["train"])
        elif self.last == "replay":
            return {"train": self.buffer.sample(n, pad_id)}
        return batches

    def keeps(self, name: str) -> bool:
        return True  # a fresh batch trains as produced (and enters the buffer); replays are not produced

    def on_validation(self, loss: float) -> None:
        if self.prev_loss is None:
            self.prev_loss = loss
        elif loss >= self.prev_loss + self.loss_eps:
            self.threshold = min(self.threshold + 0.1, 1.0)
            self.prev_loss = loss

    def metrics(self) -> dict[str, float]:
        return {"distillm/threshold": self.threshold, "data/replay_size": float(len(self.buffer)),
                "data/fresh": float(self.last == "fresh"), "data/replay": float(self.last == "replay")}
