"""LearnerWorker: one DeepSpeed rank holding the student (and the critic heads).

It never names a method: the controller hands it an objective callable and a target ('student' or
'critic'). Objectives return globally-normalised sums, so the loss is multiplied by the world size
to undo DeepSpeed's gradient averaging: N ranks then take exactly the 1-rank gradient step.
"""
from __future__ import annotations

import os
import socket
from typing import Callable, Optional

import torch

from rlkd.algorithms import ObjectiveContext
from rlkd.batch import SequenceBatch, StudentForward, TeacherScores
from rlkd.forward import response_forward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LearnerWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.critic = None
        self.batches: dict[str, SequenceBatch] = {}
        self.teacher: dict[str, TeacherScores] = {}
        self.n_tokens: dict[str, float] = {}

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, student_dir: str, vocab_size: int, zero_stage: int,
              student_lr: float, critic_lr: float, weight_decay: float, grad_clip: float,
              critic_heads: tuple[str, ...] = (), critic_network: str = "linear", critic_bound: float = 1.0,
              seed: int = 0, trust_remote_code: bool = False) -> int:
        """Join the process group and build the DeepSpeed engines; returns the student's #params."""
        import deepspeed

        from learners.critic import CriticHeads
        from learners.ds_config import deepspeed_config
        from rlkd.models import load_model

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        gpu = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
        torch.manual_seed(seed)
        self.vocab_size, self.zero_stage = vocab_size, zero_stage
        model = load_model(student_dir, trust_remote_code)
        ds = dict(zero_stage=zero_stage, weight_decay=weight_decay, grad_clip=grad_clip, bf16=gpu)
        self.student, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                config=deepspeed_config(lr=student_lr, **ds))
        if critic_heads:
            heads = CriticHeads(model.config.hidden_size, vocab_size, tuple(critic_heads), critic_network, critic_bound)
            self.critic, *_ = deepspeed.initialize(model=heads, model_parameters=heads.parameters(),
                                                   config=deepspeed_config(lr=critic_lr, **{**ds, "bf16": False}))
        return sum(p.numel() for p in model.parameters()) if zero_stage < 3 else sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    # ---- data -------------------------------------------------------------------------------

    def load_batch(self, batches: dict[str, SequenceBatch], teacher: dict, n_tokens: dict[str, float]) -> None:
        """Store this rank's shard for the step. Teacher scores may arrive as ObjectRefs straight
        from the teacher actors (never through the driver)."""
        import ray

        self.batches = batches
        self.teacher = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in teacher.items()}
        self.n_tokens = n_tokens

    def _forward(self, name: str, train_student: bool, train_critic: bool) -> StudentForward:
        batch = self.batches[name]
        use_critic = self.critic is not None and name in self.critic.module.heads
        with torch.set_grad_enabled(train_student):
            logits, hidden = response_forward(self.student, batch, self.vocab_size, with_hidden=use_critic)
            logp = torch.log_softmax(logits, -1)
        critic = None
        if use_critic:
            with torch.set_grad_enabled(train_critic):
                critic = self.critic(name, hidden.detach())
        return StudentForward(logp, batch.responses, batch.response_mask, self.teacher.get(name), critic,
                              batch.rollout_logprobs)

    # ---- training ---------------------------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.clone()
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def train(self, objective: Callable, target: str, check_sync: bool = False) -> dict[str, float]:
        """One optimizer step of `target` ('student' or 'critic') on the stored shard.

        Returns the objective's metrics summed over ranks (i.e. global values). With
        `check_sync`, also the mean |rollout log-prob − learner log-prob| of on-policy tokens.
        """
        if target not in ("student", "critic") or (target == "critic" and self.critic is None):
            raise ValueError(f"cannot train {target!r} on this learner")
        engine = self.student if target == "student" else self.critic
        fwd = {k: self._forward(k, target == "student", target == "critic") for k in self.batches}
        ctx = ObjectiveContext(self.n_tokens, self._all_reduce)
        loss, metrics = objective(fwd, ctx)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {target} loss {loss.item()} on rank {self.rank}")
        engine.backward(loss * self.world_size)
        engine.step()
        if check_sync:
            metrics.update(self._sync_gap(fwd))
        keys = sorted(metrics)
        values = self._all_reduce(torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32) for k in keys]))
        return dict(zip(keys, values.tolist()))

    def _sync_gap(self, fwd: dict[str, StudentForward]) -> dict[str, torch.Tensor]:
        out = {}
        for name, f in fwd.items():
            if f.rollout_logprobs is not None:
                gap = ((f.token_logp.detach() - f.rollout_logprobs).abs() * f.mask).sum() / self.n_tokens[name]
                out[f"sync/logprob_gap_{name}"] = gap
        return out

    @torch.no_grad()
    def logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """log q_θ(y_j) of the response tokens under the current student (for probes and tests)."""
        logits, _ = response_forward(self.student, batch, self.vocab_size)
        return torch.log_softmax(logits, -1).gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1)

    # ---- weights ----------------------------------------------------------------------------

    def _full_state(self, module) -> Optional[dict[str, torch.Tensor]]:
        """The full state dict on rank 0 (gathered from shards under ZeRO-3); None elsewhere."""
        import deepspeed

        params = list(module.parameters()) if self.zero_stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero_stage == 3):
            if self.rank != 0:
                return None
            return {k: v.detach().to("cpu", torch.float32).contiguous().clone()
                    for k, v in module.state_dict().items()}

    def student_weights(self) -> Optional[bytes]:
        """Student weights as safetensors bytes on rank 0 (every rank must call: ZeRO-3 gathers)."""
        from safetensors.torch import save

        state = self._full_state(self.student.module)
        return None if state is None else save(state)

    def save_student(self, out_dir: str) -> Optional[str]:
        """save_pretrained (safetensors) on rank 0; every rank must call."""
        state = self._full_state(self.student.module)
        if state is not None:
            self.student.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        return out_dir if state is not None else None
