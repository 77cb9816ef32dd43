"""The Ray env-pool backend on a multi-node Ray cluster (Ray's own test cluster, its nodes on this machine):
env actors spread over the nodes, a training run across two nodes, and nodes lost under a running pool."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import vlapt  # noqa: E402,F401  (sets the headless GL backend before mujoco is imported)
import vlapt.algorithms.ppo_sbc as ppo_module  # noqa: E402
from vlapt.algorithms.checkpointing import latest_checkpoint, load_training_checkpoint  # noqa: E402
from vlapt.algorithms.ppo_sbc import PPOConfig, train_ppo  # noqa: E402
from vlapt.algorithms.sft import ModelConfig, SFTConfig, train_sft  # noqa: E402
from vlapt.data.collect import CollectConfig, collect  # noqa: E402
from vlapt.envs import get_suite  # noqa: E402
from vlapt.envs.pools import WorkerError, make_pool  # noqa: E402
from vlapt.interfaces import EnvConfig, SlotSpec  # noqa: E402

SUITE = get_suite("mt10")
TASK = "reach-v3"
H = 5


@pytest.fixture(scope="module")
def cluster():
    """A head node with 1 CPU; each test adds the worker nodes it needs and removes them again."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _worker_nodes(cluster):
    return [node for node in cluster.list_all_nodes() if node is not cluster.head_node]


def _remove_worker_nodes(cluster):
    for node in _worker_nodes(cluster):
        cluster.remove_node(node)


def test_actors_of_a_lost_node_move_to_the_remaining_nodes(cluster):
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    slots = [SlotSpec(SUITE, TASK, EnvConfig(image_size=32), H) for _ in range(2)]
    options = {0: {"split": "eval", "index": 1}, 1: {"split": "eval", "index": 2}}
    try:
        with make_pool(slots, num_workers=2, backend="ray") as pool:
            placed = [pool.actor_node(w) for w in range(2)]
            assert len(set(placed)) == 2, "the actors are spread over the nodes"
            first = {i: obs for i, (obs, _) in pool.reset(options).items()}
            pool.wait(pool.submit({i: np.zeros((H, 4)) for i in range(2)}))
            w = next(w for w in range(2) if placed[w] != cluster.head_node.node_id)  # an actor on a worker node
            lost_node = next(node for node in nodes if node.node_id == placed[w])
            cluster.remove_node(lost_node)
            results = pool.wait(pool.submit({i: np.zeros((H, 4)) for i in range(2)}, options))
            assert results[w].info["lost"] and results[w].truncated
            np.testing.assert_array_equal(results[w].reset_observation["image"], first[w]["image"])
            assert "lost" not in results[1 - w].info and results[1 - w].info["episode_steps"] == 2 * H
            assert pool.lost_episodes == 1
            assert pool.actor_node(w) not in (lost_node.node_id, placed[1 - w]), "moved to the node with room"
            going_on = pool.wait(pool.submit({i: np.zeros((H, 4)) for i in range(2)}))
            assert [going_on[i].info["steps"] for i in range(2)] == [H, H]
    finally:
        _remove_worker_nodes(cluster)


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    data = tmp_path_factory.mktemp("ray_demos") / "demos.hdf5"
    collect(CollectConfig(tasks=[TASK], demos_per_task=2, image_size=32, num_workers=0, output=str(data)),
            progress=False)
    out = tmp_path_factory.mktemp("ray_sft")
    policy = train_sft(SFTConfig(dataset=str(data), output_dir=str(out), model=ModelConfig(size="tiny", chunk_len=H),
                                 steps=2, batch_size=8, warmup_steps=1, checkpoint_every=2, log_every=2, threads=1),
                       progress=False)
    return policy, data


def test_training_runs_on_two_nodes_and_stops_with_a_clear_error_when_one_is_lost(cluster, sft_policy, tmp_path,
                                                                                 monkeypatch):
    worker = cluster.add_node(num_cpus=1)  # with the head's CPU: room for exactly the run's two env actors
    cluster.wait_for_nodes()
    pools, updates = [], []
    real_make_pool, real_update = ppo_module.make_pool, ppo_module._update

    def recording_make_pool(*args, **kwargs):
        pools.append(real_make_pool(*args, **kwargs))
        pools[-1].start_timeout_s = 5  # once the actors are up (however loaded the machine): a replacement's deadline
        return pools[-1]

    def update_then_lose_the_node(*args, **kwargs):
        updates.append(1)
        if len(updates) == 1:
            assert {pools[0].actor_node(w) for w in range(2)} == {cluster.head_node.node_id, worker.node_id}
        if len(updates) == 2:  # the node goes down while the learner works on iteration 2
            cluster.remove_node(worker)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(ppo_module, "make_pool", recording_make_pool)
    monkeypatch.setattr(ppo_module, "_update", update_then_lose_the_node)
    policy, demos = sft_policy
    config = PPOConfig(init_policy=str(policy), demos=str(demos), tasks=[TASK], output_dir=str(tmp_path / "ppo"),
                       envs_per_task=2, horizon=3, num_workers=2, env_backend="ray", total_env_steps=1000, epochs=1,
                       minibatch_size=8, bc_batch_size=8, checkpoint_every=1, eval_every=0,
                       value_warmup_iterations=1, threads=1)
    try:
        with pytest.raises(WorkerError, match="(?s)env actor .*reach-v3.*not placed within 5 s.*Add nodes"):
            train_ppo(config, progress=False)
    finally:
        _remove_worker_nodes(cluster)
    assert len(updates) == 2, "iterations 1 and 2 trained with env actors on both nodes; iteration 3 found one gone"
    checkpoint = latest_checkpoint(tmp_path / "ppo")
    _, _, state = load_training_checkpoint(checkpoint)  # intact: its hashes verify
    assert checkpoint.name == "step_000000002" and state["iteration"] == 2
    assert [row["lost_episodes"] for row in state["history"]] == [0, 0]
