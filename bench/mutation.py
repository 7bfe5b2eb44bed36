"""Mutation testing of the pure modules: do their tests catch the code going wrong?

mutmut (configured in pyproject.toml's `[tool.mutmut]`: the six pure modules, each against the
fast tests that mirror it) makes small changes to the code one at a time and runs the tests
that reach each changed function; a change no test notices is a surviving mutant. This driver
runs it, then the hand-written mutants of `bench/mutation.toml` (mistakes mutmut's operators
cannot make, such as dropping a call), and writes `bench/results/<date>-mutation.json`: the
score per module, each mutant left alive with its diff and the reason it is left (from
`bench/mutation.toml`), and whether each hand mutant was caught.

Slow (about 20 minutes with two workers on two cores) and so not in CI; run it when these modules or their
tests change:

    pip install -r bench/requirements-mutation.txt
    python bench/mutation.py            # one worker; --workers 2 on a machine of your own

It exits non-zero when a mutant survives that bench/mutation.toml does not explain, when it
explains one that no longer survives, or when a hand mutant is not caught: either a test is
missing, or the file is stale.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "bench" / "mutation.toml"
RESULTS_DIR = ROOT / "bench" / "results"
WORK_DIR = ROOT / "mutants"  # mutmut's copy of the tree (git-ignored)
# "orca_space.engines.sampling.x_draw_from_nucleus__mutmut_9" or "...xǁClassǁmethod__mutmut_3"
MUTANT_NAME = re.compile(r"^(?P<module>[\w.]+?)\.xǁ?(?P<function>.+)__mutmut_(?P<number>\d+)$")
NOT_A_MUTANT_LEFT = {"killed", "timeout", "caught by type check"}


@dataclass(frozen=True)
class Mutant:
    name: str
    status: str

    @property
    def module_path(self) -> str:
        return MUTANT_NAME.match(self.name)["module"].replace(".", "/") + ".py"


def mutmut(*args: str, capture: bool = False) -> str:
    """Run the mutmut next to this Python (a virtual environment's), from the repository root."""
    executable = Path(sys.executable).with_name("mutmut")
    command = [str(executable if executable.exists() else shutil.which("mutmut") or "mutmut"), *args]
    done = subprocess.run(command, cwd=ROOT, check=True, text=True, capture_output=capture)
    return done.stdout if capture else ""


def mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def collect_mutants() -> list[Mutant]:
    """Every mutant and its status, from `mutmut results --all true` ("    name: status")."""
    mutants = []
    for line in mutmut("results", "--all", "true", capture=True).splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and MUTANT_NAME.match(name):
            mutants.append(Mutant(name, status))
    return mutants


def changed_lines(mutant: Mutant) -> str:
    """The diff's removed and added lines, which say what the mutant changed."""
    diff = mutmut("show", mutant.name, capture=True)
    lines = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return "\n".join(lines)


def load_config() -> dict:
    return tomllib.loads(CONFIG_FILE.read_text("utf-8")) if CONFIG_FILE.exists() else {}


def load_reasons() -> dict[str, dict]:
    """name -> {"added": the mutant's added line, "reason": why it is left}."""
    return {entry["mutant"]: entry for entry in load_config().get("survivor", [])}


def copy_of_the_tree(destination: Path) -> None:
    """The files git would commit (tracked, or new and not ignored): no mutants/, no venv."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_hand_mutant(entry: dict) -> str:
    """'killed', 'survived', or why it could not be tried, for one [[hand_mutant]]."""
    with tempfile.TemporaryDirectory(prefix="hand-mutant-") as scratch:
        copy_of_the_tree(Path(scratch))
        module = Path(scratch) / entry["module"]
        source = module.read_text("utf-8")
        if source.count(entry["old"]) != 1:
            return f"not applied: the text to replace occurs {source.count(entry['old'])} times"
        module.write_text(source.replace(entry["old"], entry["new"]), "utf-8")
        pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *entry["tests"]]
        code = subprocess.run(pytest, check=False, cwd=scratch, capture_output=True).returncode
    return {0: "survived", 1: "killed"}.get(code, f"error: pytest exited with {code}")


def run_hand_mutants() -> list[dict]:
    results = []
    for entry in load_config().get("hand_mutant", []):
        outcome = run_hand_mutant(entry)
        print(f"  hand mutant of {entry['module']}: {outcome} ({entry['why']})")
        results.append({**entry, "outcome": outcome})
    return results


def explain(mutant: Mutant, diff: str, reasons: dict[str, dict]) -> str | None:
    """The recorded reason, if it was recorded for this very change (names shift when code moves)."""
    entry = reasons.get(mutant.name)
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+")]
    if entry is None or entry.get("added", "").strip() not in added:
        return None
    return entry["reason"]


def module_scores(mutants: list[Mutant]) -> dict[str, dict]:
    scores = {}
    for path in sorted({m.module_path for m in mutants}):
        counts = Counter(m.status for m in mutants if m.module_path == path)
        total = sum(counts.values())
        caught = counts["killed"] + counts["timeout"] + counts["caught by type check"]
        scores[path] = {
            "mutants": total,
            "killed": counts["killed"],
            "survived": counts["survived"],
            "timeouts": counts["timeout"],
            "no_tests": counts["no tests"],
            "other": {
                s: n for s, n in counts.items() if s not in {"killed", "survived", "timeout", "no tests"}
            },
            "score": round(caught / total, 4) if total else None,
        }
    return scores


def totals(scores: dict[str, dict]) -> dict:
    keys = ("mutants", "killed", "survived", "timeouts", "no_tests")
    summed = {key: sum(s[key] for s in scores.values()) for key in keys}
    summed["score"] = round((summed["killed"] + summed["timeouts"]) / summed["mutants"], 4)
    return summed


def report(
    mutants: list[Mutant], hand: list[dict] | None, wall_s: float | None, workers: int, label: str
) -> tuple[dict, list[str]]:
    """The results document, and the problems that make the run fail."""
    reasons = load_reasons()
    left, problems = [], []
    for mutant in (m for m in mutants if m.status not in NOT_A_MUTANT_LEFT):
        diff = changed_lines(mutant)
        reason = explain(mutant, diff, reasons)
        if reason is None:
            problems.append(f"{mutant.name} ({mutant.status}) has no recorded reason:\n{diff}")
        left.append({"mutant": mutant.name, "status": mutant.status, "diff": diff, "reason": reason})
    alive = {entry["mutant"] for entry in left}
    problems += [
        f"{name} is explained in {CONFIG_FILE.name} but no longer survives"
        for name in reasons
        if name not in alive
    ]
    problems += [
        f"hand mutant of {h['module']} ({h['why']}): {h['outcome']}"
        for h in hand or []
        if h["outcome"] != "killed"
    ]
    scores = module_scores(mutants)
    document = {
        "date": datetime.date.today().isoformat(),
        "label": label,
        "tool": f"mutmut {mutmut_version()}",
        "command": f"python bench/mutation.py --workers {workers}",
        "config": "pyproject.toml [tool.mutmut]",
        "workers": workers,
        "wall_s": None if wall_s is None else round(wall_s),
        "score": "caught (killed or timed out) / mutants",
        "total": totals(scores),
        "modules": scores,
        "left_alive": left,
        "hand_mutants": hand,
    }
    return document, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--resume", action="store_true", help="keep mutants/ and its cached results")
    parser.add_argument("--report-only", action="store_true", help="only write the report of the last run")
    parser.add_argument("--label", default="after", help="recorded in the results (e.g. before, after)")
    parser.add_argument("--output", type=Path, help="default: bench/results/<date>-mutation.json")
    args = parser.parse_args()

    wall_s = None
    if not args.report_only:
        if not args.resume and WORK_DIR.exists():
            shutil.rmtree(WORK_DIR)  # results cached against older tests would be stale
        start = time.monotonic()
        mutmut("run", "--max-children", str(args.workers))
    hand = None if args.report_only else run_hand_mutants()
    if not args.report_only:
        wall_s = time.monotonic() - start

    document, problems = report(collect_mutants(), hand, wall_s, args.workers, args.label)
    output = args.output or RESULTS_DIR / f"{document['date']}-mutation.json"
    output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", "utf-8")
    total = document["total"]
    print(
        f"{total['killed']} killed, {total['survived']} survived, {total['timeouts']} timeouts, "
        f"{total['no_tests']} without tests of {total['mutants']} mutants: score {total['score']:.1%}"
    )
    for path, score in document["modules"].items():
        print(f"  {path}: {score['killed']}/{score['mutants']} killed, {score['survived']} survived")
    print(f"wrote {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
