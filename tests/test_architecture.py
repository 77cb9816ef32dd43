"""The architecture's promises: one-way imports, and each extension point a module of its own.

The toy implementations below (an env suite, a pool backend, a policy family, an algorithm)
live only in this file and touch nothing in vlapt, yet collect demonstrations, post-train with
chunked PPO, run through rollouts and evaluate from a checkpoint like the built-in ones.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vlapt  # noqa: F401
from vlapt.algorithms import Algorithm, get_algorithm
from vlapt.interfaces import (
    BCLoss, ChunkEvaluation, ChunkPolicy, ChunkSample, EnvConfig, EnvPool, EnvSuite, ObservationSpec, StepResult,
    UnknownTaskError,
)
from vlapt.policies import ChunkPolicyBase, load_policy, register_policy_type
from vlapt.policies.checkpoint import write_checkpoint

SRC = Path(vlapt.__file__).parent

# Which package may import which: data flows env -> rollout -> buffer (data) -> algorithm -> policy;
# evaluation reads checkpoints and never imports training code.
ALLOWED = {
    "interfaces": set(),
    "config": set(),
    "plugins": set(),
    "rundir": {"config"},
    "envs": {"interfaces", "config", "plugins"},
    "policies": {"interfaces", "config", "plugins"},
    "rollout": {"interfaces"},
    "data": {"interfaces", "config", "rundir", "envs", "rollout"},
    "evaluation": {"interfaces", "config", "rundir", "envs", "rollout", "policies"},
    "algorithms": {"interfaces", "config", "rundir", "envs", "rollout", "data", "policies"},
    "serving": {"interfaces", "config", "policies"},
    "report": {"interfaces", "config", "evaluation"},
    "pipeline": {"interfaces", "config", "rundir", "envs", "rollout", "data", "policies", "algorithms", "evaluation",
                 "report"},
    "cli": {"*"},
    "": {"policies"},  # vlapt/__init__.py: load_policy
}


def _modules() -> dict[str, Path]:
    return {".".join(("vlapt", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in SRC.rglob("*.py")}


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name == "vlapt" or name.startswith("vlapt.")}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_package_imports_upwards():
    modules = _modules()
    problems = []
    for module, path in modules.items():
        own = _package(module)
        allowed = ALLOWED.get(own)
        assert allowed is not None, f"{module}: package {own!r} has no place in the layering (add it to ALLOWED)"
        for target in _imports(path, module, top_level_only=False):
            other = _package(target)
            if other and other != own and "*" not in allowed and other not in allowed:
                problems.append(f"{module} imports {target}")
    assert not problems, "upward or sideways imports:\n" + "\n".join(sorted(problems))


@pytest.mark.parametrize("top_level_only", [True, False], ids=["top-level", "deferred-too"])
def test_no_import_cycles_between_modules(top_level_only):
    modules = _modules()  # a deferred import would hide a cycle at import time only: none is allowed either
    graph = {m: sorted(t for t in _imports(p, m, top_level_only=top_level_only) if t in modules and t != m)
             for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            strongconnect(m)
    assert not cycles, f"modules that import each other: {cycles}"


def test_metaworld_stays_inside_its_suite():
    inside = SRC / "envs" / "metaworld"
    offenders = []
    for path in SRC.rglob("*.py"):
        if inside in path.parents:
            continue
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n.split(".")[0] == "metaworld" for n in names):
                    offenders.append(f"{path.name} imports metaworld")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith("-v3"):
                offenders.append(f"{path.name} names the MetaWorld task {node.value!r}")
    assert not offenders, offenders


# -- a toy env suite: a point that moves to a goal on a plane ---------------------------------------------
class ToyEnv:
    """Chunked env of one toy task; the image marks the point and the goal."""

    def __init__(self, task: str, config: EnvConfig, chunk_len: int, config_seed: int):
        self.task, self.config, self.chunk_len, self.config_seed = task, config, chunk_len, config_seed
        self.instruction = ToySuite().instruction(task)
        self.pos = np.zeros(2, np.float32)
        self.goal = np.zeros(2, np.float32)
        self.steps = 0

    def reset(self, *, seed=None, options=None):
        options = options or {}
        split, index = options.get("split", "train"), options.get("index", 0)
        rng = np.random.default_rng([self.config_seed, ["train", "eval"].index(split), index, len(self.task)])
        self.pos = rng.uniform(-1, 1, 2).astype(np.float32)
        self.goal = rng.uniform(-1, 1, 2).astype(np.float32)
        self.steps = 0
        return self._obs(), {"configuration": {"split": split, "index": index}}

    def step(self, action):
        chunk = np.clip(np.asarray(action, np.float32).reshape(-1, 2), -1, 1)
        rewards, success = [], False
        for a in chunk:
            self.pos = self.pos + 0.2 * a
            self.steps += 1
            success = bool(np.linalg.norm(self.pos - self.goal) < 0.15)
            rewards.append(float(success))
            if success or self.steps >= self.config.max_episode_steps:
                break
        truncated = not success and self.steps >= self.config.max_episode_steps
        info = {"rewards": np.asarray(rewards, np.float32), "steps": len(rewards), "success": success,
                "episode_steps": self.steps}
        return self._obs(), float(sum(rewards)), success, truncated, info

    def _obs(self):
        size = self.config.image_size
        image = np.zeros((size, size, 3), np.uint8)
        for point, channel in ((self.pos, 0), (self.goal, 1)):
            r, c = (np.clip((point + 1) / 2, 0, 0.999) * size).astype(int)
            image[r, c, channel] = 255
        obs = {"image": image, "proprio": self.pos.copy(), "instruction": self.instruction}
        if self.config.privileged_state:
            obs["state"] = np.concatenate([self.pos, self.goal]).astype(np.float32)
        return obs

    def render(self):
        return self._obs()["image"]

    def close(self):
        pass


class ToyExpert:
    name = "toy-expert"
    chunk_len = 1

    def observation_config(self):
        return EnvConfig(render=True, privileged_state=True, image_size=8)

    def act(self, observations, tasks):
        return [np.clip(5 * (o["state"][2:] - o["state"][:2]), -1, 1)[None].astype(np.float32) for o in observations]


@dataclasses.dataclass(frozen=True)
class ToySuite:
    name: str = "test_architecture:ToySuite"
    family: str = "toy"
    tasks: tuple[str, ...] = ("reach-near", "reach-far")
    max_episode_steps: int = 40
    expert_names: tuple[str, ...] = ("scripted",)

    def check_task(self, task):
        if task not in self.tasks:
            raise UnknownTaskError(f"unknown toy task {task!r}")
        return task

    def resolve_tasks(self, tasks=None):
        return tuple(self.check_task(t) for t in tasks) if tasks else self.tasks

    def instruction(self, task):
        return {"reach-near": "move the dot to the goal", "reach-far": "move the dot to the far goal"}[self.check_task(task)]

    def vocabulary(self):
        return [self.instruction(t) for t in self.tasks]

    def check_env_config(self, config):
        return dataclasses.replace(config, camera=config.camera or "top",
                                   max_episode_steps=min(config.max_episode_steps, self.max_episode_steps))

    def observation_spec(self, config):
        config = self.check_env_config(config)
        return ObservationSpec(config.camera, config.image_size, config.camera_fovy, ("x", "y"), 2, 4, (2, 3))

    def make_env(self, task, config, chunk_len=1, config_seed=0):
        return ToyEnv(self.check_task(task), self.check_env_config(config), chunk_len, config_seed)

    def configuration(self, task, split, index, seed=0):
        return {"task": task, "split": split, "index": index, "seed": seed}

    def make_expert(self, name):
        return ToyExpert()


# -- a toy pool backend: every slot stepped in place, answers handed back by ticket ---------------------------
class ToyPool:
    built = 0  # pools made from this class, so a test can tell the backend was used

    def __init__(self, slots, num_workers=0):
        ToyPool.built += 1
        self.envs = [spec.build() for spec in slots]
        self.answers, self.calls = {}, 0

    def __len__(self):
        return len(self.envs)

    def reset(self, requests):
        return {i: self.envs[i].reset(options=o) for i, o in requests.items()}

    def submit(self, actions, reset_options=None):
        out = {}
        for i, a in actions.items():
            result = StepResult(*self.envs[i].step(a))
            if (result.terminated or result.truncated) and reset_options is not None:
                result = result._replace(reset_observation=self.envs[i].reset(options=reset_options[i])[0])
            out[i] = result
        self.calls += 1
        self.answers[self.calls] = out
        return self.calls

    def wait(self, ticket):
        return self.answers.pop(ticket)

    def groups(self, count):
        return [list(range(len(self.envs)))[g::count] for g in range(count) if list(range(len(self.envs)))[g::count]]

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- a toy policy family: a linear Gaussian over chunks from proprioception ----------------------------------
class ToyPolicy(ChunkPolicyBase):
    policy_type = "toy-linear"

    def __init__(self, chunk_len: int = 3, image_size: int = 8):
        super().__init__()
        self.chunk_len, self.action_dim, self.image_size = chunk_len, 2, image_size
        self.mean = nn.Linear(2, chunk_len * 2)
        self.critic = nn.Linear(2, 1)
        self.log_std = nn.Parameter(torch.full((chunk_len, 2), -1.0))

    def _forward(self, observations):
        x = torch.as_tensor(np.asarray(observations["proprio"], np.float32))
        return self.mean(x).view(-1, self.chunk_len, 2), self.critic(x).squeeze(-1)

    def _log_prob(self, mean, actions, k):
        z = (actions[:, :k] - mean[:, :k]) / self.log_std[:k].exp()
        return (-0.5 * z.square() - self.log_std[:k] - 0.5 * math.log(2 * math.pi)).sum((-2, -1))

    def observation_config(self):
        return EnvConfig(image_size=self.image_size)

    def act(self, observations, deterministic=False, generator=None):
        with torch.no_grad():
            mean, value = self._forward(observations)
            noise = torch.randn(mean.shape, generator=generator)
            actions = mean if deterministic else mean + noise * self.log_std.exp()
            log_prob = self._log_prob(mean, actions, self.chunk_len)
        return ChunkSample(actions, actions.numpy(), log_prob.numpy(), value.numpy())

    def evaluate(self, observations, actions, steps=0):
        mean, value = self._forward(observations)
        k = steps or self.chunk_len
        entropy = (self.log_std[:k] + 0.5 + 0.5 * math.log(2 * math.pi)).sum().expand(len(mean))
        return ChunkEvaluation(self._log_prob(mean, actions, k), entropy, value)

    def value(self, observations):
        with torch.no_grad():
            return self._forward(observations)[1].numpy()

    def bc_loss(self, observations, actions, pad):
        mean, _ = self._forward(observations)
        valid = (~pad).unsqueeze(-1).float()
        mse = ((mean - actions).square() * valid).sum() / valid.sum().clamp_min(1)
        return BCLoss(mse, mse.detach(), None)

    def param_groups(self):
        return {"actor": [*self.mean.parameters(), self.log_std], "critic": list(self.critic.parameters())}

    def reset_exploration(self, log_std):
        with torch.no_grad():
            self.log_std.fill_(log_std)

    def exploration_std(self):
        return float(self.log_std.detach().exp().mean())

    def save(self, path, metadata=None):
        return write_checkpoint(path, self.policy_type, {"chunk_len": self.chunk_len, "image_size": self.image_size},
                                self.state_dict(), metadata)


def load_toy(document, tensors, where):
    policy = ToyPolicy(**document["policy"])
    policy.load_state_dict(tensors)
    return policy


register_policy_type(ToyPolicy.policy_type, load_toy)


# -- a toy algorithm: REINFORCE on chunk returns, through the same rollout --------------------------------
@dataclasses.dataclass
class ToyConfig:
    algorithm: str = "test_architecture"
    init_policy: str = ""
    suite: str = ToySuite.name
    tasks: list[str] = dataclasses.field(default_factory=list)
    output_dir: str = "runs/toy"
    iterations: int = 3
    seed: int = 0
    eval_episodes: int = 1
    num_workers: int = 0
    env_backend: str = "test_architecture:ToyPool"

    def validate(self):
        return self


def train_toy(config: ToyConfig, progress: bool = True, evaluator=None) -> Path:
    from vlapt.algorithms.returns import chunk_gae
    from vlapt.envs import get_suite
    from vlapt.envs.pools import make_pool
    from vlapt.interfaces import SlotSpec
    from vlapt.rollout.chunked import ChunkedRollout

    suite = get_suite(config.suite)
    policy = load_policy(config.init_policy)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    slots = [SlotSpec(suite, t, suite.check_env_config(policy.observation_config()), policy.chunk_len)
             for t in suite.resolve_tasks(config.tasks)]
    generator = torch.Generator().manual_seed(config.seed)
    with make_pool(slots, config.num_workers, backend=config.env_backend) as pool:
        rollout = ChunkedRollout(pool, [s.task for s in slots], 0.99, policy.chunk_len)
        for _ in range(config.iterations):
            batch, _ = rollout.collect(policy, horizon=4, generator=generator)
            advantages, _ = chunk_gae(batch.rewards, batch.values, batch.discounts, batch.dones, batch.last_values, 0.95)
            rows = np.arange(batch.rewards.size)
            actions = torch.from_numpy(batch.actions.reshape(-1, policy.chunk_len, 2))
            log_prob = policy.evaluate(batch.observations(rows), actions).log_prob
            loss = -(log_prob * torch.from_numpy(advantages.reshape(-1))).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    final = Path(config.output_dir) / "policy"
    policy.save(final)
    return final


ALGORITHM = Algorithm("toy-reinforce", ToyConfig, train_toy)


# -- the tests of the extension points -----------------------------------------------------------------
def test_the_toy_implementations_satisfy_the_protocols(tmp_path):
    from vlapt.envs import get_suite
    from vlapt.envs.pools import make_pool
    from vlapt.interfaces import SlotSpec

    suite = get_suite(ToySuite.name)
    assert isinstance(suite, EnvSuite)
    assert isinstance(ToyPolicy(), ChunkPolicy)
    slot = SlotSpec(suite, "reach-near", suite.check_env_config(EnvConfig(image_size=8)), 3)
    with make_pool([slot], backend="test_architecture:ToyPool") as pool:
        assert isinstance(pool, EnvPool) and isinstance(pool, ToyPool)
    with pytest.raises(UnknownTaskError, match="unknown toy task"):
        suite.resolve_tasks(["push-v9"])


def test_a_new_suite_pool_policy_and_algorithm_run_through_collect_ppo_and_evaluation(tmp_path):
    from vlapt.algorithms.ppo_sbc import PPOConfig, train_ppo
    from vlapt.data import read_episodes
    from vlapt.data.collect import CollectConfig, collect
    from vlapt.evaluation import CheckpointAgent, EvalConfig, checkpoint_evaluator, evaluate

    # demonstrations from the suite's own expert, in vlapt's dataset format
    demos = tmp_path / "demos.hdf5"
    built = ToyPool.built
    collect(CollectConfig(suite=ToySuite.name, demos_per_task=3, image_size=8, camera_fovy=0, max_episode_steps=40,
                          num_workers=0, env_backend="test_architecture:ToyPool", output=str(demos)), progress=False)
    assert ToyPool.built == built + 1, "collection runs its envs on the configured pool backend"
    episodes = read_episodes(demos)
    assert {e.task for e in episodes} == set(ToySuite.tasks) and all(e.success for e in episodes)
    assert episodes[0].states.shape[1] == 4 and json.loads(json.dumps(episodes[0].summary()))["success"]

    # a policy of the new family, saved and loaded by path like any other
    torch.manual_seed(0)
    ToyPolicy(chunk_len=3).save(tmp_path / "init")
    loaded = load_policy(tmp_path / "init")
    assert isinstance(loaded, ToyPolicy) and loaded.chunk_len == 3

    # chunked PPO + self-BC on the new suite, policy family and pool backend, with periodic evaluation
    config = PPOConfig(init_policy=str(tmp_path / "init"), demos=str(demos), suite=ToySuite.name,
                       output_dir=str(tmp_path / "ppo"), envs_per_task=1, horizon=4, num_workers=0,
                       env_backend="test_architecture:ToyPool", total_env_steps=60, minibatch_size=4,
                       value_warmup_iterations=0, checkpoint_every=1, eval_every=2, eval_episodes=2, threads=1)
    evaluator = checkpoint_evaluator(ToySuite.tasks, 2, 0, ToySuite.name, env_backend="test_architecture:ToyPool")
    final = train_ppo(config, progress=False, evaluator=evaluator)
    assert isinstance(load_policy(final), ToyPolicy) and (tmp_path / "ppo" / "policy_ema").is_dir()
    assert (tmp_path / "ppo" / "evals" / "iteration_000000.json").is_file()
    history = json.loads((tmp_path / "ppo" / "history.json").read_text())
    assert history[-1]["env_steps"] >= 60 and history[-1]["buffer_episodes"] >= 6  # the demonstrations, and successes

    # evaluation reads the checkpoint
    result = evaluate(CheckpointAgent(str(final)), EvalConfig(suite=ToySuite.name, episodes_per_task=2,
                                                             max_episode_steps=40, num_workers=0,
                                                             env_backend="test_architecture:ToyPool"), progress=False)
    assert result["protocol"]["suite"] == ToySuite.name and result["average"]["episodes"] == 4


def test_a_new_algorithm_module_is_found_by_name_and_trains(tmp_path):
    algorithm = get_algorithm("test_architecture")
    assert algorithm.name == "toy-reinforce" and algorithm.config is ToyConfig
    ToyPolicy(chunk_len=2).save(tmp_path / "init")
    before = load_policy(tmp_path / "init").mean.weight.clone()
    final = algorithm.train(ToyConfig(init_policy=str(tmp_path / "init"), output_dir=str(tmp_path / "toy")))
    assert not torch.equal(load_policy(final).mean.weight, before)
    assert get_algorithm("ppo").name == "ppo"
    with pytest.raises(ValueError, match="unknown algorithm 'nope'.*ppo"):
        get_algorithm("nope")
