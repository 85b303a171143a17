"""LearnerWorker: one DeepSpeed rank holding the student (and the critic heads, and for OKD the
LoRA-adapted teacher).

It never names a method: the controller hands it an objective callable and the targets to step
('student', 'critic', 'teacher'). Objectives return globally-normalised sums, so each loss is
multiplied by the world size to undo DeepSpeed's gradient averaging: N ranks then take exactly the
1-rank gradient step.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlkd.batch import SequenceBatch, StudentForward, TeacherScores, pick, split_named
from rlkd.forward import logsumexp, response_forward
from rlkd.objectives import ObjectiveContext


def _resolve(value):
    """An ObjectRef straight from a teacher actor, or the scores themselves (in-process, no Ray)."""
    if type(value).__module__.startswith("ray"):
        import ray

        return ray.get(value)
    return value


def _peak_gib() -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set (ru_maxrss, KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _accumulate(sums: dict, metrics: dict) -> None:
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Slot:
    """One micro-batch of a loaded shard: named batches, their teacher scores and global token counts."""
    batches: dict[str, SequenceBatch]
    teacher: dict[str, TeacherScores]
    n_tokens: dict[str, float]
    old_logp: dict[str, torch.Tensor]  # PPO: log q_old before the first update
    cache: bool = True  # keep no-grad student forwards (off with micro-batches: memory stays one micro-batch)
    frozen: dict[str, tuple] = field(default_factory=dict)  # no-grad student forwards, until the student steps


def num_micro_batches(batches: dict[str, SequenceBatch], size: int | None) -> int:
    """ceil(rows / size) for the largest named batch, at most the smallest one's rows (every micro-batch
    holds every name); 1 without a size."""
    rows = [len(b) for b in batches.values()]
    return 1 if not size or not rows else max(1, min(-(-max(rows) // size), min(rows)))


class LearnerWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.critic = None
        self.adapted = None  # OKD: DeepSpeed engine of the teacher + LoRA
        self.critic_reads_teacher = False
        self.slots: dict[str, list[Slot]] = {}  # micro-batches by slot name: 'step' (training), 'val'
        self.micro_batch_size: int | None = None
        self.score_bytes = 0  # bytes of teacher scores the last load_batch received (metric scores/bytes)

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, student_dir: str, vocab_size: int, zero_stage: int,
              student_lr: float, critic_lr: float, weight_decay: float, grad_clip: float,
              critic_heads: tuple[str, ...] = (), critic_network: str = "linear", critic_bound: float = 1.0,
              critic_hidden: int | None = None, adapted_teacher: dict | None = None,
              seed: int = 0, trust_remote_code: bool = False, micro_batch_size: int | None = None,
              gradient_checkpointing: bool = False) -> int:
        """Join the process group and build the DeepSpeed engines; returns the student's #params.

        `micro_batch_size`: rows per forward/backward of each named batch; the gradients of a shard's
        micro-batches accumulate into one optimizer step. `gradient_checkpointing`: recompute the
        student's layer activations in the backward pass (HF's non-reentrant checkpointing)."""
        import deepspeed

        from learners.critic import CriticHeads
        from learners.ds_config import deepspeed_config
        from rlkd.models import load_model, use_allotted_threads

        use_allotted_threads()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        gpu = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
        torch.manual_seed(seed)
        self.vocab_size, self.zero_stage = vocab_size, zero_stage
        model = load_model(student_dir, trust_remote_code)
        self.micro_batch_size = micro_batch_size
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # HF checkpoints only in training mode; the tiny and real students have no dropout
        ds = dict(zero_stage=zero_stage, weight_decay=weight_decay, grad_clip=grad_clip, bf16=gpu)
        self.student, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                config=deepspeed_config(lr=student_lr, **ds))
        if critic_heads:  # critic_hidden: the teacher's width when the critic reads the teacher's state
            self.critic_reads_teacher = critic_hidden is not None
            heads = CriticHeads(critic_hidden or model.config.hidden_size, vocab_size, tuple(critic_heads),
                                critic_network, critic_bound)
            self.critic, *_ = deepspeed.initialize(model=heads, model_parameters=heads.parameters(),
                                                   config=deepspeed_config(lr=critic_lr, **{**ds, "bf16": False}))
        if adapted_teacher is not None:
            from learners.adapted_teacher import lora_teacher

            t = adapted_teacher
            peft_model = lora_teacher(t["teacher_dir"], t["rank"], t["scale"], t["targets"], trust_remote_code)
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            self.adapted, *_ = deepspeed.initialize(model=peft_model, model_parameters=trainable,
                                                    config=deepspeed_config(lr=t["lr"] or student_lr, **ds))
        return sum(p.numel() for p in model.parameters()) if zero_stage < 3 else sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    # ---- data -------------------------------------------------------------------------------

    def load_batch(self, batches: dict[str, SequenceBatch], teacher: dict, n_tokens: dict[str, float],
                   snapshot_old_logp: bool = False, slot: str = "step") -> None:
        """Store this rank's shard in `slot`, on the learner's device, cut into micro-batches. Teacher
        scores may arrive as ObjectRefs straight from the teacher actors (never through the driver). With
        `snapshot_old_logp`, record log q_old of the response tokens now, before any update (PPO's ratio
        denominator)."""
        device = self.student.device  # the engine's device: batches and scores arrive on the host
        batches = {k: b.to(device) for k, b in batches.items()}
        shipped = {k: _resolve(v) for k, v in teacher.items()}
        self.score_bytes = sum(t.numel() * t.element_size() for sc in shipped.values()
                               for t in vars(sc).values() if isinstance(t, torch.Tensor))
        scores = {k: v.to(device) for k, v in shipped.items()}
        n = num_micro_batches(batches, self.micro_batch_size)
        self.slots[slot] = [
            Slot(b, t, n_tokens, {k: self.logprobs(x) for k, x in b.items()} if snapshot_old_logp else {}, n == 1)
            for b, t in zip(split_named(batches, n), split_named(scores, n))]

    def _forward(self, s: Slot, name: str, targets: tuple[str, ...]) -> StudentForward:
        batch, teacher = s.batches[name], s.teacher.get(name)
        use_critic = self.critic is not None and name in self.critic.module.heads
        student_hidden = use_critic and not self.critic_reads_teacher
        logits, lse, hidden = self._student_forward(s, name, "student" in targets, student_hidden)
        adapted = frozen = None
        if self.adapted is not None:
            with torch.set_grad_enabled("teacher" in targets):
                adapted = torch.log_softmax(response_forward(self.adapted, batch, self.vocab_size)[0], -1)
            with torch.no_grad(), self.adapted.module.disable_adapter():  # the frozen teacher: its drift
                frozen = torch.log_softmax(response_forward(self.adapted, batch, self.vocab_size)[0], -1)
        fwd = StudentForward(logits, batch.responses, batch.response_mask, teacher, None, batch.rollout_logprobs,
                             batch.behavior_logprobs, s.old_logp.get(name), adapted, lse=lse, frozen_logp=frozen)
        if use_critic:
            with torch.set_grad_enabled("critic" in targets):
                h = teacher.hidden if self.critic_reads_teacher else hidden.detach()
                ratio = teacher.logp - fwd.support_logp().detach() if self.critic.module.log_ratio else None
                fwd.critic = self.critic(name, h, None if teacher is None else teacher.index, ratio)
        return fwd

    def _student_forward(self, s: Slot, name: str, grad: bool, with_hidden: bool):
        """Student logits (model dtype), their fp32 logsumexp, and the hidden state on batch `name`: no
        (B, R, V) fp32 log-softmax (docs/algorithms.md#conventions). Without a gradient the result is kept
        until the student steps or the slot is reloaded: the K critic updates of a step share one forward."""
        if not grad and name in s.frozen:
            return s.frozen[name]
        s.frozen.pop(name, None)  # a (B, R, V) tensor: never hold two at once
        with torch.set_grad_enabled(grad):
            logits, hidden = response_forward(self.student, s.batches[name], self.vocab_size, with_hidden, fp32=False)
            out = logits, logsumexp(logits), hidden
        if not grad and s.cache:
            s.frozen[name] = out
        return out

    def _student_moved(self) -> None:
        for parts in self.slots.values():
            for s in parts:
                s.frozen.clear()

    # ---- training ---------------------------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.clone()
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def train(self, objective: Callable, targets: str | tuple[str, ...] = "student",
              check_sync: bool = False, collapse: bool = True, slot: str = "step") -> dict[str, float]:
        """One optimizer step of each target ('student', 'critic', 'teacher') on the shard in `slot`.

        The objective returns one loss, or {target: loss} when one forward trains several models.
        Returns its metrics summed over ranks (global values). With `check_sync`, also the mean
        |rollout log-prob − learner log-prob| of on-policy tokens. With `collapse` and a student step,
        also the collapse detectors (context TV, distinct argmax, entropy) of this forward.
        """
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        engines = {"student": self.student, "critic": self.critic, "teacher": self.adapted}
        for t in targets:
            if engines.get(t) is None:
                raise ValueError(f"cannot train {t!r} on this learner")
        parts, sums, out = self.slots[slot], {}, {}
        for i, s in enumerate(parts):  # gradients accumulate over the micro-batches; one step at the end
            if len(parts) > 1:
                for t in targets:
                    engines[t].set_gradient_accumulation_boundary(i == len(parts) - 1)
            fwd = {k: self._forward(s, k, targets) for k in s.batches}
            loss, metrics = objective(fwd, ObjectiveContext(s.n_tokens, self._all_reduce))
            per_target = loss if isinstance(loss, dict) else {targets[0]: loss}
            for t in targets:
                if not torch.isfinite(per_target[t]):
                    raise FloatingPointError(f"non-finite {t} loss {per_target[t].item()} on rank {self.rank}")
            for t in targets:  # separate graphs (the other model's output is detached in each loss)
                engines[t].backward(per_target[t] * self.world_size)
            if check_sync:
                metrics.update(self._sync_gap(fwd, s.n_tokens))
            _accumulate(sums, metrics)  # every metric is normalised by the global token count: they add up
            if i == 0 and collapse and "student" in targets:  # the detectors of the first micro-batch
                out.update(self._collapse(fwd))
            del fwd, loss, per_target
        for t in targets:
            engines[t].step()
        if "student" in targets:
            self._student_moved()
        out.update(self._global({**sums, "scores/bytes": float(self.score_bytes)}))
        out["memory/learner_peak_gib"] = _peak_gib()  # this rank's; every rank holds the same shapes
        return out

    def _collapse(self, fwd: dict[str, StudentForward]) -> dict[str, float]:
        """Collapse detectors of the student (and, for scale, the full-vocabulary teacher) per batch name."""
        from rlkd.metrics import collapse_stats

        out = {}
        for name, f in fwd.items():
            models = {"student": f.logp}
            if f.teacher is not None and f.teacher.index is None and f.teacher.logp is not None:  # full signal
                models["teacher"] = f.teacher.logp
            for who, logp in models.items():
                for k, v in collapse_stats(logp.detach(), f.mask, self._all_reduce).items():
                    out[f"collapse/{who}_{k}_{name}"] = v
        return out

    @torch.no_grad()
    def evaluate(self, objective: Callable, slot: str = "step") -> dict[str, float]:
        """The objective's metrics on the shard in `slot`, without any update (validation losses)."""
        sums = {}
        for s in self.slots[slot]:
            fwd = {k: self._forward(s, k, ()) for k in s.batches}
            _accumulate(sums, objective(fwd, ObjectiveContext(s.n_tokens, self._all_reduce))[1])
        return self._global(sums)

    def _global(self, metrics: dict) -> dict[str, float]:
        keys = sorted(metrics)
        values = self._all_reduce(torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32) for k in keys]))
        return dict(zip(keys, values.tolist()))

    def _sync_gap(self, fwd: dict[str, StudentForward], n_tokens: dict[str, float]) -> dict[str, torch.Tensor]:
        out = {}
        for name, f in fwd.items():
            if f.rollout_logprobs is not None:
                gap = ((f.token_logp.detach() - f.rollout_logprobs).abs() * f.mask).sum() / n_tokens[name]
                out[f"sync/logprob_gap_{name}"] = gap
        return out

    @torch.no_grad()
    def logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """log q_θ(y_j) of the response tokens under the current student (PPO's log q_old snapshot)."""
        logits = response_forward(self.student, batch, self.vocab_size, fp32=False)[0]
        return pick(logits, batch.responses).float() - logsumexp(logits)

    # ---- weights ----------------------------------------------------------------------------

    def _full_state(self, module) -> dict[str, torch.Tensor] | None:
        """The full state dict on rank 0 (gathered from shards under ZeRO-3); None elsewhere."""
        import deepspeed

        params = list(module.parameters()) if self.zero_stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero_stage == 3):
            if self.rank != 0:
                return None
            return {k: v.detach().to("cpu", torch.float32).contiguous().clone()
                    for k, v in module.state_dict().items()}

    def student_weights(self) -> bytes | None:
        """Student weights as safetensors bytes on rank 0 (every rank must call: ZeRO-3 gathers)."""
        from safetensors.torch import save

        state = self._full_state(self.student.module)
        return None if state is None else save(state)

    def weight_layout(self, dtype: str):
        """The collective sync's layout of the student (rlkd.weight_sync), in the rollout engines' dtype."""
        from rlkd.weight_sync import layout_of

        return layout_of([(k, getattr(p, "ds_shape", p.shape)) for k, p in self.student.module.named_parameters()],
                         dtype)

    def join_weight_group(self, host: str, port: int, world_size: int, layout) -> None:
        """Rank 0 joins the sync group as its rank 0 (blocks until every rollout engine has joined)."""
        from rlkd import weight_sync

        self.sync_layout = layout
        self.sync_group = weight_sync.join(host, port, 0, world_size, self.student.device)

    def send_weights(self) -> int:
        """Broadcast the student over the sync group; returns the bytes sent (every rank must call: ZeRO-3
        gathers each parameter, and only rank 0 sends)."""
        import deepspeed

        from rlkd import weight_sync

        params = [p for _, p in self.student.module.named_parameters()]
        with deepspeed.zero.GatheredParameters(params if self.zero_stage == 3 else [], enabled=self.zero_stage == 3):
            if self.rank == 0:
                weight_sync.send(self.sync_group, params, self.sync_layout)
        return self.sync_layout.nbytes if self.rank == 0 else 0

    def save_student(self, out_dir: str) -> str | None:
        """save_pretrained (safetensors) on rank 0; every rank must call."""
        state = self._full_state(self.student.module)
        if state is not None:
            self.student.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        return out_dir if state is not None else None

    def save_adapted_teacher(self, out_dir: str) -> str | None:
        """OKD: the teacher's LoRA adapter (PEFT format: adapter_config.json + adapter_model.safetensors)."""
        state = self._full_state(self.adapted.module)
        if state is None:
            return None
        self.adapted.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        return out_dir

    # ---- checkpoints ------------------------------------------------------------------------

    def _engines(self) -> dict:
        return {k: v for k, v in (("student", self.student), ("critic", self.critic), ("teacher", self.adapted))
                if v is not None}

    def save_checkpoint(self, out_dir: str) -> None:
        """DeepSpeed checkpoints (module, optimizer, scheduler) of every engine under out_dir/deepspeed/<engine>,
        this rank's RNG state, and on rank 0 the student in HF format, the critic heads as safetensors and
        the teacher's LoRA adapter. Every rank must call (collective)."""
        from safetensors.torch import save_file

        for name, engine in self._engines().items():
            engine.save_checkpoint(f"{out_dir}/deepspeed", tag=name, save_latest=False)
        os.makedirs(f"{out_dir}/rng", exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, f"{out_dir}/rng/rank{self.rank}.pt")
        self.save_student(f"{out_dir}/student")
        if self.critic is not None:
            state = self._full_state(self.critic.module)
            if state is not None:
                save_file(state, f"{out_dir}/critic.safetensors")
        if self.adapted is not None:
            self.save_adapted_teacher(f"{out_dir}/teacher_adapter")

    def load_checkpoint(self, in_dir: str) -> None:
        """Restore what save_checkpoint wrote (engines, optimizer states, this rank's RNG). Nothing in the
        checkpoint can run code: every file is loaded with weights_only=True (learners/safe_checkpoint.py)."""
        from learners.safe_checkpoint import make_safe

        for name, engine in self._engines().items():
            make_safe(engine)
            path, _ = engine.load_checkpoint(f"{in_dir}/deepspeed", tag=name, load_module_strict=True)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint of the {name} under {in_dir}/deepspeed")
        rng = torch.load(f"{in_dir}/rng/rank{self.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        self._student_moved()

