"""Placement across nodes (issue 22 item 5): a three-node Ray cluster on this machine (ray.cluster_utils.Cluster,
each node with a custom resource of its own), with the learners, the teacher and the rollouts pinned to different
nodes through `<section>.resources`. GKD and OPD run 3 steps each, and the test asks every actor where it ran."""
import json
from pathlib import Path

import pytest
import ray

from rlkd.config import load_config
from rlkd.launch import run
from rlkd.outputs import COMPLETED

ROLES = ("learner", "teacher", "rollout")


@pytest.fixture(scope="module")
def three_nodes():
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    from rlkd.reaper import remove_session

    pointer = Path(get_ray_address_file(None))  # Cluster records its head there, over a `ray start` of yours
    recorded = pointer.read_text() if pointer.is_file() else None

    # Cluster addresses its head by the machine's own IP (with node_ip_address=127.0.0.1 its GCS client cannot
    # reach the head); Ray's processes listen on all interfaces either way (docs/operations.md)
    node = {"num_cpus": 2, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "resources": {"node_learner": 4}})
    for role in ROLES[1:]:
        cluster.add_node(**node, resources={f"node_{role}": 4})
    cluster.wait_for_nodes()
    session = cluster.head_node.get_session_dir_path()
    try:
        yield cluster
    finally:  # this test's cluster, by its own handle; the record of yours put back
        ray.shutdown()
        cluster.shutdown()
        remove_session(session)
        if recorded is None:
            pointer.unlink(missing_ok=True)
        else:
            pointer.write_text(recorded)


def _where(run_name: str) -> dict[str, str]:
    """role -> the custom resource of the node its first actor runs on."""
    label = {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("node_")) for n in ray.nodes() if n["Alive"]}
    out = {}
    for role in ROLES:
        actor = ray.get_actor(f"rlkd:{run_name}:{role}:0")
        node = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        out[role] = label[node]
    return out


@pytest.mark.parametrize("method", ["gkd", "opd"])
def test_roles_run_on_the_nodes_the_config_names(three_nodes, tmp_path, method):
    placed = {}
    cfg = load_config("configs/smoke.yaml", [
        f"algo.method={method}", "algo.gkd.lmbda=1.0", "train.steps=3", "train.checkpoint_every=0",
        "eval.num_examples=0", f"run.output_dir={tmp_path}", f"run.name={method}-nodes",
        f"model.cache_dir={tmp_path / 'cache'}", f"run.ray_address={three_nodes.address}",
        *(f"{role}.resources={{node_{role}: 1}}" for role in ROLES)])
    run_dir = run(cfg, on_step=lambda m, c: placed.update(_where(f"{method}-nodes")) if m["step"] == 1 else None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"{method} placement:", json.dumps(placed))
    assert (run_dir / COMPLETED).exists() and len(rows) == 3
    assert placed == {role: f"node_{role}" for role in ROLES}
