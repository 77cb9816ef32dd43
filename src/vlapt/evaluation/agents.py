"""What evaluation runs: scripted experts (from the suite) and saved policies (read from checkpoints).

Evaluation only reads checkpoints: a trained policy enters here through `load_policy`.
"""

from __future__ import annotations

from vlapt.policies import PolicyAgent, load_policy


class CheckpointAgent(PolicyAgent):
    """A saved policy (any family) loaded from its checkpoint directory."""

    def __init__(self, path: str, deterministic: bool = True, device: str = "cpu", seed: int = 0):
        super().__init__(load_policy(path, device=device, seed=seed), deterministic, name=f"checkpoint:{path}")
        self.path = str(path)
