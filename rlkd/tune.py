"""Ray Tune sweeps: a config YAML with a `tune:` section.

    python -m rlkd.main --config configs/sweeps/ammd_dolly.yaml          (also under `ray job submit`)

Every trial runs the full controller (rlkd.launch.run) with the sampled fields set, inside a
placement group of exactly the bundles that run needs (rlkd.cluster.layout), and reports each
step's metrics and checkpoints with `tune.report`. At the end rlkd prints a results table and writes
`best_config.yaml`, a plain config ready for `python -m rlkd.main --config`. Running the same
command again after an interruption restores the sweep (`Tuner.restore`) and resumes unfinished
trials from their last checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlkd import signing
from rlkd.checks import check, safe_name
from rlkd.config import Config, ConfigError, _build, build_config, read_yaml, set_field, to_dict
from rlkd.outputs import COMPLETED, write_yaml

SPACES = ("choice", "grid", "uniform", "loguniform", "randint")
PATHS = ("data.train_file", "model.teacher", "model.student", "model.cache_dir", "run.output_dir")


@dataclass(frozen=True)
class TuneConfig:
    space: dict = field(default_factory=dict)
    """Search space: dotted config field -> {choice: [..]} | {grid: [..]} | {uniform: [lo, hi]} |
    {loguniform: [lo, hi]} | {randint: [lo, hi]} (hi exclusive)."""
    num_samples: int = 4
    """Trials sampled from the space (grid values are crossed with them, as in Ray Tune)."""
    max_concurrent: int = 2
    """Trials running at the same time."""
    search_alg: str = "random"
    """'random' (Tune's variant generator: random draws and grids) or 'optuna' (TPE; `pip install optuna`)."""
    scheduler: str = "asha"
    """'asha' (stops weak trials early at step milestones on `metric`) or 'fifo' (every trial runs to the end)."""
    metric: str = "eval/rougeL"
    """Validation metric the scheduler and the ranking use; eval/rougeL and eval/exact_match need
    eval.every_steps > 0."""
    mode: str = "max"
    """'max' or 'min' for `metric`."""
    grace_period: int = 10
    """ASHA: steps every trial runs before it may be stopped."""
    reduction_factor: float = 2.0
    """ASHA: the top 1/reduction_factor of trials continue at each milestone."""
    name: str = "sweep"
    """Experiment directory name under run.output_dir; rerunning the command restores an unfinished sweep."""


def load_sweep(path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict, TuneConfig, Config]:
    """(base config mapping, TuneConfig, base Config) from a sweep YAML; every space field is checked
    by building a config with one value of it, so a typo fails here and not in trial 3."""
    raw = read_yaml(path)
    tune_raw = raw.pop("tune", None)
    if not isinstance(tune_raw, dict):
        raise ConfigError(f"--config {path!r}: the 'tune' section must be a mapping of TuneConfig fields")
    tc = _build(TuneConfig, tune_raw, "tune.")
    check(tc.search_alg in ("random", "optuna"), "tune.search_alg", tc.search_alg, "'random' or 'optuna'")
    check(tc.scheduler in ("asha", "fifo"), "tune.scheduler", tc.scheduler, "'asha' or 'fifo'")
    check(tc.mode in ("max", "min"), "tune.mode", tc.mode, "'max' or 'min'")
    safe_name(tc.name, "tune.name")  # the experiment directory goes under run.output_dir
    check(tc.num_samples >= 1 and tc.max_concurrent >= 1, "tune.num_samples/max_concurrent",
           (tc.num_samples, tc.max_concurrent), ">= 1 each")
    check(bool(tc.space), "tune.space", tc.space, "at least one 'section.field: {kind: [...]}' entry")
    base = build_config(raw, overrides)
    for key, spec in tc.space.items():
        trial = copy.deepcopy(to_dict(base))
        set_field(trial, key, _example(key, spec))
        build_config(trial)  # raises ConfigError naming the field
    raw = to_dict(base)
    for key in PATHS:  # Tune runs trials in their own directories: relative paths would move
        section, name = key.split(".")
        if raw[section][name]:
            raw[section][name] = str(Path(raw[section][name]).expanduser().resolve())
    if tc.metric.startswith("eval/") and not base.eval.every_steps:
        raise ConfigError(f"tune.metric={tc.metric!r} needs eval.every_steps > 0 (the metric is reported when "
                          "the held-out set is scored); set eval.every_steps or choose another tune.metric")
    return raw, tc, build_config(raw)


def _example(key: str, spec) -> object:
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACES):
        raise ConfigError(f"tune.space[{key!r}]={spec!r} is invalid: expected one of "
                          f"{{{' | '.join(s + ': [...]' for s in SPACES)}}}")
    kind, values = next(iter(spec.items()))
    ok = isinstance(values, list) and values and (kind in ("choice", "grid") or len(values) == 2)
    if not ok:
        raise ConfigError(f"tune.space[{key!r}].{kind}={values!r} is invalid: "
                          f"{'a non-empty list' if kind in ('choice', 'grid') else '[low, high]'}")
    return values[0]


