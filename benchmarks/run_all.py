"""Run every benchmark module (``benchmarks/bench_*.py``), each in its own process.

``make bench`` runs ``python -m benchmarks.run_all --small``: each module's
quick variant (a minute or so each on a laptop CPU), as a smoke test that the
benchmarks still run and a rough figure. Without ``--small`` each module runs
its full variant (tens of minutes on a 2-core CPU; see ``RESULTS.md``).

A module's quick variant is its ``QUICK_ARGS`` list when it defines one at
module level, else ``--small`` when its source offers that option;
:data:`QUICK_DEFAULTS` covers modules that have neither. A module with no
quick variant is listed as skipped. Every module writes its own JSON under
``benchmarks/out/`` (git-ignored); this runner prints one line per module
and a summary, and exits non-zero when a module failed.

Usage::

    .venv/bin/python -m benchmarks.run_all --small              # what `make bench` runs
    .venv/bin/python -m benchmarks.run_all --small --only study,surface
    .venv/bin/python -m benchmarks.run_all --list
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: quick-variant arguments of modules that define neither ``QUICK_ARGS`` nor ``--small``
QUICK_DEFAULTS = {
    "bench_models": ["--device", "cpu", "--random-weights", "--repeat", "1", "--batch", "8", "--renders", "0"],
    "bench_deface": ["--out", "benchmarks/out/deface-quick.json", "--heads", "voxface", "--variants", "orig",
                     "--methods", "plane"],
}


def modules() -> list[str]:
    """Names of the benchmark modules, sorted (``bench_*.py`` beside this file)."""
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def quick_args(name: str) -> "list[str] | None":
    """The arguments of module ``name``'s quick variant, or None when it has none.

    Read from the source with :mod:`ast`, without importing the module (the
    benchmarks import torch and the whole package).
    """
    source = (HERE / f"{name}.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "QUICK_ARGS"
                                                for t in node.targets):
            return [str(a) for a in ast.literal_eval(node.value)]
    if name in QUICK_DEFAULTS:
        return list(QUICK_DEFAULTS[name])
    if '"--small"' in source or "'--small'" in source:
        return ["--small"]
    return None


def run(names: "list[str]", *, small: bool, timeout: float) -> list[dict]:
    """Run each module in a subprocess (``python -m benchmarks.<name> ...``); one record per module."""
    records = []
    for name in names:
        args = quick_args(name) if small else []
        if args is None:
            print(f"{name:20s} skipped: no quick variant (define QUICK_ARGS or a --small option)", flush=True)
            records.append({"module": name, "status": "skipped", "seconds": 0.0, "args": None})
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
        print(f"{name:20s} running: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
            status = "ok" if rc == 0 else f"failed (exit status {rc})"
        except subprocess.TimeoutExpired:
            status = f"failed (over {timeout:.0f} s)"
        dt = time.perf_counter() - t0
        print(f"{name:20s} {status} in {dt:.1f} s", flush=True)
        records.append({"module": name, "status": status, "seconds": dt, "args": args})
    return records


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="each module's quick variant (what `make bench` runs)")
    ap.add_argument("--only", default=None, help="comma-separated module names (with or without bench_)")
    ap.add_argument("--list", action="store_true", help="list the modules and their quick variants, run nothing")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per module (default 3600)")
    args = ap.parse_args(argv)
    names = modules()
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only.split(",") if n.strip()}
        unknown = sorted(wanted - set(names))
        if unknown:
            ap.error(f"no benchmark module {', '.join(unknown)}; there are {', '.join(names)}")
        names = [n for n in names if n in wanted]
    if args.list:
        for n in names:
            q = quick_args(n)
            print(f"{n:20s} quick: {' '.join(q) if q is not None else '(none)'}")
        return 0
    records = run(names, small=args.small, timeout=args.timeout)
    failed = [r for r in records if r["status"].startswith("failed")]
    total = sum(r["seconds"] for r in records)
    print(f"\n{len(records) - len(failed)} of {len(records)} benchmark modules ran without error "
          f"({'quick' if args.small else 'full'} variants, {total:.0f} s); results in benchmarks/out/")
    for r in failed:
        print(f"  {r['module']}: {r['status']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
