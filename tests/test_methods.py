"""Every method's config under configs/methods/ end to end through the same pipeline (Ray actors,
DeepSpeed learner, real tiny models): the training loss goes down, every student parameter
changes, and methods without rollouts start no rollout actors. AMMD's own smoke test is test_e2e.py; its
ablations here check that the weighted moment-matching distance falls after the critic warm-up."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from rlkd.algorithms import METHODS
from rlkd.config import load_config
from rlkd.launch import run
from rlkd.models import load_model
from rlkd.outputs import COMPLETED

CONFIGS = Path(__file__).parents[1] / "configs" / "methods"

# AMMD's weighted distance is checked by test_e2e.py and the ablations below
LOSS = {name: spec.descended for name, spec in METHODS.items() if spec.descended}
NO_ROLLOUTS = {"sft", "fkl", "rkl", "jsd", "tvd", "seqkd", "okd", "ammd_off_policy"}
ABLATIONS = ["ammd_on_policy", "ammd_off_policy", "ammd_student_critic", "ammd_k1"]


def _run(name, tmp_root, *overrides):
    cfg = load_config(str(CONFIGS / f"{name}.yaml"), [f"run.output_dir={tmp_root}", f"run.name={name}",
                                                       f"model.cache_dir={tmp_root / 'cache'}", "eval.num_examples=0",
                                                       *overrides])
    run_dir = run(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (run_dir / COMPLETED).exists() and len(rows) == cfg.train.steps
    return cfg, run_dir, rows


def _assert_student_changed(run_dir):
    init_dir = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["student"]
    before, after = load_model(init_dir).state_dict(), load_model(run_dir / "student").state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"unchanged student parameters: {unchanged}"


def _went_down(values):
    """Mean of the last third below the mean of the first third (per-step batches differ)."""
    k = max(1, len(values) // 3)
    assert all(math.isfinite(v) for v in values), values
    assert sum(values[-k:]) / k < sum(values[:k]) / k, values


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("methods")


def test_every_method_lives_in_the_places_contributing_names():
    """CONTRIBUTING.md: a method is its METHODS entry, its section in rlkd/method_config.py (if it has
    hyperparameters), its configs/methods/<name>.yaml and its docs/algorithms.md entry; nothing else."""
    import dataclasses

    from rlkd.method_config import AlgoConfig

    docs = (CONFIGS.parents[1] / "docs" / "algorithms.md").read_text()
    sections = {f.name for f in dataclasses.fields(AlgoConfig)} - {"method"}
    assert sections <= set(METHODS), f"sections of no method: {sections - set(METHODS)}"
    for name in METHODS:
        assert load_config(str(CONFIGS / f"{name}.yaml"), []).algo.method == name
        assert f"\n### {name}\n" in docs, f"docs/algorithms.md has no '### {name}' entry"
        if name in sections:
            assert callable(getattr(getattr(AlgoConfig(), name), "validate", None)), name


@pytest.mark.parametrize("name", sorted(LOSS))
def test_method_trains(ray_cluster, root, name):
    cfg, run_dir, rows = _run(name, root)
    _went_down([r[LOSS[name]] for r in rows])
    _assert_student_changed(run_dir)
    rolled_out = any("timing/rollout" in r for r in rows)
    assert rolled_out == (name not in NO_ROLLOUTS), "rollouts must come from exactly the rollout-based methods"
    if name == "distillm":  # all three branches of the adaptive schedule ran, and validation fed it
        assert any(r["data/fresh"] for r in rows) and any(r["data/replay"] for r in rows)
        assert any(not r["data/fresh"] and not r["data/replay"] for r in rows)
        assert [r["step"] for r in rows if "val/ce" in r] == [4, 8, 12]
    if name == "minillm":  # teacher-mixed samples carry the mixture's log-probs; PPO ran several epochs
        assert all("loss/pg_last_epoch" in r for r in rows)


def test_okd_trains_only_the_teacher_lora(ray_cluster, root):
    """The saved adapter is PEFT's, with every LoRA matrix trained; the base teacher is untouched."""
    from peft import PeftModel

    _, run_dir, _ = _run("okd", root, "run.name=okd_lora", "train.steps=3")
    teacher_dir = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["teacher"]
    adapter = run_dir / "teacher_adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    base = load_model(teacher_dir).state_dict()
    adapted = PeftModel.from_pretrained(load_model(teacher_dir), str(adapter))
    lora = {k: v for k, v in adapted.state_dict().items() if "lora_" in k}
    assert lora and all(("q_proj" in k or "v_proj" in k) for k in lora)
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "lora_B starts at 0 and must train"
    merged = adapted.merge_and_unload().state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed


