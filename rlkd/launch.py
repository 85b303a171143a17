"""Composition root: the only module of the core that imports actors/ and learners/.

run(cfg) = prepare data and models (no Ray yet, so bad input fails fast) -> join or start a Ray
cluster -> start the teacher, rollout and learner groups -> evaluate the starting point -> train ->
save the student -> evaluate -> write the completion marker last.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlkd import checkpoint
from rlkd.algorithms import Method, build_method
from rlkd.config import Config, ConfigError, to_dict
from rlkd.data import PromptSampler, TokenizedExample, prompt_summary, tokenize
from rlkd.evaluation import decode, sample_scores, summarize
from rlkd.models import (
    check_lora_targets,
    check_model_dir,
    check_same_tokenizer,
    embedded_models,
    load_tokenizer,
)
from rlkd.outputs import (
    make_run_dir,
    mark_completed,
    write_json,
    write_yaml,
)
from rlkd.teacher_cache import TeacherGenerations


@dataclass
class Prepared:
    teacher_dir: Path
    student_dir: Path
    tokenizer: object
    vocab_size: int
    train: list[TokenizedExample]
    val: list[TokenizedExample]
    data_report: str
    embedded: bool
    test: list[TokenizedExample]  # the final evaluation set (the skills test split; else = val)


def prepare(cfg: Config, log: Callable = print) -> Prepared:
    """Data and models, checked before any actor starts. Raises ConfigError / DataError."""
    from rlkd.builtin import load_data, skills_models
    from rlkd.pretrain import sft_train

    data = load_data(cfg, log)
    d = cfg.data
    if cfg.model.teacher is None and d.train_file is None and d.builtin == "skills":
        teacher_dir, student_dir = skills_models(cfg, data.train, log)
    elif cfg.model.teacher is None:
        t = cfg.model.tiny
        tokenized: dict = {}  # the tokenizer is built inside embedded_models; tokenize once for both models

        def sft(model, tok, steps):
            if "train" not in tokenized:
                tokenized["train"] = tokenize(data.train, tok, d.max_prompt_tokens, d.max_response_tokens)
            return sft_train(model, tokenized["train"], tok.pad_token_id, len(tok), steps, t.sft_batch_size,
                             t.sft_lr, cfg.train.seed, log)

        teacher_dir, student_dir = embedded_models(
            cfg, data.source, lambda: [e.prompt + e.references[0] for e in data.train], sft, log)
    else:
        teacher_dir = check_model_dir(cfg.model.teacher, "config field model.teacher")
        student_dir = check_model_dir(cfg.model.student, "config field model.student")
    vocab = check_same_tokenizer(teacher_dir, student_dir, cfg.model.trust_remote_code)
    check_positions(cfg, teacher_dir, student_dir)
    if cfg.algo.method == "okd":
        check_lora_targets(teacher_dir, cfg.algo.okd.lora_targets, cfg.model.trust_remote_code)
    tok = load_tokenizer(student_dir, cfg.model.trust_remote_code)
    train_tok, val_tok = (tokenize(x, tok, d.max_prompt_tokens, d.max_response_tokens) for x in (data.train, data.val))
    test_tok = (val_tok if data.test is data.val
                else tokenize(data.test, tok, d.max_prompt_tokens, d.max_response_tokens))
    cut = sum(r.truncated for r in train_tok + val_tok)
    if cut:
        log(f"data: {cut} prompts longer than data.max_prompt_tokens={d.max_prompt_tokens} were cut in the middle")
    return Prepared(teacher_dir, student_dir, tok, vocab, train_tok, val_tok, data.summary, cfg.model.teacher is None,
                    test_tok)


def connect_ray(num_cpus: int = 0, log: Callable = print) -> bool:
    """Join RAY_ADDRESS / a running cluster, else start a local one with `num_cpus` (0 = all) logical
    CPUs. Returns True if we started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        log(f"ray: joined cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}")
        return False
    try:
        ray.init(address="auto")
        log("ray: joined the running cluster")
        return False
    except ConnectionError:
        pass
    num_cpus = num_cpus or os.cpu_count()
    # small CPU boxes: actors reserve ~1 CPU each and mostly wait on one another, so oversubscribe
    ray.init(num_cpus=max(num_cpus, 4), include_dashboard=False, _node_ip_address="127.0.0.1")
    log(f"ray: started a local cluster ({max(num_cpus, 4)} logical CPUs)")
    return True


