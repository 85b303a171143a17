"""The quality benchmark's Dolly section: rlkd on real instruction data, held to two floors.

Open-domain instruction following is beyond models this small, so the point is honesty, not a ranking:
a method is ranked only if its ROUGE-L beats both floors ('the the the the the' and a copy of the
instruction) by more than 2 std over training seeds.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def _instruction(prompt: str) -> str:
    return prompt.split("### Instruction:\n", 1)[-1].split("\n\n", 1)[0]


def dolly_section(methods: list[str], seeds: list[int], budget: int, smoke: bool, work: Path, log) -> str:
    if not methods:
        return ""
    from quality import train_steps

    from rlkd.builtin import load_data
    from rlkd.config import load_config
    from rlkd.eval import evaluate_dir
    from rlkd.launch import run
    from rlkd.metrics import rouge_l
    from rlkd.prepare import prepare

    common = ["data.builtin=dolly", "data.max_prompt_tokens=96", "data.max_response_tokens=48", "eval.baselines=false",
              "eval.num_examples=64", "train.checkpoint_every=0", f"run.output_dir={work}"]  # Dolly holds out 64
    cfg = load_config(None, common)
    prep, data = prepare(cfg, log=lambda *a: None), load_data(cfg, log=lambda *a: None)
    val = data.val[:cfg.eval.num_examples]
    refs = [e.references for e in val]
    floors = {"floor: 'the the the the the'": rouge_l(["the the the the the"] * len(val), refs),
              "floor: copy the instruction": rouge_l([_instruction(e.prompt) for e in val], refs)}
    rows = {name: (v, 0.0) for name, v in floors.items()}
    for name, model in (("teacher", prep.teacher_dir), ("student before", prep.student_dir)):
        s = evaluate_dir(cfg, prep.tokenizer, model, prep.test)
        rows[name] = (s["rougeL_mean"], s["rougeL_std"])
    for method in methods:
        scores = []
        for seed in seeds:
            steps = train_steps(method, budget, warm=5)
            run_dir = run(load_config(None, common + [f"algo.method={method}", f"train.steps={steps}",
                                                      f"train.seed={seed}", f"run.name=dolly-{method}-{seed}"]),
                          log=lambda *a: None)
            scores.append(json.loads((run_dir / "eval.json").read_text())["rougeL"]["student_after"])
            log(f"dolly {method} seed {seed}: ROUGE-L {scores[-1]:.2f}")
        rows[method] = (statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0)
    bar = max(floors.values())
    lines = ["", f"## Dolly (held-out, {len(val)} prompts, ROUGE-L; {budget} student steps)", "",
             "| model | ROUGE-L | beats both floors by > 2 std |", "|---|---|---|"]
    for name, (m, sd) in rows.items():
        ranked = "yes" if name in methods and m - 2 * sd > bar else ("-" if name not in methods else "no")
        lines.append(f"| {name} | {m:.2f} ± {sd:.2f} | {ranked} |")
    return "\n".join(lines) + "\n"
