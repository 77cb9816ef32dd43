"""Is a policy faster than the scripted expert, configuration by configuration?

    .venv/bin/python scripts/paired_pace.py docs/results/eval_scripted_mt10.json RESULT.json [--json OUT]

Both arguments are `vlapt eval` results under the same protocol (split, config_seed, step
limit), so episode k of a task ran on the same configuration in each. Mean steps to success
over each result's own successes mix pace with which configurations were solved (a policy
that fails the long configurations looks fast); this compares the two on the configurations
both solved: per task, the median and range of the per-configuration ratio of steps, and how
well the policy's lengths follow the reference's (correlation). See
`vlapt.evaluation.metrics.paired_pace`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlapt.evaluation.metrics import format_pace_table, paired_pace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="eval JSON of the reference (e.g. the scripted expert)")
    parser.add_argument("result", type=Path, help="eval JSON of the policy to compare")
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv)
    try:
        reference, result = (json.loads(p.read_text()) for p in (args.reference, args.result))
        for path, data in ((args.reference, reference), (args.result, result)):
            if not isinstance(data, dict) or not {"protocol", "episodes"} <= data.keys():
                raise ValueError(f"{path} is not a `vlapt eval` result (it has no 'protocol' and 'episodes'); "
                                 "pass the JSON that `vlapt eval --output` or `vlapt pipeline` writes")
        pace = paired_pace(reference, result)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.result} against {args.reference} (ratio = steps / reference steps, same configuration)\n")
    print(format_pace_table(pace, reference_name=reference.get("agent", "reference")))
    if args.json:
        args.json.write_text(json.dumps(pace, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
