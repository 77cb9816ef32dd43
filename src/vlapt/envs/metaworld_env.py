"""One MetaWorld task as a VLA sees it: an upright camera image, proprioception and an
instruction; one `step` executes a whole action chunk.

The image is rendered once per chunk (after its last executed action), because software
rendering costs ~10x a physics step on our CPUs; physics runs every step.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from vlapt.envs.configurations import Configuration, draw_configuration
from vlapt.envs.tasks import check_task, instruction_for

CAMERAS: tuple[str, ...] = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
# MetaWorld's corner cameras are mounted upside down; a 180-degree turn makes them upright
# (a vertical flip alone would mirror the scene).
_ROTATED_CAMERAS = {"corner", "corner2", "corner3", "corner4"}
MAX_EPISODE_STEPS = 500  # MetaWorld's own path length; stepping past it raises inside MetaWorld
REWARDS = ("sparse", "dense")
PROPRIO_FIELDS: tuple[str, ...] = ("hand_x", "hand_y", "hand_z", "gripper")


@dataclasses.dataclass
class EnvConfig:
    """What the policy observes and how an episode runs. Shared by collection, RL and evaluation."""

    camera: str = "corner"
    image_size: int = 96
    render: bool = True  # False for state-only policies (e.g. the scripted expert)
    privileged_state: bool = False  # add MetaWorld's 39-d state as observation["state"]
    reward: str = "sparse"  # "sparse": 1 at the first success; "dense": MetaWorld's shaped reward
    max_episode_steps: int = MAX_EPISODE_STEPS
    fast_render: bool = True  # no MSAA, no shadows/reflections: ~8x faster, visually the same
    camera_fovy: float = 0.0  # vertical field of view in degrees; 0 keeps the camera's own (45 for corner)
    # at every reset, let the scripted expert run the new configuration (unrendered, then rewound; `lookahead`) and
    # report its steps to success as info["reference_steps"] on every step of the episode (the full 500 where it
    # fails): a per-configuration yardstick of pace for training in simulation; the policy never sees it
    expert_reference: bool = False

    def validate(self) -> "EnvConfig":
        if self.camera not in CAMERAS:
            raise ValueError(f"unknown camera {self.camera!r}; valid cameras: {', '.join(CAMERAS)}")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [8, 1024], got {self.image_size}")
        if self.camera_fovy and not 5.0 <= self.camera_fovy <= 120.0:
            raise ValueError(f"camera_fovy must be 0 (the camera's own) or in [5, 120] degrees, got {self.camera_fovy}")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; valid rewards: {', '.join(REWARDS)}")
        if not 1 <= self.max_episode_steps <= MAX_EPISODE_STEPS:
            raise ValueError(f"max_episode_steps must be in [1, {MAX_EPISODE_STEPS}], got {self.max_episode_steps}")
        return self


def make_goal_observable(env):
    """Let the 39-d state carry the goal (scripted experts read it; the policy never does).

    The observation space is a cached property whose bounds clip the state, so it has to be
    recomputed after the switch, as MetaWorld's own `set_task` does.
    """
    env._set_task_called = True
    if env._partially_observable:
        env._partially_observable = False
        env.__dict__.pop("sawyer_observation_space", None)
    return env


class MetaWorldVLAEnv(gym.Env):
    """Gymnasium env over one MetaWorld v3 task whose action is a chunk of end-effector actions.

    ``reset(options={"configuration": cfg})`` places objects and goal from a `Configuration`
    (see `vlapt.envs.configurations`); without one, ``reset(seed=i)`` uses training
    configuration ``i``. ``step(chunk)`` runs the chunk's actions one by one, stops at the first
    success or at the step limit, and reports the per-step rewards and the number of steps
    actually executed in ``info`` (``rewards``, ``steps``), and the shaping potential of the
    states before and after the chunk (``potential_start``, ``potential_end``; see `potential`).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str, config: EnvConfig | None = None, chunk_len: int = 1, config_seed: int = 0):
        from metaworld.env_dict import ENV_CLS_MAP

        self.task = check_task(task)
        self.config = (config or EnvConfig()).validate()
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        self.chunk_len = chunk_len
        self.config_seed = config_seed
        self.instruction = instruction_for(task)
        self.render_mode = "rgb_array" if self.config.render else None
        self._env = make_goal_observable(ENV_CLS_MAP[task]())
        self._renderer = None
        self._raw_obs: np.ndarray | None = None
        self._steps = 0
        self._done = True
        self._potential = 0.0
        self._expert = None  # the scripted expert, built on the first reset that needs a reference
        self._reference_steps = MAX_EPISODE_STEPS
        self.configuration: Configuration | None = None

        size = self.config.image_size
        spaces: dict[str, gym.Space] = {
            "proprio": gym.spaces.Box(-np.inf, np.inf, (len(PROPRIO_FIELDS),), np.float32),
            "instruction": gym.spaces.Text(max_length=256, min_length=1, charset=string.printable),
        }
        if self.config.render:
            spaces["image"] = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        if self.config.privileged_state:
            spaces["state"] = gym.spaces.Box(-np.inf, np.inf, (39,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (chunk_len, 4), np.float32)

    # -- gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode in a configuration: ``options={"configuration": Configuration}``, or
        ``options={"split": "eval", "index": i}`` (drawn here, with this env's ``config_seed``),
        or, with neither, training configuration ``seed`` (0 if None)."""
        super().reset(seed=seed)
        options = options or {}
        configuration = options.get("configuration")
        if configuration is None:
            split = options.get("split", "train")
            index = options.get("index", seed or 0)
            configuration = draw_configuration(self._env, self.task, split, index, self.config_seed)
            self._raw_obs, _ = self._env.reset()
        else:
            if configuration.task != self.task:
                raise ValueError(f"configuration is for task {configuration.task!r}, env runs {self.task!r}")
            self._env._freeze_rand_vec = True
            self._env._last_rand_vec = np.asarray(configuration.rand_vec, dtype=np.float64)
            self._raw_obs, _ = self._env.reset()
        self.configuration = configuration
        self._steps = 0
        self._done = False
        self._potential = self.potential(self._env.evaluate_state(self._raw_obs, np.zeros(4, np.float32))[0])
        info = {"configuration": configuration.as_dict(), "success": False, "potential": self._potential}
        if self.config.expert_reference:
            self._reference_steps = self._expert_steps()
            info["reference_steps"] = self._reference_steps
        return self._observation(), info

    def step(self, action):
        if self._done:
            raise RuntimeError("episode is over (success or step limit): call reset() before step()")
        chunk = np.asarray(action, dtype=np.float32)
        if chunk.ndim == 1:
            chunk = chunk[None]
        if chunk.ndim != 2 or chunk.shape[1] != 4 or chunk.shape[0] < 1:
            raise ValueError(f"action chunk must have shape (n, 4) with n >= 1, got {chunk.shape}")
        chunk = np.clip(chunk, -1.0, 1.0)
        rewards: list[float] = []
        success = False
        for act in chunk:
            self._raw_obs, dense_reward, _, _, info = self._env.step(act)
            self._steps += 1
            success = bool(info["success"])
            if self.config.reward == "sparse":
                rewards.append(1.0 if success else 0.0)
            else:
                rewards.append(float(dense_reward))
            if success or self._steps >= self.config.max_episode_steps:
                break
        terminated = success
        truncated = not success and self._steps >= self.config.max_episode_steps
        self._done = terminated or truncated
        reward_array = np.asarray(rewards, dtype=np.float32)
        potential_start = self._potential
        self._potential = 0.0 if terminated else self.potential(dense_reward)  # a finished task is a terminal state
        info = {"rewards": reward_array, "steps": len(rewards), "success": success, "episode_steps": self._steps,
                "potential_start": potential_start, "potential_end": self._potential}
        if self.config.expert_reference:
            info["reference_steps"] = self._reference_steps
        return self._observation(), float(reward_array.sum()), terminated, truncated, info

    @staticmethod
    def potential(dense_reward: float) -> float:
        """MetaWorld's shaped reward of a state, scaled to [0, 1]: a potential for reward shaping.

        Shaping with F = gamma * phi(s') - phi(s) (Ng, Harada and Russell, 1999) gives every
        chunk a signal for progress (gripper to object, object to goal) without changing which
        policies are optimal for the sparse success reward; the task's end counts as phi = 0.
        MetaWorld's v3 rewards are functions of the state after a step (and, for grasps, of
        the gripper command), in [0, 10].
        """
        return float(dense_reward) / 10.0

    def lookahead(self, act: Callable[[np.ndarray], np.ndarray], steps: int) -> np.ndarray:
        """Let a state-based policy act ``steps`` env steps from here, then put everything back.

        ``act(state)`` maps MetaWorld's 39-d state to one action. Returns the actions it took
        (clipped), fewer when it succeeded first or reached MetaWorld's 500 steps. Nothing is
        rendered, and afterwards the simulator, MetaWorld's bookkeeping and this env are exactly
        as before, so the episode goes on as if the call never happened: what an expert *would*
        do from here, as a label for a chunk-level policy.
        """
        import mujoco

        if self._done:
            raise RuntimeError("episode is over (success or step limit): call reset() before lookahead()")
        env, model, data = self._env, self._env.model, self._env.data
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        physics = np.empty(mujoco.mj_stateSize(model, spec))
        mujoco.mj_getState(model, data, physics, spec)
        saved = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(env).items()
                 if isinstance(v, (np.ndarray, int, float, bool, str, type(None)))}
        raw, actions = self._raw_obs, []
        try:
            for _ in range(min(steps, MAX_EPISODE_STEPS - self._steps)):  # this env's own step limit does not cut plans
                action = np.clip(np.asarray(act(raw), dtype=np.float32), -1.0, 1.0)
                raw, _, _, _, info = env.step(action)
                actions.append(action)
                if info["success"]:
                    break
        finally:
            mujoco.mj_setState(model, data, physics, spec)
            mujoco.mj_forward(model, data)  # positions for the sites below and for rendering
            mujoco.mj_setState(model, data, physics, spec)  # the forward pass rewrote the solver's warmstart
            for site in env._target_site_config:  # as MetaWorld's step does after the physics
                env._set_pos_site(*site)
            for k, v in saved.items():
                setattr(env, k, v)
        return np.asarray(actions, dtype=np.float32).reshape(-1, 4)

    def _expert_steps(self) -> int:
        """The scripted expert's steps to success from this episode's start (MAX_EPISODE_STEPS if it fails)."""
        if self._expert is None:
            from vlapt.envs.experts import ScriptedExpert  # experts.py imports this module

            self._expert = ScriptedExpert()
        plan = self.lookahead(self._expert.state_policy(self.task), MAX_EPISODE_STEPS)
        return len(plan)  # it stops at the first success, or runs all MAX_EPISODE_STEPS from the start

    def render(self) -> np.ndarray:
        return self._render(segmentation=False)

    def render_segmentation(self) -> np.ndarray:
        """Geom id per pixel (-1: none), oriented like `render()`: for checking what is where."""
        return self._render(segmentation=True)[..., 0]

    def _render(self, segmentation: bool) -> np.ndarray:
        if self._renderer is None:
            self._renderer = self._make_renderer()
        if segmentation:
            self._renderer.enable_segmentation_rendering()
        try:
            self._renderer.update_scene(self._env.data, camera=self.config.camera)
            image = self._renderer.render()
        finally:
            if segmentation:
                self._renderer.disable_segmentation_rendering()
        if self.config.camera in _ROTATED_CAMERAS:
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()

    # -- internals -------------------------------------------------------------------------
    @property
    def episode_steps(self) -> int:
        return self._steps

    def privileged_state(self) -> np.ndarray:
        return np.asarray(self._raw_obs, dtype=np.float32)

    def _observation(self) -> dict[str, Any]:
        raw = self._raw_obs
        obs: dict[str, Any] = {
            "proprio": np.asarray(raw[:4], dtype=np.float32),
            "instruction": self.instruction,
        }
        if self.config.render:
            obs["image"] = self.render()
        if self.config.privileged_state:
            obs["state"] = np.asarray(raw, dtype=np.float32)
        return obs

    def _make_renderer(self):
        import mujoco

        model = self._env.model
        size = self.config.image_size
        if self.config.camera_fovy:  # zoom in: small objects (goals, pucks) cover more pixels
            model.cam_fovy[model.camera(self.config.camera).id] = self.config.camera_fovy
        model.vis.global_.offwidth = size
        model.vis.global_.offheight = size
        if self.config.fast_render:
            model.vis.quality.offsamples = 0
            model.vis.quality.shadowsize = 0
        renderer = mujoco.Renderer(model, size, size)
        if self.config.fast_render:
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return renderer
