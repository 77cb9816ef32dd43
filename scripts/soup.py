#!/usr/bin/env python
"""Average the weights of policies of one architecture: a uniform model soup.

    scripts/soup.py runs/exp/grpo2m_mixed/policy runs/exp/grpo2m_mixed_seed1/policy ... --output runs/exp/soup/policy
    scripts/soup.py $(ls -d runs/exp/grpo/checkpoints/step_* | tail -20) --output runs/exp/grpo_tail20

The second averages one run's last 20 checkpoints (a run trained with ``keep_checkpoints=0`` keeps them all).

Every floating-point tensor is the mean of the policies'; integer buffers must agree. Average only
policies fine-tuned from one common starting policy (post-training seeds of one SFT policy): the
weights of independently trained ones do not line up, and their average does not act like any of
them. Post-training records its starting policy's weights digest (``init_state_sha256`` in the
checkpoint's metadata); policies whose digests differ are refused. Evaluate the result with
``vlapt eval``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vlapt.policies import CheckpointError, load_policy, read_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if len(args.policies) < 2:
        parser.error("give at least two policies to average")
    starts = {path: _starting_policy(path) for path in args.policies}
    known = {digest for digest in starts.values() if digest is not None}
    if len(known) > 1:
        listing = "\n".join(f"  {path}: {digest[:12] if digest else 'not recorded'}" for path, digest in starts.items())
        sys.exit("the policies were fine-tuned from different starting policies, so their weights do not line up and "
                 f"their average would not act like any of them:\n{listing}\naverage only post-training runs that "
                 "started from one policy (their config.json's metadata.init_state_sha256 agree)")
    if None in starts.values():
        unknown = ", ".join(str(path) for path, digest in starts.items() if digest is None)
        print(f"note: {unknown} records no starting policy; check that every policy was fine-tuned from the same one")
    policies = [load_policy(p) for p in args.policies]
    states = [p.state_dict() for p in policies]
    if any(s.keys() != states[0].keys() for s in states):
        sys.exit("the policies have different parameters: only policies of one architecture can be averaged")
    soup = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            soup[name] = torch.stack([s[name] for s in states]).mean(0)
        elif all(torch.equal(s[name], first) for s in states):
            soup[name] = first
        else:
            sys.exit(f"integer buffer {name} differs between the policies; they cannot be averaged")
    policies[0].load_state_dict(soup)
    metadata = {"trained_by": "scripts/soup.py", "averaged": [str(p) for p in args.policies]}
    if known:  # a soup of one start's runs may be averaged again with that start's other runs
        metadata["init_state_sha256"] = known.pop()
    policies[0].save(args.output, metadata=metadata)
    print(f"wrote {args.output}")
    return 0


def _starting_policy(path: Path) -> str | None:
    """The weights digest of the policy ``path`` was post-trained from, if its checkpoint records one."""
    try:
        return (read_config(path).get("metadata") or {}).get("init_state_sha256")
    except CheckpointError:  # another family's layout (e.g. a LeRobot directory): nothing recorded
        return None


if __name__ == "__main__":
    sys.exit(main())
