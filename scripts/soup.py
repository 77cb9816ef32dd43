#!/usr/bin/env python
"""Average the weights of policies of one architecture: a uniform model soup.

    scripts/soup.py runs/exp/grpo2m_mixed/policy runs/exp/grpo2m_mixed_seed1/policy ... --output runs/exp/soup/policy

Every floating-point tensor is the mean of the policies'; integer buffers must agree. Average only
policies fine-tuned from one common starting policy (post-training seeds of one SFT policy): the
weights of independently trained ones do not line up, and their average does not act like any of
them. Evaluate the result with ``vlapt eval``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vlapt.policies import load_policy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if len(args.policies) < 2:
        parser.error("give at least two policies to average")
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
    policies[0].save(args.output, metadata={"trained_by": "scripts/soup.py", "averaged": [str(p) for p in args.policies]})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
