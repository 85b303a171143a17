"""Composition root: the only module of the core that imports actors/ and learners/.

run(cfg) = prepare data and models (no Ray yet, so bad input fails fast) -> join or start a Ray
cluster -> start the teacher, rollout and learner groups -> evaluate the starting point -> train ->
save the student -> evaluate -> write the completion marker last.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlkd import checkpoint
from rlkd.algorithms import Method, build_method
from rlkd.cluster import ActorGroup, Layout, connect_ray, placement, resources
from rlkd.config import Config, to_dict
from rlkd.controller import Controller, StepSettings
from rlkd.data import PromptSampler, prompt_summary
from rlkd.evaluation import decode, sample_scores, summarize
from rlkd.outputs import make_run_dir, mark_completed, write_json, write_yaml
from rlkd.prepare import Prepared, prepare
from rlkd.teacher_cache import TeacherGenerations


@dataclass
class Groups:
    learners: object
    rollouts: ActorGroup
    teachers: ActorGroup
    method: Method

    def shutdown(self) -> None:
        """Stop every actor of the run (on a shared cluster they would otherwise outlive it)."""
        self.learners.shutdown()
        self.rollouts.kill()
        self.teachers.kill()


def layout(cfg: Config, method: Method) -> Layout:
    """The bundles one run reserves (rlkd.cluster.Layout): Tune trials reserve them, start_groups fills them."""
    return Layout.of(learners=(cfg.learner.num_ranks, resources(cfg.learner.num_cpus, cfg.learner.num_gpus)),
                     teachers=(cfg.teacher.num_actors if _may_need_teacher(method) else 0,
                               resources(cfg.teacher.num_cpus, cfg.teacher.num_gpus)),
                     rollouts=(cfg.rollout.num_actors if method.uses_rollouts else 0,
                               resources(cfg.rollout.num_cpus, cfg.rollout.num_gpus)))


def _may_need_teacher(method: Method) -> bool:
    """A teacher actor scores or samples for this method (start_groups may skip it when samples are cached)."""
    return method.needs_teacher_scores or method.uses_teacher_generations


def start_groups(cfg: Config, prep: Prepared, method: Method, teacher_samples_cached: bool = False,
                 log: Callable = print, name: str = "") -> Groups:
    """Start the actors `method` needs. `teacher_samples_cached`: every training prompt already has a
    teacher response on disk, so generating methods need no teacher actor for it. With `name`, the
    teacher and rollout actors are named `rlkd:<name>:teacher:<i>` / `...:rollout:<i>` (ray.get_actor).

    Ray restarts a dead teacher or rollout actor up to run.max_actor_restarts times. Teacher calls
    are stateless, so Ray retries them itself; rollout calls are retried by the controller, which
    first pushes the current weights into the restarted actor."""
    import ray

    from actors.rollout import RolloutActor
    from actors.teacher import TeacherActor
    from learners.group import LearnerGroup

    tok, m = prep.tokenizer, method
    t0 = time.time()
    env = lambda cpus: {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cpus)))}}  # noqa: E731
    restarts = cfg.run.max_actor_restarts
    pg = ray.util.get_current_placement_group()  # set inside a Ray Tune trial: the bundles of `layout`
    where = layout(cfg, m)

    def named(role: str, i: int) -> dict:
        bundle = where.first(role) + i if pg is not None else 0
        return {**({"name": f"rlkd:{name}:{role}:{i}"} if name else {}), **placement(pg, bundle)}
    teachers = []
    # OKD and SFT need none (OKD's teacher lives in the learners); SeqKD none once every prompt is cached
    if m.needs_teacher_scores or (m.uses_teacher_generations and not teacher_samples_cached):
        opts = dict(num_cpus=cfg.teacher.num_cpus, num_gpus=cfg.teacher.num_gpus, runtime_env=env(cfg.teacher.num_cpus),
                    max_restarts=restarts, max_task_retries=restarts)
        teachers = [ray.remote(TeacherActor).options(**opts, **named("teacher", i)).remote(
            str(prep.teacher_dir), prep.vocab_size, tok.pad_token_id, tok.eos_token_id, cfg.teacher.topk,
            cfg.teacher.temperature, cfg.model.trust_remote_code) for i in range(cfg.teacher.num_actors)]
    rollouts = []
    if m.uses_rollouts:  # methods without rollouts start no rollout actors
        r = cfg.rollout
        opts = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, runtime_env=env(r.num_cpus), max_restarts=restarts)
        max_len = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens + 8
        mix_dir = str(prep.teacher_dir) if m.mix_alpha else None
        rollouts = [ray.remote(RolloutActor).options(**opts, **named("rollout", i)).remote(
            str(prep.student_dir), r.backend, tok.pad_token_id, tok.eos_token_id, cfg.train.seed + i,
            r.vllm_memory_fraction, r.vllm_cpu_kv_cache_gib, max_len, cfg.model.trust_remote_code, mix_dir)
            for i in range(r.num_actors)]
    lc, a = cfg.learner, cfg.algo
    adapted = None
    if m.adapted_teacher is not None:
        o = m.adapted_teacher
        adapted = dict(teacher_dir=str(prep.teacher_dir), rank=o.lora_rank, scale=o.lora_scale,
                       targets=o.lora_targets, lr=o.teacher_lr)
    learners = LearnerGroup(lc.num_ranks, lc.num_cpus, lc.num_gpus, student_dir=str(prep.student_dir),
                            vocab_size=prep.vocab_size, zero_stage=lc.zero_stage, student_lr=lc.student_lr,
                            critic_lr=lc.critic_lr_value, weight_decay=lc.weight_decay, grad_clip=lc.grad_clip,
                            critic_heads=m.critic_heads, critic_network=a.ammd.critic_network,
                            critic_bound=a.ammd.critic_bound, critic_hidden=_critic_hidden(cfg, prep, m),
                            adapted_teacher=adapted, seed=cfg.train.seed,
                            placement=(pg, where.first("learner")) if pg else None,
                            trust_remote_code=cfg.model.trust_remote_code)
    ray.get([x.ready.remote() for x in teachers + rollouts])
    log(f"actors: {len(teachers)} teacher, {len(rollouts)} rollout ({cfg.rollout.backend if rollouts else '-'}), "
        f"{lc.num_ranks} learner rank(s) ZeRO-{lc.zero_stage}, student {learners.num_params / 1e6:.2f}M params "
        f"({time.time() - t0:.0f}s)")
    return Groups(learners, ActorGroup(rollouts, restarts, weights=learners.student_weights_ref),
                  ActorGroup(teachers, restarts), method)


def _critic_hidden(cfg: Config, prep: Prepared, method: Method) -> int | None:
    """The teacher's hidden width when the AMMD critic reads the teacher's hidden state, else None."""
    if not method.critic_heads or method.critic_input != "teacher":
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(prep.teacher_dir, trust_remote_code=cfg.model.trust_remote_code).hidden_size


def evaluate(cfg: Config, prep: Prepared, model_dir: Path | None, teacher_actor=None, rows=None) -> dict | None:
    """ROUGE-L and exact match (mean ± std over eval.num_seeds sampling seeds) and three sample answers,
    on the first eval.num_examples rows of `rows` (default: the final evaluation set)."""
    import ray

    from actors.hf_generate import generate_from_dir

    rows = (prep.test if rows is None else rows)[:cfg.eval.num_examples]
    if not rows:
        return None
    prompts, tok, e = [r.prompt_ids for r in rows], prep.tokenizer, cfg.eval
    refs, families = [r.references for r in rows], [r.family for r in rows]
    max_new, seeds = cfg.data.max_response_tokens, [e.seed + 10 * i for i in range(e.num_seeds)]
    if teacher_actor is not None:
        outs = ray.get([teacher_actor.generate.remote(prompts, max_new, 1.0, 1.0, s, e.no_repeat_ngram_size)
                        for s in seeds])
        responses = [o["responses"] for o in outs]
    else:
        task = ray.remote(num_cpus=1)(generate_from_dir)
        responses = ray.get([task.remote(str(model_dir), prompts, tok.pad_token_id, tok.eos_token_id, max_new, s,
                                         e.no_repeat_ngram_size, cfg.model.trust_remote_code) for s in seeds])
    texts = [decode(tok, r) for r in responses]
    result = summarize([sample_scores(t, r, refs, families, tok.eos_token_id) for t, r in zip(texts, responses)],
                       texts, refs, families)
    result["samples"] = [f"{prompt_summary(tok.decode(rows[i].prompt_ids))} -> {texts[0][i]}"
                         for i in range(min(3, len(rows)))]
    return result


def controller(cfg: Config, prep: Prepared, groups: Groups, teacher_cache: dict) -> Controller:
    tok, r = prep.tokenizer, cfg.rollout
    settings = StepSettings(batch_size=cfg.train.batch_size, max_new_tokens=cfg.data.max_response_tokens,
                            temperature=r.temperature, top_p=r.top_p, sync_every=r.sync_every,
                            sync_check_tol=r.sync_check_tol, pad_id=tok.pad_token_id, seed=cfg.train.seed,
                            vocab_size=prep.vocab_size)
    return Controller(groups.method, settings, PromptSampler(prep.train, cfg.train.seed), groups.learners,
                      groups.rollouts, groups.teachers, teacher_cache, prep.val)


def _evaluate_now(cfg: Config, prep: Prepared, groups: Groups, run_dir: Path) -> dict:
    """Held-out ROUGE-L of the current student, for curves against step and training wall clock."""
    import shutil

    t0 = time.time()
    snapshot = run_dir / "eval_snapshot"
    groups.learners.save_student(str(snapshot))
    score = evaluate(cfg, prep, snapshot, rows=prep.val)  # validation: the test split stays unseen
    shutil.rmtree(snapshot, ignore_errors=True)
    return {"eval/rougeL": score["rougeL_mean"], "eval/exact_match": score["exact_match_mean"],
            "eval/seconds": time.time() - t0}


def run(cfg: Config, log: Callable = print, resume: Path | None = None, on_step: Callable | None = None) -> Path:
    """Run one distillation job end to end, or continue `resume` (a run directory) from its last
    checkpoint; returns the run directory. on_step(metrics, checkpoint_dir | None) follows every step."""
    import ray

    from rlkd.loop import TrainLoop

    t_start = time.time()
    ckpt = checkpoint.resumable(resume) if resume is not None else None  # before any work: fail fast
    prep = prepare(cfg, log)
    steps_per_epoch = max(1, len(prep.train) // cfg.train.batch_size)
    method = build_method(cfg.algo, cfg.train.seed, cfg.train.steps, steps_per_epoch)
    run_dir = Path(resume).resolve() if resume is not None else _new_run_dir(cfg, prep)
    log(f"run: {method.label} -> {run_dir}")
    started = connect_ray(cfg.run.num_cpus, log)
    groups = None
    try:
        cache = TeacherGenerations(cfg, prep)
        groups = start_groups(cfg, prep, method, cache.covers(prep.train), log, name=run_dir.name)
        state = checkpoint.load_state(ckpt) if ckpt else None
        scores = state["scores"] if state else _baselines(cfg, prep, groups)
        loop = TrainLoop(cfg, controller(cfg, prep, groups, cache.responses), groups.learners, cache, run_dir, log,
                         lambda: _evaluate_now(cfg, prep, groups, run_dir), on_step, {"scores": scores},
                         lambda ckpt: prep.tokenizer.save_pretrained(str(ckpt / "student")))
        if ckpt is not None:
            loop.restore(ckpt, state)
        history = loop.run()
        final_dir = run_dir / "student"
        groups.learners.save_student(str(final_dir))
        prep.tokenizer.save_pretrained(str(final_dir))
        if method.adapted_teacher is not None:  # OKD: the adapted teacher is a result too
            groups.learners.save_adapted_teacher(str(run_dir / "teacher_adapter"))
        scores["student_after"] = evaluate(cfg, prep, final_dir)
    finally:
        if groups is not None:
            groups.shutdown()
        if started:
            ray.shutdown()
    summary = _summary(cfg, method, prep, scores, history, time.time() - t_start)
    write_json(run_dir / "eval.json", summary)
    mark_completed(run_dir, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": len(history)})
    log(format_table(summary, run_dir))
    return run_dir


def _new_run_dir(cfg: Config, prep: Prepared) -> Path:
    run_dir = make_run_dir(cfg.run.output_dir, cfg.run.name, cfg.algo.method)
    resolved = to_dict(cfg)
    resolved["model"].update(teacher=str(prep.teacher_dir), student=str(prep.student_dir))
    write_yaml(run_dir / "config.yaml", resolved)
    return run_dir


def _baselines(cfg: Config, prep: Prepared, groups: Groups) -> dict:
    if not cfg.eval.baselines:
        return {}
    return {"teacher": evaluate(cfg, prep, prep.teacher_dir, (groups.teachers.actors or [None])[0]),
            "student_before": evaluate(cfg, prep, prep.student_dir)}


def _summary(cfg, method, prep, scores, history, wall) -> dict:
    warmup = method.critic_warmup_steps if method.critic_objective is not None else 0
    first, last = history[warmup], history[-1]  # warm-up steps train only the critic
    keys = [k for k in last if k.startswith(("loss/", "ammd/", "okd/", "val/", "collapse/"))]
    means = {key: {name: s[f"{key}_mean"] if s else None for name, s in scores.items()}
             for key in ("rougeL", "exact_match")}
    return {"method": method.label, "metric": "rougeL F x100 (rouge_score, stemmed, max over refs); exact match x100",
            "num_examples": min(cfg.eval.num_examples, len(prep.test)), "seeds": cfg.eval.num_seeds, **means,
            "final_split": "val" if prep.test is prep.val else "test",
            "scores": scores, "first": {k: first.get(k) for k in keys}, "last": {k: last.get(k) for k in keys},
            "steps": len(history), "wall_seconds": wall}


def format_table(summary: dict, run_dir: Path) -> str:
    """Teacher / student before / student after: exact match and ROUGE-L (mean ± std over seeds), and
    each model's answer to the same three held-out prompts."""
    n, k = summary["num_examples"], summary["seeds"]
    rows = [f"{'model':<16} {'exact match':>14} {'ROUGE-L':>14}   ({n} held-out prompts, mean ± std over {k} seeds)"]
    for name, s in summary["scores"].items():
        if s:
            rows.append(f"{name:<16} {s['exact_match_mean']:>7.1f} ± {s['exact_match_std']:<4.1f} "
                        f"{s['rougeL_mean']:>7.1f} ± {s['rougeL_std']:<4.1f}")
    named = [(name, s["samples"]) for name, s in summary["scores"].items() if s]
    for i in range(len(named[0][1]) if named else 0):
        rows.append(f"example {i + 1}:")
        rows += [f"  {name:<15} {samples[i]!r}" for name, samples in named]
    return "\n".join(rows + [f"wall time: {summary['wall_seconds']:.0f}s", f"output: {run_dir}"])
