"""Print the markdown tables of docs/results.md from evaluation JSON files.

    .venv/bin/python scripts/results_tables.py "scripted expert=docs/results/eval_scripted_mt10.json" ...

Each argument is LABEL=PATH; the summary table comes first, then one per-task table per row.
"""

import json
import sys

from vlapt.pipeline import results_markdown


def main(argv: list[str]) -> None:
    rows = {}
    for arg in argv:
        label, _, path = arg.partition("=")
        if not path:
            raise SystemExit(f"argument {arg!r} must look like LABEL=PATH")
        with open(path) as f:
            rows[label] = json.load(f)
    print(results_markdown(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
