"""One MetaWorld task as a VLA sees it: an upright camera image (or several views side by side),
proprioception and an instruction; one `step` executes a whole action chunk.

The image is rendered once per chunk (after its last executed action), because software
rendering costs several physics steps; physics runs every step. For videos
(``EnvConfig.video_size``) a second renderer of the same camera draws a larger frame after
every step, into ``info["frames"]``, leaving the policy's image as it is.
"""

from __future__ import annotations

import string
from typing import Any, Mapping

import gymnasium as gym
import numpy as np

from vlapt.envs.metaworld._raw import make_raw_env
from vlapt.envs.metaworld.configurations import Configuration, draw_configuration
from vlapt.envs.metaworld.tasks import INSTRUCTIONS, check_task
from vlapt.interfaces import VIEW_SEPARATOR, EnvConfig, camera_views

CAMERAS: tuple[str, ...] = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
DEFAULT_CAMERA = "corner"
# MetaWorld's corner cameras are mounted upside down; a 180-degree turn makes them upright
# (a vertical flip alone would mirror the scene).
_ROTATED_CAMERAS = {"corner", "corner2", "corner3", "corner4"}
MAX_EPISODE_STEPS = 500  # MetaWorld's own path length; stepping past it raises inside MetaWorld
PROPRIO_FIELDS: tuple[str, ...] = ("hand_x", "hand_y", "hand_z", "gripper")
ACTION_DIM = 4  # end-effector dx, dy, dz and gripper effort, each in [-1, 1]
STATE_DIM = 39  # MetaWorld's observation vector: hand, gripper, objects, their previous frame, goal
AUX_TARGETS = (4, 5, 6, 36, 37, 38)  # the first object's position and the goal's, in the state


def check_env_config(config: EnvConfig) -> EnvConfig:
    """``config`` with the default camera filled in, or a ValueError naming the bad field."""
    if not config.camera:
        import dataclasses

        config = dataclasses.replace(config, camera=DEFAULT_CAMERA)
    views = camera_views(config.camera)
    for view in views:
        if view not in CAMERAS:
            raise ValueError(f"unknown camera {view!r} in camera={config.camera!r}; valid cameras: {', '.join(CAMERAS)} "
                             f"(several views: join names with {VIEW_SEPARATOR!r}, e.g. 'corner{VIEW_SEPARATOR}corner2')")
    if len(set(views)) != len(views):
        raise ValueError(f"camera={config.camera!r} names a view twice; name each camera once")
    if not 8 <= config.image_size <= 1024:
        raise ValueError(f"image_size must be in [8, 1024], got {config.image_size}")
    if config.camera_fovy and not 5.0 <= config.camera_fovy <= 120.0:
        raise ValueError(f"camera_fovy must be 0 (the camera's own) or in [5, 120] degrees, got {config.camera_fovy}")
    if config.video_size and not 32 <= config.video_size <= 2048:
        raise ValueError(f"video_size must be 0 (no video) or in [32, 2048], got {config.video_size}")
    if not 1 <= config.max_episode_steps <= MAX_EPISODE_STEPS:
        raise ValueError(f"max_episode_steps must be in [1, {MAX_EPISODE_STEPS}], got {config.max_episode_steps}")
    return config


