"""Mutation testing of one module with cosmic-ray: which planted bugs do its tests kill?

    make mutate MODULE=src/leanfm/align/cwcl.py                       # tests: tests/test_cwcl.py
    make mutate MODULE=src/leanfm/vision/merge.py TESTS="tests/test_vision.py"

Why cosmic-ray and a copy: cosmic-ray runs the test command in a fresh process per mutant (mutmut 3 forks, which
can hang once torch's thread pool exists), and it edits the module on disk — so it works in a throw-away copy of
``src/`` and ``tests/``, never in the working tree. Tests run with one torch thread and without the ``slow`` mark.
Operators that only make sense for integers (shifts, bitwise, ``//``, ``%``, ``**``) are filtered out; what remains
are arithmetic and comparison swaps, boolean and unary flips, number and keyword replacements, removed
decorators, ``break``/``continue`` swaps and exception replacements.

Writes ``results/mutation/<module>.json`` (killed, survived, incompetent, the surviving mutants with line and
operator) and prints the score; survivors are places where a wrong implementation would pass the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXCLUDED = [r"core/ReplaceBinaryOperator_.*_(RShift|LShift|BitOr|BitAnd|BitXor|FloorDiv|Mod|Pow)$",
            r"core/ReplaceBinaryOperator_(RShift|LShift|BitOr|BitAnd|BitXor|FloorDiv|Mod|Pow)_.*",
            r"core/ReplaceAndWithOr_.*BitAnd.*", r"core/AddNot", r"core/VariableReplacer",
            r"core/VariableInserter"]


def default_tests(module: Path) -> list[str]:
    candidate = REPO / "tests" / f"test_{module.stem}.py"
    if not candidate.is_file():
        raise SystemExit(f"no tests/test_{module.stem}.py for {module}; pass TESTS=\"tests/test_x.py ...\"")
    return [str(candidate.relative_to(REPO))]


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="the module to mutate, e.g. src/leanfm/align/cwcl.py")
    parser.add_argument("tests", nargs="*", help="test files (default: tests/test_<module>.py)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "mutation")
    args = parser.parse_args()
    module = Path(args.module)
    if not (REPO / module).is_file() or module.suffix != ".py":
        print(f"mutate: '{module}' is not a Python file of this repository", file=sys.stderr)
        return 2
    tests = args.tests or default_tests(module)
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="leanfm-mutate-") as tmp:
        work = Path(tmp)
        for part in ("src", "tests", "pyproject.toml"):
            source = REPO / part
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, work / part)
        config = work / "cosmic-ray.toml"
        test_command = " ".join([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 "-m", "'not slow'", *tests])
        config.write_text(
            "[cosmic-ray]\n"
            f"module-path = {json.dumps(str(module))}\n"
            f"timeout = {args.timeout}\n"
            "excluded-modules = []\n"
            f"test-command = {json.dumps(test_command)}\n\n"
            "[cosmic-ray.distributor]\nname = \"local\"\n\n"
            "[cosmic-ray.filters.operators-filter]\n"
            f"exclude-operators = {json.dumps(EXCLUDED)}\n", encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(work / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}
        session = work / "session.sqlite"
        for step in (["cosmic-ray", "init", str(config), str(session)],
                     ["cr-filter-operators", str(session), str(config)],
                     ["cosmic-ray", "baseline", str(config)],
                     ["cosmic-ray", "exec", str(config), str(session)]):
            done = run([str(bin_dir / step[0]), *step[1:]], work, env)
            if done.returncode != 0:
                print(f"mutate: {' '.join(step[:2])} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}",
                      file=sys.stderr)
                return 1
        dump = run([str(bin_dir / "cosmic-ray"), "dump", str(session)], work, env)
    summary = summarise([json.loads(line) for line in dump.stdout.splitlines() if line.strip()], module, tests)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{module.stem}.json"
    target.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"{module}: {summary['killed']} of {summary['competent']} mutants killed "
          f"({100 * summary['score']:.1f}%), {summary['skipped']} skipped by filters, {summary['incompetent']} "
          f"incompetent; survivors in {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
    for s in summary["survivors"]:
        print(f"  survived: line {s['line']}: {s['operator']} (occurrence {s['occurrence']}): {s['code']}")
    return 0


def summarise(items: list, module: Path, tests: list[str]) -> dict:
    """Counts and survivors from ``cosmic-ray dump`` lines ``[work item, result]``."""
    lines = (REPO / module).read_text(encoding="utf-8").splitlines()
    counts = {"killed": 0, "survived": 0, "incompetent": 0, "skipped": 0}
    survivors = []
    for item, result in items:
        if result is None:
            continue
        mutation = item["mutations"][0]
        outcome = result.get("test_outcome")
        if result.get("worker_outcome") == "skipped":
            counts["skipped"] += 1
        elif outcome == "killed":
            counts["killed"] += 1
        elif outcome == "survived":
            counts["survived"] += 1
            line = mutation["start_pos"][0]
            survivors.append({"line": line, "operator": mutation["operator_name"],
                              "occurrence": mutation["occurrence"], "code": lines[line - 1].strip()})
        else:
            counts["incompetent"] += 1
    competent = counts["killed"] + counts["survived"]
    return {"module": str(module), "tests": tests, **counts, "competent": competent,
            "score": counts["killed"] / competent if competent else 0.0, "survivors": survivors}


if __name__ == "__main__":
    sys.exit(main())
