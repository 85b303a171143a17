"""Batch types that travel between the controller, the actors and the learners.

Layout: prompts are left-padded to a common width P and responses right-padded to width R, so the
response region is the column block [P, P+R) for every row. Logits at column P-1+j predict
response token j. All per-token tensors below are (B, R), aligned to response tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch


def pick(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """values[..., ids] along the last axis: (B, R, V) values at (B, R) ids -> (B, R)."""
    return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def to_device(t: torch.Tensor | None, device: str | torch.device) -> torch.Tensor | None:
    """A host tensor onto `device` (pinned and non-blocking for CUDA); None and same-device tensors pass."""
    if t is None or t.device == torch.device(device):
        return t
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, P+R) long: left-padded prompt ++ right-padded response
    attention_mask: torch.Tensor  # (B, P+R) long: 1 on real tokens
    response_mask: torch.Tensor  # (B, R) float: 1 on real response tokens (EOS included)
    prompt_width: int  # P: response token j sits at column P+j
    rollout_logprobs: torch.Tensor | None = None  # (B, R) log π_rollout(y_j) at sampling time
    behavior_logprobs: torch.Tensor | None = None  # (B, R) log of the distribution y_j was drawn from,
    # when that is not the student itself (MiniLLM's teacher-mixed sampling); None = the student

    @property
    def responses(self) -> torch.Tensor:  # (B, R) long
        return self.input_ids[:, self.prompt_width:]

    @property
    def position_ids(self) -> torch.Tensor:  # (B, P+R) positions that skip left padding
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def select(self, rows: slice | torch.Tensor) -> SequenceBatch:
        return _select(self, rows)

    def to(self, device: str | torch.device) -> SequenceBatch:
        return replace(self, **{f.name: to_device(getattr(self, f.name), device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def to_lists(self) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) per row, padding removed (inverse of `collate`)."""
        p = self.prompt_width
        return [(ids[:p][attn[:p].bool()].tolist(), ids[p:][rmask.bool()].tolist())
                for ids, attn, rmask in zip(self.input_ids, self.attention_mask, self.response_mask)]

    def shard(self, n: int) -> list[SequenceBatch]:
        """n contiguous, equal shards (the global batch must divide evenly)."""
        return _shard(self, n)

    @staticmethod
    def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                rollout_logprobs: Sequence[Sequence[float]] | None = None,
                behavior_logprobs: Sequence[Sequence[float]] | None = None) -> SequenceBatch:
        """Pack token-id lists into the left/right padded layout."""
        if not prompts:
            raise ValueError("cannot collate an empty batch")
        width_p = max(len(p) for p in prompts)
        width_r = max(1, max(len(r) for r in responses))
        n = len(prompts)
        ids = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
        attn = torch.zeros((n, width_p + width_r), dtype=torch.long)
        rmask = torch.zeros((n, width_r))
        lp = torch.zeros((n, width_r)) if rollout_logprobs is not None else None
        blp = torch.zeros((n, width_r)) if behavior_logprobs is not None else None
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, width_p - len(p):width_p] = torch.tensor(list(p), dtype=torch.long)
            attn[i, width_p - len(p):width_p] = 1
            if len(r):
                ids[i, width_p:width_p + len(r)] = torch.tensor(list(r), dtype=torch.long)
                attn[i, width_p:width_p + len(r)] = 1
                rmask[i, :len(r)] = 1
                if lp is not None:
                    lp[i, :len(r)] = torch.tensor(list(rollout_logprobs[i]), dtype=torch.float)
                if blp is not None:
                    blp[i, :len(r)] = torch.tensor(list(behavior_logprobs[i]), dtype=torch.float)
        return SequenceBatch(ids, attn, rmask, width_p, lp, blp)


@dataclass
class TeacherScores:
    """The teacher's next-token distribution at every response token.

    Full: `logp` is (B, R, V) and `index` is None. Top-k: `logp` and `index` are (B, R, k) and
    `tail` (B, R) is log(1 - sum of the top-k probabilities), the mass of all other tokens.
    """
    logp: torch.Tensor | None  # (B, R, V) or (B, R, k) float: log p*(a | s_j), teacher temperature applied;
    # None under teacher.signal 'token' (only token_logp is shipped)
    index: torch.Tensor | None = None  # (B, R, k) token ids of the top-k entries (int32 in transit)
    tail: torch.Tensor | None = None  # (B, R) float: log of the mass outside the top-k
    token_logp: torch.Tensor | None = None  # (B, R) log p*(y_j | s_j) of the response tokens (exact
    # even under top-k: MiniLLM's reward needs it for tokens outside the top-k)
    hidden: torch.Tensor | None = None  # (B, R, H_teacher) last hidden state, when the critic reads it

    def select(self, rows: slice | torch.Tensor) -> TeacherScores:
        return _select(self, rows)

    def to(self, device: str | torch.device) -> TeacherScores:
        """On `device`, ready for the losses: fp32 values and int64 ids (they ship as bf16 / int32)."""
        def f32(t):
            return None if t is None else to_device(t, device).float()
        index = None if self.index is None else to_device(self.index, device).long()
        return TeacherScores(f32(self.logp), index, f32(self.tail), f32(self.token_logp), f32(self.hidden))

    def shard(self, n: int) -> list[TeacherScores]:
        return _shard(self, n)


