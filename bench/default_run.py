"""Wall time and peak memory of the default job (`python -m rlkd.main`), as a user runs it.

Peak memory is the machine's used memory (psutil.virtual_memory().used, all Ray processes
included) sampled every 0.2 s, minus the idle baseline measured just before the start.
Usage: python bench/default_run.py [--fresh-cache] [-- extra rlkd.main args]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh-cache", action="store_true", help="empty model cache (first-run cost)")
    ap.add_argument("--out", default="bench/results/default_run.json")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    extra = list(args.extra)
    if args.fresh_cache:
        extra.append(f"model.cache_dir={tempfile.mkdtemp(prefix='rlkd-cache-')}")
    baseline = psutil.virtual_memory().used
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], psutil.virtual_memory().used)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "rlkd.main", *extra], capture_output=True, text=True)
    wall = time.time() - t0
    done.set()
    lines = proc.stdout.strip().splitlines()
    start = max((i for i, line in enumerate(lines) if line.startswith("model ")), default=max(0, len(lines) - 6))
    tail = lines[start:]  # the printed table: scores of teacher / before / after, then example answers
    result = {"command": " ".join(["python -m rlkd.main", *extra]), "returncode": proc.returncode,
              "wall_seconds": round(wall, 1), "peak_memory_gib": round((peak[0] - baseline) / 2**30, 2),
              "fresh_cache": args.fresh_cache, "table": tail}
    print(json.dumps(result, indent=2))
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
