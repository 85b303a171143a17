"""Composition root: the only module of the core that imports actors/ and learners/.

run(cfg) = prepare data and models (no Ray yet, so bad input fails fast) -> join or start a Ray
cluster -> start the teacher, rollout and learner groups -> evaluate the starting point -> train ->
save the student -> evaluate -> write the completion marker last.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlkd import checkpoint
from rlkd.algorithms import Method, build_method, teacher_signal
from rlkd.cluster import (
    ActorGroup,
    check_reachable,
    connect_ray,
    layout,
    placement,
    resources,
    shutdown_ray,
    unplaced,
    wait_placed,
)
from rlkd.config import Config, ConfigError, to_dict
from rlkd.controller import Controller, StepSettings
from rlkd.data import PromptSampler
from rlkd.eval import evaluate_dir, evaluate_model, sampler_from_dir, sampler_from_group
from rlkd.loop import stop_on_sigterm
from rlkd.outputs import (
    RunLock,
    format_table,
    make_run_dir,
    mark_completed,
    run_dir_for,
    run_summary,
    write_json,
    write_yaml,
)
from rlkd.prepare import Prepared, prepare
from rlkd.teacher_cache import TeacherGenerations
from rlkd.teacher_probe import probe


@dataclass
class Groups:
    learners: object
    rollouts: ActorGroup
    teachers: ActorGroup
    method: Method
    row_teachers: dict = field(default_factory=dict)  # model.teachers: name -> ActorGroup

    def shutdown(self) -> None:
        """Stop every actor of the run (on a shared cluster they would otherwise outlive it)."""
        self.learners.shutdown()
        self.rollouts.kill()
        for group in self.row_teachers.values():
            group.kill()
        self.teachers.kill()


def start_groups(cfg: Config, prep: Prepared, method: Method, teacher_samples_cached: bool = False,
                 log: Callable = print, name: str = "") -> Groups:
    """Start the actors `method` needs. `teacher_samples_cached`: every training prompt already has a
    teacher response on disk, so generating methods need no teacher actor for it. With `name`, the
    teacher and rollout actors are named `rlkd:<name>:teacher:<i>` / `...:rollout:<i>` (ray.get_actor).

    Ray restarts a dead teacher or rollout actor up to run.max_actor_restarts times. Teacher calls
    are stateless, so Ray retries them itself; rollout calls are retried by their ActorGroup, which
    first pushes the current weights into the restarted actor."""
    import ray

    t0, m = time.time(), method
    pg = ray.util.get_current_placement_group()  # set inside a Ray Tune trial: the bundles of `layout`
    where = layout(cfg, m)

    def options(role: str, i: int, section) -> dict:
        bundle = where.first(role) + i if pg is not None else 0
        return {"num_cpus": section.num_cpus, "num_gpus": section.num_gpus, "max_restarts": cfg.run.max_actor_restarts,
                **({"resources": section.resources} if section.resources and pg is None else {}),
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(section.num_cpus)))}},
                **({"name": f"rlkd:{name}:{role}:{i}"} if name else {}), **placement(pg, bundle)}
    # OKD and SFT need no teacher actor (OKD's teacher lives in the learners); SeqKD none once all is cached
    need_teacher = m.needs_teacher_scores or (m.uses_teacher_generations and not teacher_samples_cached)
    teachers = _start_teachers(cfg, prep, m, options) if need_teacher else []
    named = {n: _start_teachers(cfg, prep, m, options, n) for n in prep.teachers} if need_teacher else {}
    rollouts = _start_rollouts(cfg, prep, m, options) if m.uses_rollouts else []
    learners = _start_learners(cfg, prep, m, (pg, where.first("learner")) if pg else None, name)
    wait_placed([x.ready.remote() for x in teachers + rollouts + [a for g in named.values() for a in g]],
                cfg.run.placement_timeout_s,
                f"{len(teachers)} teacher and {len(rollouts)} rollout actor(s) ({where.bundles[2:]})")
    lc = cfg.learner
    log(f"actors: {len(teachers)} teacher, {len(rollouts)} rollout ({cfg.rollout.backend if rollouts else '-'}), "
        f"{lc.num_ranks} learner rank(s) ZeRO-{lc.zero_stage}, student {learners.num_params / 1e6:.2f}M params "
        f"({time.time() - t0:.0f}s)")
    restarts = cfg.run.max_actor_restarts
    rollout_group = ActorGroup(rollouts, restarts, weights=learners.student_weights_ref)
    if rollouts and cfg.rollout.weight_sync == "collective":
        rollout_group.use_collective(*learners.connect_weight_sync(rollouts))
    return Groups(learners, rollout_group, ActorGroup(teachers, restarts), method,
                  {n: ActorGroup(g, restarts) for n, g in named.items()})


def engine_spec(cfg: Config, prep: Prepared, model_dir: Path, seed: int, **kw):
    """An engine's settings (actors.engines.EngineSpec); the model path absolute, since an actor may run on
    another node, in another working directory."""
    from actors.engines import EngineSpec

    tok, r = prep.tokenizer, cfg.rollout
    return EngineSpec(str(Path(model_dir).resolve()), tok.pad_token_id, tok.eos_token_id, vocab_size=prep.vocab_size,
                      trust_remote_code=cfg.model.trust_remote_code, seed=seed,
                      max_model_len=cfg.data.max_prompt_tokens + cfg.data.max_response_tokens + 8,
                      memory_fraction=r.vllm_memory_fraction, cpu_kv_cache_gib=r.vllm_cpu_kv_cache_gib,
                      enforce_eager=r.vllm_enforce_eager, **kw)


def _start_teachers(cfg: Config, prep: Prepared, method: Method, options: Callable, name: str = "") -> list:
    """teacher.num_actors replicas of model.teacher, or of model.teachers[name] (a teacher per row)."""
    import ray

    from actors.teacher import TeacherActor

    t = cfg.teacher
    signal, k = teacher_signal(t, method, prep.vocab_size)
    spec = engine_spec(cfg, prep, prep.teachers[name] if name else prep.teacher_dir, cfg.train.seed,
                       bf16_on_gpu=True, tensor_parallel_size=t.tensor_parallel_size, max_logprobs=max(k, 1),
                       devices=max(1, int(t.num_gpus)) if t.backend == "hf" else 1)
    role = f"teacher-{name}" if name else "teacher"
    return [ray.remote(TeacherActor).options(**options(role, i, t), max_task_retries=cfg.run.max_actor_restarts)
            .remote(spec, t.backend, topk=k, temperature=t.temperature, signal=signal) for i in range(t.num_actors)]


def _start_rollouts(cfg: Config, prep: Prepared, method: Method, options: Callable) -> list:
    import ray

    from actors.rollout import RolloutActor

    r = cfg.rollout
    mix_dir = str(Path(prep.teacher_dir).resolve()) if method.mix_alpha else None  # MiniLLM: both in one loop
    return [ray.remote(RolloutActor).options(**options("rollout", i, r)).remote(
        engine_spec(cfg, prep, prep.student_dir, cfg.train.seed + i), r.backend, mix_teacher_dir=mix_dir)
        for i in range(r.num_actors)]


def _start_learners(cfg: Config, prep: Prepared, m: Method, placement_of_rank0: tuple | None, name: str = ""):
    lc, adapted = cfg.learner, None
    if m.adapted_teacher is not None:  # OKD: the teacher + LoRA trains in the learner group
        o = m.adapted_teacher
        adapted = dict(teacher_dir=str(Path(prep.teacher_dir).resolve()), rank=o.lora_rank, scale=o.lora_scale,
                       targets=o.lora_targets, lr=o.teacher_lr)
    try:
        return _learner_group(cfg, prep, m, placement_of_rank0, adapted, name)
    except TimeoutError:
        what = f"{lc.num_ranks} learner rank(s) of {resources(lc.num_cpus, lc.num_gpus)}"
        raise ConfigError(unplaced(what, cfg.run.placement_timeout_s)) from None


def _learner_group(cfg: Config, prep: Prepared, m: Method, placement_of_rank0, adapted, name: str = ""):
    from learners.group import LearnerGroup

    lc = cfg.learner
    return LearnerGroup(lc.num_ranks, lc.num_cpus, lc.num_gpus, resources=lc.resources, name=name,
                        student_dir=str(Path(prep.student_dir).resolve()),
                        vocab_size=prep.vocab_size, zero_stage=lc.zero_stage, student_lr=lc.student_lr,
                        critic_lr=lc.critic_lr_value, weight_decay=lc.weight_decay, grad_clip=lc.grad_clip,
                        critic_heads=m.critic_heads, critic_network=m.critic_network, critic_bound=m.critic_bound,
                        critic_hidden=_critic_hidden(cfg, prep, m), adapted_teacher=adapted, seed=cfg.train.seed,
                        placement=placement_of_rank0, placement_timeout=cfg.run.placement_timeout_s,
                        trust_remote_code=cfg.model.trust_remote_code, micro_batch_size=lc.micro_batch_size,
                        gradient_checkpointing=lc.gradient_checkpointing)


def _critic_hidden(cfg: Config, prep: Prepared, method: Method) -> int | None:
    """The teacher's hidden width when the AMMD critic reads the teacher's hidden state, else None."""
    if not method.critic_heads or method.critic_input != "teacher":
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(prep.teacher_dir, trust_remote_code=cfg.model.trust_remote_code).hidden_size


def controller(cfg: Config, prep: Prepared, groups: Groups, teacher_cache: dict) -> Controller:
    tok, r = prep.tokenizer, cfg.rollout
    settings = StepSettings(batch_size=cfg.train.batch_size, max_new_tokens=cfg.data.max_response_tokens,
                            temperature=r.temperature, top_p=r.top_p, sync_every=r.sync_every,
                            sync_check_tol=r.sync_check_tol, pad_id=tok.pad_token_id, seed=cfg.train.seed,
                            vocab_size=prep.vocab_size, max_staleness=r.max_staleness)
    return Controller(groups.method, settings, PromptSampler(prep.train, cfg.train.seed), groups.learners,
                      groups.rollouts, groups.teachers, teacher_cache, prep.val, groups.row_teachers)


def _evaluate_now(cfg: Config, prep: Prepared, groups: Groups, ctl: Controller, run_dir: Path) -> dict:
    """Validation scores of the current student, for curves against step and training wall clock (the
    test split stays unseen). The rollout actors already hold the student after a sync, so they sample
    it; with the vLLM backend (no n-gram blocking, which the protocol needs) or a method without rollout
    actors, the student is written to disk and sampled by fresh tasks instead."""
    import shutil

    t0, tok = time.time(), prep.tokenizer
    if len(groups.rollouts) and cfg.rollout.backend == "hf":
        ctl.sync_now()
        score = evaluate_model(cfg, tok, sampler_from_group(cfg, groups.rollouts), prep.val)
    else:
        snapshot = run_dir / "eval_snapshot"
        groups.learners.save_student(str(snapshot))
        score = evaluate_dir(cfg, tok, snapshot, prep.val)
        shutil.rmtree(snapshot, ignore_errors=True)
    return {"eval/rougeL": score["rougeL_mean"], "eval/exact_match": score["exact_match_mean"],
            "eval/greedy_exact_match": score["greedy"]["exact_match"], "eval/seconds": time.time() - t0}


def run(cfg: Config, log: Callable = print, resume: Path | None = None, on_step: Callable | None = None) -> Path:
    """Run one distillation job end to end, or continue `resume` (a run directory) from its last
    checkpoint; returns the run directory. on_step(metrics, checkpoint_dir | None) follows every step.
    The run directory is locked (outputs.RunLock) from its creation, or the resume, until COMPLETED."""
    t_start = time.time()
    check_reachable(cfg.run.ray_address)  # an unreachable cluster fails in seconds, before the run directory
    ckpt = checkpoint.resumable(resume, log) if resume is not None else None  # before any work: fail fast
    lock = RunLock.take(Path(resume), "--resume") if resume is not None else None
    try:
        if resume is None:
            run_dir_for(cfg.run.output_dir, cfg.run.name, cfg.algo.method)  # fail before the slow preparation
        prep = prepare(cfg, log)
        method = _method_on_its_rows(cfg, prep, log)
        if resume is None:
            run_dir = _new_run_dir(cfg, prep)
            lock = RunLock.take(run_dir, "run.name")
        else:  # the harmless overrides a resume allows (rlkd.main) are recorded
            run_dir = Path(resume).resolve()
            write_yaml(run_dir / "config.yaml", to_dict(cfg))
        log(f"run: {method.label} -> {run_dir}")
        scores, history = _train(cfg, prep, method, run_dir, ckpt, log, on_step)
        summary = run_summary(cfg, method, prep, scores, history, time.time() - t_start)
        write_json(run_dir / "eval.json", summary)
        mark_completed(run_dir, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": len(history)})
    finally:
        if lock is not None:
            lock.release()
    log(format_table(summary, run_dir))
    return run_dir


def _method_on_its_rows(cfg: Config, prep: Prepared, log: Callable):
    """The method, with prep.train narrowed to the rows it may draw: in the label-scarce regime
    (data.labelled_rows) a method that trains on answers sees only the labelled rows."""
    def build(rows: int):
        return build_method(cfg.algo, cfg.train.seed, cfg.train.steps, max(1, rows // cfg.train.batch_size))

    method, n = build(len(prep.train)), cfg.data.labelled_rows
    if n > len(prep.train):
        raise ConfigError(f"config field data.labelled_rows={n} is invalid: at most the {len(prep.train)} train rows")
    if n:
        if method.uses_gold:
            prep.train = prep.train[:n]
            method = build(n)
        log(f"data: label-scarce: {n} of the train rows keep their answers; {cfg.algo.method} draws from "
            f"{len(prep.train)} rows ({'it trains on answers' if method.uses_gold else 'it needs only prompts'})")
    return method


def _probe_teachers(cfg: Config, prep: Prepared, groups: Groups, log: Callable) -> None:
    """A garbage or mis-loaded replica of any teacher is caught before step 1 (rlkd.teacher_probe)."""
    for name, group in {"": groups.teachers, **groups.row_teachers}.items():
        if len(group) and cfg.teacher.probe:
            p = probe(group, prep.val, prep.tokenizer.pad_token_id, prep.vocab_size, cfg.teacher.probe_tol)
            log(f"teacher{' ' + name if name else ''}: probe of {len(group)} replica(s): gold CE "
                f"{p['teacher/probe_gold_ce']:.3f} nats (log V = {math.log(prep.vocab_size):.2f}), replicas within "
                f"{p['teacher/probe_replica_gap']:.2g}")


def _train(cfg: Config, prep: Prepared, method, run_dir: Path, ckpt: Path | None, log: Callable,
           on_step: Callable | None) -> tuple[dict, list]:
    """The Ray part of a run: actors and learners, baselines, the training loop, the final student and its
    evaluation. Returns (scores, metrics history)."""
    from rlkd.loop import TrainLoop

    started = connect_ray(cfg.run.num_cpus, log, cfg.run.ray_address)
    stop_on_sigterm()  # after ray.init, whose own handler would dump core instead
    groups = None
    try:
        cache = TeacherGenerations(cfg, prep)
        groups = start_groups(cfg, prep, method, cache.covers(prep.train), log, name=run_dir.name)
        _probe_teachers(cfg, prep, groups, log)
        state = checkpoint.load_state(ckpt) if ckpt else None
        scores = state["scores"] if state else _baselines(cfg, prep, groups)
        ctl = controller(cfg, prep, groups, cache.responses)
        loop = TrainLoop(cfg, ctl, groups.learners, cache, run_dir, log,
                         lambda: _evaluate_now(cfg, prep, groups, ctl, run_dir), on_step, {"scores": scores},
                         lambda ckpt: prep.tokenizer.save_pretrained(str(ckpt / "student")))
        if ckpt is not None:
            loop.restore(ckpt, state)
        history = loop.run()
        final_dir = run_dir / "student"
        groups.learners.save_student(str(final_dir))
        prep.tokenizer.save_pretrained(str(final_dir))
        if method.adapted_teacher is not None:  # OKD: the adapted teacher is a result too
            groups.learners.save_adapted_teacher(str(run_dir / "teacher_adapter"))
        scores["student_after"] = with_forced(cfg, prep, final_dir,
                                               evaluate_dir(cfg, prep.tokenizer, final_dir, prep.test))
    finally:
        if groups is not None:
            groups.shutdown()
        shutdown_ray(started)
    return scores, history


def _new_run_dir(cfg: Config, prep: Prepared) -> Path:
    run_dir = make_run_dir(cfg.run.output_dir, cfg.run.name, cfg.algo.method)
    resolved = to_dict(cfg)
    resolved["model"].update(teacher=str(prep.teacher_dir), student=str(prep.student_dir))
    write_yaml(run_dir / "config.yaml", resolved)
    return run_dir


def _baselines(cfg: Config, prep: Prepared, groups: Groups) -> dict:
    if not cfg.eval.baselines:
        return {}
    tok = prep.tokenizer
    # the evaluation protocol blocks repeated n-grams, which vLLM cannot: a vLLM teacher is evaluated with HF
    teacher = (sampler_from_group(cfg, groups.teachers) if len(groups.teachers) and cfg.teacher.backend == "hf"
               else sampler_from_dir(cfg, tok, prep.teacher_dir))
    return {"teacher": with_forced(cfg, prep, prep.teacher_dir, evaluate_model(cfg, tok, teacher, prep.test)),
            "student_before": with_forced(cfg, prep, prep.student_dir,
                                           evaluate_dir(cfg, tok, prep.student_dir, prep.test))}


def with_forced(cfg: Config, prep: Prepared, model_dir: Path, scores: dict | None) -> dict | None:
    """`scores` with the model's TOP-1 agreement with the teacher and gold cross-entropy on the same rows."""
    import ray

    from rlkd.eval import gold_agreement

    if scores is None:
        return None
    rows, tok = prep.test[:cfg.eval.num_examples], prep.tokenizer
    scores["forced"] = ray.get(ray.remote(num_cpus=1)(gold_agreement).remote(
        str(Path(prep.teacher_dir).resolve()), str(Path(model_dir).resolve()), prep.vocab_size, tok.pad_token_id, tok.eos_token_id,
        [r.prompt_ids for r in rows], [r.response_ids for r in rows]))
    return scores
