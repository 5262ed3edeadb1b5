"""One runtime's local training, two commits, the same machine, interleaved: what a change did.

    benchmarks/.venv/bin/python benchmarks/compare_commits.py d24e584            # against HEAD
    benchmarks/.venv/bin/python benchmarks/compare_commits.py OLD NEW --workloads W1,W2 --runtimes vectorised

`simulation.py` measures each contender against the plain loop, across machines whose speed
differs by more than most changes do. This script answers the narrower question "did this
change make a runtime slower?": it checks out both commits (git worktrees in a temporary
folder), and for each workload and runtime runs one child process per commit in turn, `--reps`
times. A child builds the workload with its own commit's code and times `runtime.train` for one
round's sites, `--calls` times in `--chunks` chunks; it reports the fastest chunk (the least
disturbed by other load) and the median. Printed: both commits' times and new/old.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import json, sys, time
root, workload, kind, calls, chunks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sys.path[:0] = [root + "/benchmarks", root + "/src"]
import logging
logging.disable(logging.WARNING)
from workloads import SEED, WORKLOADS
from fedmi.core import params as P
from fedmi.core.types import RoundInfo
from fedmi.runtime import make_runtime
w = WORKLOADS[workload]
sites = w.sites()
model = w.build_model(sites)
init = P.clone(model.state_dict())
runtime = make_runtime(kind, model, sites)
method = w.trainer()
names = [s.name for s in runtime.site_infos()]
info = RoundInfo(3, w.rounds, SEED)
def one():
    for _ in runtime.train(method, init, names, info):
        pass
for _ in range(max(2, calls // 10)):
    one()
times = []
for _ in range(chunks):
    start = time.perf_counter()
    for _ in range(calls):
        one()
    times.append((time.perf_counter() - start) / calls)
close = getattr(runtime, "close", None)
if close:
    close()
print(json.dumps({"fastest": min(times), "median": sorted(times)[len(times) // 2]}))
"""


def checkout(rev: str, into: Path) -> Path:
    path = into / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def measure(tree: Path, workload: str, kind: str, calls: int, chunks: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), workload, kind, str(calls), str(chunks)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree.name} {workload} {kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="the commit to compare against")
    ap.add_argument("new", nargs="?", default="HEAD", help="the commit measured (default HEAD)")
    ap.add_argument("--workloads", default="W1,W2", type=lambda s: s.split(","))
    ap.add_argument("--runtimes", default="sequential,vectorised", type=lambda s: s.split(","))
    ap.add_argument("--reps", type=int, default=3, help="child processes per commit, interleaved")
    ap.add_argument("--calls", type=int, default=20, help="rounds of training timed per chunk")
    ap.add_argument("--chunks", type=int, default=10)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedmi-compare-") as tmp:
        trees = {rev: checkout(rev, Path(tmp)) for rev in (args.old, args.new)}
        try:
            rows = []
            for workload in args.workloads:
                for kind in args.runtimes:
                    found: dict[str, list[dict]] = {rev: [] for rev in trees}
                    for _ in range(args.reps):
                        for rev, tree in trees.items():
                            found[rev].append(measure(tree, workload, kind, args.calls, args.chunks))
                    fast = {rev: min(r["fastest"] for r in runs) for rev, runs in found.items()}
                    med = {rev: statistics.median(r["median"] for r in runs) for rev, runs in found.items()}
                    rows.append((workload, kind, fast, med))
                    print(f"  {workload} {kind}: done", file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    old, new = args.old, args.new
    print(f"\nms per round of local training (runtime.train for every site), fastest chunk / median over "
          f"{args.reps} interleaved processes per commit\n")
    print(f"| workload | runtime | {old} fastest | {new} fastest | new/old | {old} median | {new} median | new/old |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for workload, kind, fast, med in rows:
        print(f"| {workload} | {kind} | {1e3 * fast[old]:.2f} | {1e3 * fast[new]:.2f} | {fast[new] / fast[old]:.2f} "
              f"| {1e3 * med[old]:.2f} | {1e3 * med[new]:.2f} | {med[new] / med[old]:.2f} |")


if __name__ == "__main__":
    main()
