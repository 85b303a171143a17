"""Reference (b) of bench/throughput.py: TRL's GKDTrainer on the same models and data, fully on-policy.

Runs inside its own virtual environment (TRL pins its own transformers), started by throughput.py:
    <venv>/bin/python bench/trl_gkd.py --job job.json --out result.json
job.json holds the model directories, the prompts/responses as text and the settings. The prompt text
is rlkd's Alpaca prompt verbatim: a chat template that concatenates the messages reproduces it.
Per-step wall times come from timing `training_step` (generation + loss + backward) and the
optimizer step, which is what rlkd's step time also covers.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer

TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
            "{% endfor %}")


class Timed(GKDTrainer):
    generated: list[int] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.generated.append(int((inputs["labels"] != -100).sum()))
        return loss


class StepClock(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    job = json.load(open(a.job))
    torch.set_num_threads(job["threads"])
    tok = AutoTokenizer.from_pretrained(job["student"])
    tok.chat_template = TEMPLATE
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in zip(job["prompts"], job["responses"])]
    cfg = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=job["batch_size"],
                    max_steps=job["steps"], learning_rate=job["lr"], lmbda=1.0, beta=job["beta"],
                    temperature=job["temperature"], max_new_tokens=job["max_new_tokens"], use_cpu=True,
                    report_to=[], logging_strategy="no", save_strategy="no", seed=job["seed"],
                    max_grad_norm=1.0, weight_decay=0.0, lr_scheduler_type="constant", dataloader_drop_last=True,
                    bf16=False, fp16=False, gradient_checkpointing=False)  # rlkd on CPU: fp32, no checkpointing
    trainer = Timed(model=AutoModelForCausalLM.from_pretrained(job["student"]),
                    teacher_model=AutoModelForCausalLM.from_pretrained(job["teacher"]), args=cfg,
                    train_dataset=Dataset.from_list(rows), processing_class=tok)
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    json.dump({"step_seconds": clock.times, "generated_tokens": trainer.generated, "peak_rss_gib": peak_gib,
               "trl_version": __import__("trl").__version__}, open(a.out, "w"))


if __name__ == "__main__":
    main()