def shard_named(named: dict, n: int) -> list[dict]:
    """{'on': batch, 'off': batch} -> n dicts of the same names holding rank i's rows."""
    return [dict(zip(named, parts)) for parts in zip(*(v.shard(n) for v in named.values()))]


def split_named(named: dict, n: int) -> list[dict]:
    """Like shard_named, but the n contiguous row ranges may differ in size by one (micro-batches)."""
    def ranges(v):
        size = _rows(v)
        cuts = [size * i // n for i in range(n + 1)]
        return [v.select(slice(a, b)) for a, b in zip(cuts, cuts[1:])]
    return [dict(zip(named, parts)) for parts in zip(*(ranges(v) for v in named.values()))] if named else [{}] * n


def _select(obj, rows):
    return replace(obj, **{f.name: getattr(obj, f.name)[rows] for f in fields(obj)
                           if isinstance(getattr(obj, f.name), torch.Tensor)})


def _rows(obj) -> int:
    if isinstance(obj, TeacherScores):  # signal 'token' ships no distribution, only token_logp
        return len(obj.logp if obj.logp is not None else obj.token_logp)
    return len(obj)


def _shard(obj, n: int) -> list:
    size = _rows(obj)
    if size % n:
        raise ValueError(f"batch of {size} rows cannot be split evenly into {n} shards")
    k = size // n
    return [obj.select(slice(i * k, (i + 1) * k)) for i in range(n)]


@dataclass
class StudentForward:
    """What the learner computes on one SequenceBatch and hands to an objective.

    `scores` holds full log-probs, or, when `lse` is given, the raw logits (model dtype) and their
    fp32 log-normaliser: log q(a) = logits(a) − lse. Losses on a top-k teacher then only gather k
    entries (`support_logp`), and no (B, R, V) fp32 log-softmax is made unless a loss needs the
    whole vocabulary (`logp`).
    """
    scores: torch.Tensor  # (B, R, V) log q_θ(a | s_j), or logits when `lse` is set; differentiable when training
    targets: torch.Tensor  # (B, R) long: the response tokens y_j
    mask: torch.Tensor  # (B, R) float: response mask
    teacher: TeacherScores | None = None  # teacher distributions at the same positions
    critic: torch.Tensor | None = None  # (B, R, V) or (B, R, k) f(s_j, a), differentiable when training the critic
    rollout_logprobs: torch.Tensor | None = None  # (B, R) sampling-time log-probs, if on-policy
    behavior_logprobs: torch.Tensor | None = None  # (B, R) log-probs under the sampling mixture, if any
    old_logp: torch.Tensor | None = None  # (B, R) log q_θold(y_j) before this batch's first update (PPO)
    adapted_logp: torch.Tensor | None = None  # (B, R, V) OKD: the LoRA teacher's log-probs, computed in
    # the learner; differentiable (to the LoRA only) when training the teacher
    lse: torch.Tensor | None = None  # (B, R) fp32 logsumexp of `scores` when they are logits
    frozen_logp: torch.Tensor | None = None  # (B, R, V) OKD: the teacher without its LoRA (no gradient), for
    # the adapted teacher's drift metrics and the optional trust region

    @property
    def logp(self) -> torch.Tensor:  # (B, R, V) fp32 log q_θ(a | s_j) over the whole vocabulary
        return self.scores if self.lse is None else self.scores.float() - self.lse.unsqueeze(-1)

    def logp_at(self, index: torch.Tensor) -> torch.Tensor:  # (B, R, k) log q_θ at (B, R, k) ids
        if self.lse is None:
            return self.scores.gather(-1, index)
        return self.scores.gather(-1, index).float() - self.lse.unsqueeze(-1)

    def support_logp(self) -> torch.Tensor:
        """Student log-probs on the teacher's support: (B, R, k) at its top-k ids, else (B, R, V)."""
        t = self.teacher
        return self.logp if t is None or t.index is None else self.logp_at(t.index)

    @property
    def token_logp(self) -> torch.Tensor:  # (B, R) log q_θ(y_j | s_j)
        return self.logp_at(self.targets.unsqueeze(-1)).squeeze(-1)