def param_space(space: dict) -> dict:
    from ray import tune

    kinds = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda v: tune.uniform(*v),
             "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: kinds[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def _plain(value):
    """numpy scalars (what Tune's samplers return) -> Python values, for validation and YAML."""
    return value.item() if hasattr(value, "item") else value


def trial_config(base: dict, sampled: dict) -> Config:
    raw = copy.deepcopy(base)
    for key, value in sampled.items():
        set_field(raw, key, _plain(value))
    return build_config(raw)


def make_trainable(base: dict, tc: TuneConfig, sweep_dir: Path) -> Callable:
    """The function each trial runs: the full rlkd run, reporting every step (and its checkpoints)."""
    def trainable(sampled: dict) -> None:
        from ray import tune

        from rlkd import checkpoint
        from rlkd.launch import run

        trial_id = tune.get_context().get_trial_id()
        raw = copy.deepcopy(base)
        set_field(raw, "run.output_dir", str(sweep_dir / "runs"))
        set_field(raw, "run.name", trial_id)
        set_field(raw, "eval.baselines", False)
        cfg = trial_config(raw, sampled)
        run_dir = sweep_dir / "runs" / trial_id
        resume = run_dir if tune.get_checkpoint() is not None and checkpoint.latest(run_dir) else None
        last = {tc.metric: math.nan}

        def report(metrics: dict, ckpt: Path | None) -> None:
            if tc.metric in metrics:
                last[tc.metric] = metrics[tc.metric]
            out = {**metrics, tc.metric: last[tc.metric]}  # carried forward: the scheduler needs it every step
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt else None)

        if (run_dir / COMPLETED).exists():  # finished just before the sweep was interrupted
            final = run_dir
        else:
            if resume is None:
                shutil.rmtree(run_dir, ignore_errors=True)  # a trial restarted from scratch starts clean
            final = run(cfg, log=print, resume=resume, on_step=report)
        summary = json.loads((final / "eval.json").read_text())
        key = {"eval/rougeL": "rougeL", "eval/exact_match": "exact_match"}.get(tc.metric)
        after = summary.get(key, {}).get("student_after") if key else None
        if after is not None and summary.get("final_split") == "val":  # never select on a test split
            tune.report({tc.metric: after, "step": cfg.train.steps, "final": 1.0})
    return trainable


def trial_bundles(base_cfg: Config) -> list[dict]:
    """What one trial reserves: the bundles of one rlkd run (the driver, evaluation, every actor)."""
    from rlkd.algorithms import build_method
    from rlkd.cluster import layout

    return layout(base_cfg, build_method(base_cfg.algo, base_cfg.train.seed, base_cfg.train.steps, 1)).bundles


def _tuner(trainable, tc: TuneConfig, base_cfg: Config, space: dict, storage: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=base_cfg.train.steps + 1,
                               grace_period=tc.grace_period, reduction_factor=tc.reduction_factor)
                 if tc.scheduler == "asha" else FIFOScheduler())
    search = None
    if tc.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            search = OptunaSearch()
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search_alg='optuna' needs the optuna package: pip install optuna") from None
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples,
                                    max_concurrent_trials=tc.max_concurrent, scheduler=scheduler, search_alg=search),
        run_config=tune.RunConfig(name=tc.name, storage_path=str(storage),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  failure_config=tune.FailureConfig(max_failures=1)))