@dataclass
class Groups:
    learners: object
    rollouts: list
    teachers: list
    method: Method

    def shutdown(self) -> None:
        """Stop every actor of the run (on a shared cluster they would otherwise outlive it)."""
        import ray

        self.learners.shutdown()
        for actor in self.rollouts + self.teachers:
            ray.kill(actor)
        for actor in self.rollouts + self.teachers:  # wait until dead: a resumed run reuses their names
            try:
                ray.get(actor.ready.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass


def bundles(cfg: Config, method: Method) -> list[dict]:
    """The resources one run reserves, in the order start_groups places its actors:
    [the driver (a Tune trial), evaluation tasks, learner ranks..., teacher actors..., rollout actors...].
    Ray Tune trials reserve exactly this (PlacementGroupFactory), so trials never starve one another."""
    def res(cpus: float, gpus: float) -> dict:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    out = [{"CPU": 1.0}, {"CPU": 1.0}] + [res(cfg.learner.num_cpus, cfg.learner.num_gpus)] * cfg.learner.num_ranks
    if _may_need_teacher(method):
        out += [res(cfg.teacher.num_cpus, cfg.teacher.num_gpus)] * cfg.teacher.num_actors
    if method.uses_rollouts:
        out += [res(cfg.rollout.num_cpus, cfg.rollout.num_gpus)] * cfg.rollout.num_actors
    return out


def _may_need_teacher(method: Method) -> bool:
    """A teacher actor scores or samples for this method (start_groups may skip it when samples are cached)."""
    return method.needs_teacher_scores or method.uses_teacher_generations


def _placement(pg, index: int) -> dict:
    """Actor options that pin it to bundle `index` of the trial's placement group (none outside Tune)."""
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


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
    restarts, ranks = cfg.run.max_actor_restarts, cfg.learner.num_ranks
    pg = ray.util.get_current_placement_group()  # set inside a Ray Tune trial: the layout of `bundles`
    first_teacher = 2 + ranks
    first_rollout = first_teacher + (cfg.teacher.num_actors if _may_need_teacher(m) else 0)

    def named(role: str, i: int, bundle: int) -> dict:
        return {**({"name": f"rlkd:{name}:{role}:{i}"} if name else {}), **_placement(pg, bundle)}
    teachers = []
    # OKD and SFT need none (OKD's teacher lives in the learners); SeqKD none once every prompt is cached
    if m.needs_teacher_scores or (m.uses_teacher_generations and not teacher_samples_cached):
        opts = dict(num_cpus=cfg.teacher.num_cpus, num_gpus=cfg.teacher.num_gpus, runtime_env=env(cfg.teacher.num_cpus),
                    max_restarts=restarts, max_task_retries=restarts)
        teachers = [ray.remote(TeacherActor).options(**opts, **named("teacher", i, first_teacher + i)).remote(
            str(prep.teacher_dir), prep.vocab_size, tok.pad_token_id, tok.eos_token_id, cfg.teacher.topk,
            cfg.teacher.temperature, cfg.model.trust_remote_code) for i in range(cfg.teacher.num_actors)]
    rollouts = []
    if m.uses_rollouts:  # methods without rollouts start no rollout actors
        r = cfg.rollout
        opts = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, runtime_env=env(r.num_cpus), max_restarts=restarts)
        max_len = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens + 8
        mix_dir = str(prep.teacher_dir) if m.mix_alpha else None
        rollouts = [ray.remote(RolloutActor).options(**opts, **named("rollout", i, first_rollout + i)).remote(
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
                            adapted_teacher=adapted, seed=cfg.train.seed, placement=(pg, 2) if pg else None,
                            trust_remote_code=cfg.model.trust_remote_code)
    ray.get([x.ready.remote() for x in teachers + rollouts])
    log(f"actors: {len(teachers)} teacher, {len(rollouts)} rollout ({cfg.rollout.backend if rollouts else '-'}), "
        f"{lc.num_ranks} learner rank(s) ZeRO-{lc.zero_stage}, student {learners.num_params / 1e6:.2f}M params "
        f"({time.time() - t0:.0f}s)")
    return Groups(learners, rollouts, teachers, method)


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


def check_positions(cfg: Config, teacher_dir: Path, student_dir: Path) -> None:
    """Prompt + response must fit every model's positions (else RoPE runs past what was trained)."""
    from transformers import AutoConfig

    need = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    for name, path in (("teacher", teacher_dir), ("student", student_dir)):
        have = getattr(AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code),
                       "max_position_embeddings", need)
        if need > have:
            raise ConfigError(f"config field data.max_prompt_tokens={cfg.data.max_prompt_tokens} is invalid: with "
                              f"data.max_response_tokens={cfg.data.max_response_tokens} it needs {need} positions and "
                              f"the {name} has {have}; lower either so they sum to <= {have}")


def _controller(cfg: Config, prep: Prepared, groups: Groups, cache: TeacherGenerations):
    from rlkd.controller import Controller, StepSettings

    tok, r = prep.tokenizer, cfg.rollout
    settings = StepSettings(cfg.train.batch_size, cfg.data.max_response_tokens, r.temperature, r.top_p,
                            r.sync_every, r.sync_check_tol, tok.pad_token_id, cfg.train.seed, prep.vocab_size,
                            cfg.run.max_actor_restarts)
    return Controller(groups.method, settings, PromptSampler(prep.train, cfg.train.seed), groups.learners,
                      groups.rollouts, groups.teachers, cache.responses, prep.val)


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
        loop = TrainLoop(cfg, _controller(cfg, prep, groups, cache), groups.learners, cache, run_dir, log,
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
    return {"teacher": evaluate(cfg, prep, prep.teacher_dir, (groups.teachers or [None])[0]),
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