class MetaWorldVLAEnv(gym.Env):
    """Gymnasium env over one MetaWorld v3 task whose action is a chunk of end-effector actions.

    ``reset(options={"configuration": cfg})`` places objects and goal from a `Configuration`
    (see `vlapt.envs.metaworld.configurations`), ``reset(options={"split": s, "index": i})``
    draws configuration i of split s; with neither, ``reset(seed=i)`` uses training
    configuration ``i``. ``step(chunk)`` runs the chunk's actions one by one, stops at the first
    success or at the step limit, and reports the per-step rewards (1 at the first success, else
    0) and the number of steps actually executed in ``info`` (``rewards``, ``steps``). With
    ``config.video_size`` > 0, reset's and step's ``info["frames"]`` hold a ``(n, video_size,
    views * video_size, 3)`` frame after reset and after each executed step (``reset(options={"video":
    False})``: none this episode).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str, config: EnvConfig | None = None, chunk_len: int = 1, config_seed: int = 0):
        self.task = check_task(task)
        self.config = check_env_config(config or EnvConfig())
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        self.chunk_len = chunk_len
        self.config_seed = config_seed
        self.instruction = INSTRUCTIONS[task]
        self.render_mode = "rgb_array" if self.config.render else None
        self._env = make_raw_env(task)
        self._views = camera_views(self.config.camera)
        self._renderer = None
        self._video_renderer = None
        self._video = False  # render video frames this episode
        self._raw_obs: np.ndarray | None = None
        self._steps = 0
        self._done = True
        self.configuration: Configuration | None = None

        size = self.config.image_size
        spaces: dict[str, gym.Space] = {
            "proprio": gym.spaces.Box(-np.inf, np.inf, (len(PROPRIO_FIELDS),), np.float32),
            "instruction": gym.spaces.Text(max_length=256, min_length=1, charset=string.printable),
        }
        if self.config.render:
            spaces["image"] = gym.spaces.Box(0, 255, (size, len(self._views) * size, 3), np.uint8)
        if self.config.privileged_state:
            spaces["state"] = gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (chunk_len, ACTION_DIM), np.float32)

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
            self._raw_obs, _ = self._env.reset()  # as a replay renders it (draw_configuration)
        else:
            if isinstance(configuration, Mapping):  # as info["configuration"] and results files record it
                configuration = Configuration(**{**configuration, "rand_vec": tuple(configuration["rand_vec"])})
            if configuration.task != self.task:
                raise ValueError(f"configuration is for task {configuration.task!r}, env runs {self.task!r}")
            space, vec = self._env._random_reset_space, np.asarray(configuration.rand_vec, dtype=np.float64)
            if vec.shape != space.shape or not (np.all(vec >= space.low) and np.all(vec <= space.high)):
                raise ValueError(f"configuration rand_vec {configuration.rand_vec} is not a {self.task} configuration "
                                 f"(shape {space.shape} within its reset space): use one that draw_configuration made")
            self._env._freeze_rand_vec = True
            self._env._last_rand_vec = vec
            self._raw_obs, _ = self._env.reset()
        self.configuration = configuration
        self._steps = 0
        self._done = False
        self._video = bool(self.config.video_size) and bool(options.get("video", True))
        observation = self._observation()
        info = {"configuration": configuration.as_dict(), "success": False}
        if self._video:
            info["frames"] = self._video_frame()[None]
        return observation, info

    def step(self, action):
        if self._done:
            raise RuntimeError("episode is over (success or step limit): call reset() before step()")
        chunk = np.asarray(action, dtype=np.float32)
        if chunk.ndim == 1:
            chunk = chunk[None]
        if chunk.ndim != 2 or chunk.shape[1] != ACTION_DIM or chunk.shape[0] < 1:
            raise ValueError(f"action chunk must have shape (n, {ACTION_DIM}) with n >= 1, got {chunk.shape}")
        if not np.isfinite(chunk).all():  # MuJoCo would reset its state on NaN and carry on as if nothing happened
            raise ValueError(f"action chunk has non-finite values (rows {sorted(set(np.argwhere(~np.isfinite(chunk))[:, 0]))}); "
                             "the policy that produced it has diverged")
        chunk = np.clip(chunk, -1.0, 1.0)
        rewards: list[float] = []
        frames: list[np.ndarray] = []
        success = False
        for act in chunk:
            self._raw_obs, _, _, _, info = self._env.step(act)
            self._steps += 1
            if self._video:
                frames.append(self._video_frame())
            success = bool(info["success"])
            rewards.append(1.0 if success else 0.0)
            if success or self._steps >= self.config.max_episode_steps:
                break
        terminated = success
        truncated = not success and self._steps >= self.config.max_episode_steps
        self._done = terminated or truncated
        reward_array = np.asarray(rewards, dtype=np.float32)
        info = {"rewards": reward_array, "steps": len(rewards), "success": success, "episode_steps": self._steps}
        if self._video:
            info["frames"] = np.stack(frames)
        return self._observation(), float(reward_array.sum()), terminated, truncated, info

    def render(self) -> np.ndarray:
        return self._render(segmentation=False)

    def render_segmentation(self) -> np.ndarray:
        """Geom id per pixel (-1: none), oriented like `render()`: for checking what is where."""
        return self._render(segmentation=True)[..., 0]

    def _render(self, segmentation: bool) -> np.ndarray:
        if self._renderer is None:
            self._renderer = self._make_renderer(self.config.image_size)
        if segmentation:
            self._renderer.enable_segmentation_rendering()
        try:
            image = self._draw(self._renderer)
        finally:
            if segmentation:
                self._renderer.disable_segmentation_rendering()
        return image

    def _video_frame(self) -> np.ndarray:
        """The scene now, at ``video_size``, from the policy's camera (its own renderer: the policy's stays as it is)."""
        if self._video_renderer is None:
            if self.config.render and self._renderer is None:  # the policy's renderer is made first, as without video
                self._renderer = self._make_renderer(self.config.image_size)
            self._video_renderer = self._make_renderer(self.config.video_size)
        return self._draw(self._video_renderer)

    def _draw(self, renderer) -> np.ndarray:
        """Every view, left to right, each upright."""
        images = []
        for view in self._views:
            renderer.update_scene(self._env.data, camera=view)
            image = renderer.render()
            images.append(image[::-1, ::-1] if view in _ROTATED_CAMERAS else image)
        return np.ascontiguousarray(images[0] if len(images) == 1 else np.concatenate(images, axis=1))

    def close(self):
        for renderer in (self._renderer, self._video_renderer):
            if renderer is not None:
                renderer.close()
        self._renderer = self._video_renderer = None
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

    def _make_renderer(self, size: int):
        import mujoco

        model = self._env.model
        if self.config.camera_fovy:  # zoom in: small objects (goals, pucks) cover more pixels
            for view in self._views:
                model.cam_fovy[model.camera(view).id] = self.config.camera_fovy
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