def sweep(path: str, overrides: list[str] | tuple[str, ...] = (), log: Callable = print) -> tuple[Path, bool]:
    """Run (or restore) the sweep in `path`; returns (experiment directory, whether every trial ended)."""
    from ray import tune

    from rlkd.cluster import check_reachable, connect_ray, shutdown_ray
    from rlkd.prepare import prepare

    base, tc, base_cfg = load_sweep(path, overrides)
    check_reachable(base_cfg.run.ray_address)
    storage = Path(base_cfg.run.output_dir).expanduser().resolve()
    exp_dir, sweep_dir = storage / tc.name, storage / f"{tc.name}-trials"
    _check_restorable(exp_dir)  # before anything could unpickle its files
    prepare(base_cfg, log)  # data and models checked (and the embedded ones built) once, before any trial
    bundles = trial_bundles(base_cfg)
    trainable = tune.with_resources(make_trainable(base, tc, sweep_dir),
                                    tune.PlacementGroupFactory(bundles, strategy="PACK"))
    started = connect_ray(int(math.ceil(sum(b.get("CPU", 0) for b in bundles) * tc.max_concurrent)), log,
                          base_cfg.run.ray_address)
    try:
        if tune.Tuner.can_restore(str(exp_dir)):
            log(f"tune: restoring the unfinished sweep in {exp_dir}")
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = _tuner(trainable, tc, base_cfg, param_space(tc.space), storage)
        with _ctrl_c_noted() as interrupted:
            results = tuner.fit()
        try:
            signing.sign(exp_dir)  # what a later run of this command may restore
        except OSError as e:  # e.g. a read-only HOME: the results stand, only a later restore is refused
            log(f"tune: warning: could not sign {exp_dir} ({e}); re-running this sweep will start it afresh")
    finally:
        shutdown_ray(started)
    if interrupted.is_set() or results.num_terminated + results.num_errors < len(results):
        log(f"tune: sweep interrupted ({results.num_terminated} of {len(results)} trials finished); run the same "
            "command again to restore it")
        return exp_dir, False
    return _summarize(results, base, tc, exp_dir, log), True


@contextlib.contextmanager
def _ctrl_c_noted():
    """Yields an Event set by a Ctrl-C during the block. Tune's own SIGINT handler is switched off
    (TUNE_DISABLE_SIGINT_HANDLER) and ours forwards the stop as SIGUSR1, which Tune always handles the same way
    (save the experiment state, stop the trials); the trials a Ctrl-C also reached then count as errored, and
    without the Event the sweep would be summarised as finished with no results (exit 1) instead of
    'interrupted' (exit 130, run it again to restore)."""
    interrupted, previous = threading.Event(), signal.getsignal(signal.SIGINT)
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")

    def on_ctrl_c(sig, frame):
        interrupted.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C stops at once
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt  # Tune's loop has not started (or has ended): nothing to stop gracefully
        os.kill(os.getpid(), signal.SIGUSR1)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


def _check_restorable(exp_dir: Path) -> None:
    """A sweep directory is restored only if rlkd signed its state for this user (rlkd.signing)."""
    if not (exp_dir / "tuner.pkl").exists():
        return
    why = signing.problem(exp_dir)
    if why:
        raise ConfigError(f"tune: {exp_dir} holds a sweep rlkd cannot vouch for ({why}); restoring it would "
                          "unpickle its files, which can run code. Move it away (or change tune.name) to start "
                          "the sweep afresh")


def _summarize(results, base: dict, tc: TuneConfig, exp_dir: Path, log: Callable) -> Path:
    rows = []
    for r in results:
        if r.metrics is None:
            continue
        sampled = {k: _plain(r.config[k]) for k in tc.space}
        rows.append((r.metrics.get(tc.metric, math.nan), r.metrics.get("training_iteration", 0), sampled,
                     r.error is not None))
    rows.sort(key=lambda x: (math.isnan(x[0]), -x[0] if tc.mode == "max" else x[0]))
    lines = [f"| {tc.metric} | steps reported | " + " | ".join(tc.space) + " | error |",
             "|---" * (len(tc.space) + 3) + "|"]
    lines += [f"| {m:.4f} | {it} | " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                                 for v in s.values()) + f" | {'yes' if err else ''} |"
              for m, it, s, err in rows]
    table = "\n".join(lines) + "\n"
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "results.md").write_text(table)
    log(table)
    if not rows or math.isnan(rows[0][0]):
        raise RuntimeError(f"no trial reported {tc.metric}; see the trial logs under {exp_dir}")
    best = copy.deepcopy(base)
    for key, value in rows[0][2].items():
        set_field(best, key, value)
    write_yaml(exp_dir / "best_config.yaml", best)
    log(f"best {tc.metric}={rows[0][0]:.4f}: {rows[0][2]}\nbest config: {exp_dir / 'best_config.yaml'} "
        f"(python -m rlkd.main --config {exp_dir / 'best_config.yaml'})")
    return exp_dir
