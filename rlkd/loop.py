"""The training loop around the controller: steps, periodic evaluation, checkpoints, and reporting
(metrics.jsonl + TensorBoard, Prometheus gauges, progress, invariant warnings, and an optional per-step
hook that Ray Tune trials use). Holds handles only; rlkd.launch wires the actors in.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import ray

from rlkd import checkpoint
from rlkd.invariants import InvariantWatch
from rlkd.outputs import MetricsWriter, write_text_atomic
from rlkd.telemetry import Progress, PrometheusMetrics


def read_metrics(run_dir: Path, up_to_step: int) -> list[dict]:
    """metrics.jsonl cut back to the steps a checkpoint covers (a resumed run repeats the rest)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    rows = [r for r in rows if r.get("step", 0) <= up_to_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


class Stopped(Exception):
    """The run stopped before its last step (a signal, or a learner rank that died): the last step finished,
    the checkpoint a --resume will use, and the command."""

    def __init__(self, signal_name: str, step: int, ckpt: Path | None, run_dir: Path, cause: str | None = None):
        self.signal_name, self.step, self.ckpt, self.run_dir, self.cause = signal_name, step, ckpt, run_dir, cause
        where = f"checkpoint {ckpt.name} will be used" if ckpt else "no checkpoint yet, so it restarts from step 1"
        why = f"stopped: {cause}," if cause else f"stopped by {signal_name}"
        super().__init__(f"{why} after step {step}; {where}; continue with: "
                         f"python -m rlkd.main --resume {run_dir}")

    @property
    def exit_code(self) -> int:
        if self.cause:
            return 1
        return 143 if self.signal_name == "SIGTERM" else 130


def stop_on_sigterm() -> None:
    """SIGTERM (what `ray job stop` sends) stops the run like Ctrl-C: cleanly, with the resume command."""
    import signal
    import threading

    def stop(signum, frame):
        global SIGNALLED
        SIGNALLED = "SIGTERM"
        e = KeyboardInterrupt()
        e.signal_name = "SIGTERM"
        raise e
    if threading.current_thread() is threading.main_thread():  # Tune runs trials in other threads
        signal.signal(signal.SIGTERM, stop)


SIGNALLED: str | None = None  # set by the SIGTERM handler: an actor error that follows it is the signal's doing


class TrainLoop:
    """Steps `first..cfg.train.steps` of one run.

    evaluate_now() -> {'eval/rougeL', 'eval/exact_match', 'eval/seconds'} scores the current student;
    on_step(metrics, checkpoint_dir | None) is called after every step. `extra_state` (e.g. baseline scores) is stored
    in each checkpoint so a resumed run can finish its summary; finalize_checkpoint(dir) adds files.
    """

    def __init__(self, cfg, controller, learners, teacher_cache, run_dir: Path, log: Callable,
                 evaluate_now: Callable[[], dict], on_step: Callable | None = None, extra_state: dict | None = None,
                 finalize_checkpoint: Callable[[Path], None] | None = None):
        self.cfg, self.controller, self.learners, self.cache = cfg, controller, learners, teacher_cache
        self.run_dir, self.log, self.evaluate_now, self.on_step = run_dir, log, evaluate_now, on_step
        self.extra_state, self.finalize_checkpoint = extra_state or {}, finalize_checkpoint
        self.first, self.wall0, self.history = 1, 0.0, []

    def restore(self, ckpt: Path, state: dict) -> None:
        """Load checkpoint `ckpt` (its state.json already read): learners (engines, optimizers, RNG), then
        data and schedule state."""
        self.learners.load_checkpoint(str(ckpt))
        self.controller.load_state_dict(state["controller"])
        self.controller.sync_now()  # rollout actors started from the initial student
        self.first, self.wall0 = state["step"] + 1, state["wall_seconds"]
        self.history = read_metrics(self.run_dir, state["step"])
        position = state["controller"]["sampler"]["position"]
        self.log(f"resumed from {ckpt} (step {state['step']}, data position {position})")

    def run(self) -> list[dict]:
        cfg, total = self.cfg, self.cfg.train.steps
        writer = MetricsWriter(self.run_dir, purge_step=self.first)
        gauges = PrometheusMetrics(self.run_dir.name)
        progress = Progress(total, self.first, cfg.train.log_every, self.log)
        watch = InvariantWatch(self.log)
        t0, paused = time.time(), 0.0  # paused: evaluation and checkpoint time, kept out of training time
        done = self.first - 1  # the last finished step
        try:
            for step in range(self.first, total + 1):
                m = self.controller.step(step)
                m.update(watch.update(step, m))
                m["train/wall_seconds"] = self.wall0 + time.time() - t0 - paused
                # also at the last step: the final evaluation may score another split (the skills test split)
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                    m.update(self.evaluate_now())
                    paused += m["eval/seconds"]
                ckpt = None
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    t_ckpt = time.time()
                    ckpt = self._checkpoint(step, m["train/wall_seconds"])
                    m["checkpoint/seconds"] = time.time() - t_ckpt
                    paused += m["checkpoint/seconds"]
                writer.write(m)
                self.history.append(m)
                gauges.update(m)
                progress.update(m)
                if self.on_step is not None:
                    self.on_step(m, ckpt)
                done = step
        except KeyboardInterrupt as e:  # SIGINT, or SIGTERM through rlkd.launch's handler
            raise Stopped(getattr(e, "signal_name", "SIGINT"), done, checkpoint.latest(self.run_dir),
                          self.run_dir) from None
        except ray.exceptions.RayActorError as e:  # a learner rank (Ray does not restart them) or an actor
            # whose restarts ran out: the step cannot go on, the checkpoints can. Right after a SIGTERM it is
            # the signal's doing (Ray may surface the interrupt as a dead actor): report the signal
            cause = None if SIGNALLED else f"an actor died and was not restarted ({type(e).__name__})"
            raise Stopped(SIGNALLED or "", done, checkpoint.latest(self.run_dir), self.run_dir, cause=cause) from None
        finally:
            progress.close()
            writer.close()
            self.cache.save()
        return self.history

    def _checkpoint(self, step: int, wall_seconds: float) -> Path:
        self.controller.sync_now()  # a resumed run starts its rollout actors from the checkpoint's weights
        self.cache.save()
        state = {"controller": self.controller.state_dict(), "wall_seconds": wall_seconds, **self.extra_state}
        return checkpoint.save(self.run_dir, step, self.learners, state, self.cfg.train.keep_checkpoints,
                               self.finalize_checkpoint)