def test_okd_learner_changes_only_lora_parameters(ray_cluster, tiny_models, tiny_data):
    """Inside the learner group: one OKD step moves every LoRA tensor and no base teacher tensor."""
    from functools import partial

    from learners.group import LearnerGroup
    from rlkd.batch import SequenceBatch
    from rlkd.objectives import okd_objective

    tok, data = tiny_data
    group = LearnerGroup(1, 1.0, student_dir=str(tiny_models[1]), vocab_size=len(tok), zero_stage=0, student_lr=1e-2,
                         critic_lr=1e-3, weight_decay=0.0, grad_clip=1.0,
                         adapted_teacher={"teacher_dir": str(tiny_models[0]), "rank": 4, "scale": 2.0,
                                          "targets": "q_proj,v_proj", "lr": 0.0})
    try:
        gold = SequenceBatch.collate([d.prompt_ids for d in data[:8]], [d.response_ids for d in data[:8]],
                                     tok.pad_token_id)
        group.load_batch([{"train": gold}], [{}], {"train": float(gold.num_tokens())})
        def adapted_state():  # the full base + LoRA teacher, read inside the (single) learner rank
            return ray_cluster.get(group.workers[0].__ray_call__.remote(lambda w: w._full_state(w.adapted.module)))

        before = adapted_state()
        for _ in range(2):  # lora_B starts at 0, so lora_A only moves from the second step on
            metrics = group.train(partial(okd_objective, alpha=0.5), ("student", "teacher"))
        after = adapted_state()
    finally:
        group.shutdown()
    assert math.isfinite(metrics["loss/teacher"]) and math.isfinite(metrics["loss/student"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora = {k for k in before if "lora_" in k}
    assert changed == lora, (changed ^ lora)


@pytest.mark.parametrize("name", ABLATIONS)
def test_ammd_ablation_runs(ray_cluster, root, name):
    cfg, run_dir, rows = _run(name, root)
    _assert_student_changed(run_dir)
    beta, k = cfg.algo.ammd.beta, cfg.algo.ammd.critic_steps
    trained = rows[cfg.algo.ammd.critic_warmup_steps:]
    assert all(("ammd/d_on" in r) == (beta < 1) and ("ammd/d_off" in r) == (beta > 0) for r in trained)
    assert ("timing/rollout" in rows[0]) == (beta < 1)  # (teacher samples may come from the shared disk cache)
    assert all(r["timing/critic"] > 0 for r in rows) and k >= 1
    # the critic keeps up: after its K steps the estimated distances are not negative (a zero critic scores 0)
    assert all(r["invariant/critic_keeps_up"] == 1.0 for r in trained), [r.get("ammd/d_on") for r in trained]
    assert all(r.get(f"ammd/d_{b}", 0.0) <= 2 * r.get(f"ammd/tv_{b}", 0.0) + 1e-6  # |f| <= 1
               for r in trained for b in ("on", "off"))


def test_seqkd_reuses_cached_teacher_generations(ray_cluster, root):
    """Once every training prompt has a cached teacher response, SeqKD starts no teacher actor at all."""
    small = ["data.max_rows=40", "train.steps=3", f"model.cache_dir={root / 'seqkd_cache'}"]  # 24 train rows
    _, _, first = _run("seqkd", root, "run.name=seqkd_a", *small)
    assert all("timing/teacher_gen" in r for r in first)
    lines = []
    cfg = load_config(str(CONFIGS / "seqkd.yaml"), [f"run.output_dir={root}", "run.name=seqkd_b",
                                                     "eval.num_examples=0", *small])
    run_dir = run(cfg, log=lines.append)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("timing/teacher_gen" in r for r in rows)
    assert any(line.startswith("actors: 0 teacher, 0 rollout") for line in lines), lines
