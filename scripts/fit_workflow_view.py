"""Write the saved view (`extra.ds`) of example workflows so the whole graph shows on opening.

    python scripts/fit_workflow_view.py workflows/*.json

The view centres every node and group in the canvas of a 1600x1000 window, as large as fits (at most
100 %), by the rule tests/test_workflows.py checks (`fit_view`, `layout_problems`); the problems that
remain (overlapping nodes, a graph too large to show at 60 %) are printed and the exit code is 1.
Node positions are yours to choose; this only sets the view.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_workflows import fit_view, layout_problems  # noqa: E402  (one definition of the rule)


def main(paths: list[str]) -> int:
    bad = 0
    for name in paths:
        path = Path(name)
        workflow = json.loads(path.read_text())
        workflow.setdefault("extra", {})["ds"] = fit_view(workflow)
        path.write_text(json.dumps(workflow, indent=1))
        problems = layout_problems(workflow)
        print(f"{path.name}: zoom {workflow['extra']['ds']['scale']:.3f}" + "".join(f"\n  {p}" for p in problems))
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
