"""vlapt: post-training vision-language-action robot policies with reinforcement learning."""

import os as _os

# Headless rendering through EGL by default: software (Mesa llvmpipe) where there is no GPU, the GPU's own
# driver where there is one. MUJOCO_GL set before importing vlapt (osmesa, glfw) wins.
_os.environ.setdefault("MUJOCO_GL", "egl")

__version__ = "0.1.0"


def load_policy(path, device: str = "cpu", seed: int = 0):
    """Load a policy checkpoint directory (safetensors + JSON), any family, ready for ``predict``."""
    from vlapt.policies import load_policy as _load

    return _load(path, device=device, seed=seed)
