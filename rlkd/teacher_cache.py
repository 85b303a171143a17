"""Teacher generations cached on disk (AMMD's off-policy data, SeqKD, GKD seq_kd).

Sampling the teacher is the expensive part of those methods, and the samples depend only on the
teacher, the prompts and the sampling settings, so they are generated once per prompt and reused
by later runs (docs/algorithms.md#conventions). The key hashes every
input that changes them; a run only ever reads entries written under its own key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rlkd.outputs import write_text_atomic


def _fingerprint(model_dir: Path) -> list:
    """Path, size and mtime of each weight file: changes whenever the weights do."""
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    return [str(model_dir.resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


class TeacherGenerations:
    def __init__(self, cfg, prep):
        d, r = cfg.data, cfg.rollout
        key = json.dumps([_fingerprint(Path(prep.teacher_dir)), str(d.train_file),
                          *(([n, _fingerprint(Path(p))] for n, p in sorted(prep.teachers.items())) if prep.teachers
                            else ()), d.max_rows, d.val_size, d.split_seed,
                          d.max_prompt_tokens, d.max_response_tokens, r.temperature, cfg.train.seed,
                          cfg.teacher.temperature], default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = Path(cfg.model.cache_dir).expanduser() / "teacher_generations" / f"{digest}.json"
        self.responses: dict[int, list[int]] = {}
        if self.path.is_file():
            self.responses = {int(k): v for k, v in json.loads(self.path.read_text()).items()}
        self._loaded = len(self.responses)

    def covers(self, rows) -> bool:
        """Every row's teacher response is cached (then no teacher actor needs to start for it)."""
        return all(r.uid in self.responses for r in rows)

    def save(self) -> None:
        if len(self.responses) == self._loaded:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({str(k): v for k, v in self.responses.items()}))
