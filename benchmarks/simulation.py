"""Simulation speed and server memory: fedmi's runtimes against a plain PyTorch loop and Flower.

    make bench                      # all workloads, 3 runs each; writes nothing, prints the tables
    benchmarks/.venv/bin/python benchmarks/simulation.py --workloads W1,W2 --runs 1 --skip-flower

Each contender runs each workload (see workloads.py) in a fresh child process of this one, so
start-up, whole-process time and peak memory are its own: the parent samples the resident
memory of the child's whole process tree (Ray's helper processes included) every 0.1 s, and
the child's own peak is taken from the kernel. Runs are interleaved across contenders. The
child reports its import time, its set-up time (imports done -> round 1 starts: data, model,
runtime, workers) and the duration of every round; s/round is the median round, and "fixed s"
is whole-process time minus rounds x s/round: start-up, first-round warm-up (Flower starts
Ray's workers inside round 1) and shutdown. Every contender's final weights are compared with
the plain loop's: they did the same work.

W5 measures the server alone: peak memory above its baseline while aggregating 1,000 updates of
a 1M-parameter model that arrive one at a time, for the streaming weighted mean and for the
reducers that need every update at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

T0 = time.perf_counter()  # a child's import time counts from here (the standard library is already in)

HERE = Path(__file__).resolve().parent
CONTENDERS = ("plain", "sequential", "vectorised", "processes", "flower")
FEDMI = ("sequential", "vectorised", "processes")


# -- child side ------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    """A size field of /proc/self/status (VmRSS now, VmHWM peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(workload: str, contender: str, weights_out: str) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from workloads import SEED, WORKLOADS, plain_fedavg_round

    from fedmi.core import params as P

    imported = time.perf_counter()
    w = WORKLOADS[workload]
    sites = w.sites()
    model = w.build_model(sites)
    init = P.clone(model.state_dict())
    marks: list[float] = []
    if contender == "plain":
        state = init
        marks.append(time.perf_counter())
        for r in range(w.rounds):
            state = plain_fedavg_round(w, model, state, sites, r)
            marks.append(time.perf_counter())
        final = state
    elif contender in FEDMI:
        from fedmi.core.runner import Runner
        from fedmi.runtime import make_runtime
        from fedmi.server import make_aggregator

        runtime = make_runtime(contender, model, sites)
        runner = Runner(runtime, w.trainer(), make_aggregator("fedavg"), rounds=w.rounds, seed=SEED,
                        evaluate_every=0)
        if contender == "processes":
            runtime.start()  # workers start during set-up, not inside round 1
        marks.append(time.perf_counter())
        final = runner.run(init, on_round=lambda r: marks.append(time.perf_counter())).params
        runtime.close()
    elif contender == "flower":
        from flower_sim import run_flower

        marks.append(time.perf_counter())
        round_s, final = run_flower(w, sites, model, init, progress=True)
        for s in round_s:  # Flower's own start-up happens inside run_flower, before round 1
            marks.append(marks[-1] + s)
        marks[0] = marks[-1] - sum(round_s)
    else:
        raise SystemExit(f"unknown contender {contender}")
    P.save(final, weights_out)
    rounds = [b - a for a, b in zip(marks, marks[1:])]
    print(json.dumps({"imports_s": imported - T0, "setup_s": marks[0] - imported, "round_s": rounds,
                      "threads": torch.get_num_threads(), "own_peak_bytes": _rss_kib("VmHWM") * 1024}))


def child_w5(reducer: str, updates: int, size: int) -> None:
    """Server-side aggregation only; prints peak resident memory above the baseline, in bytes."""
    from collections import OrderedDict

    import torch

    from fedmi.core.types import RoundInfo, Update
    from fedmi.server import parse_pipeline

    pipeline = parse_pipeline(f"{reducer} | server_sgd(lr=1.0)")

    def arriving(params, count):  # each update exists only until the server has taken it in
        g = torch.Generator().manual_seed(0)
        for k in range(count):
            yield Update(f"site-{k}", OrderedDict((n, torch.randn(v.shape, generator=g)) for n, v in params.items()),
                         1 + k % 7)

    # Warm-up on a tiny model: thread pools and lazy kernels are fixed costs, not the aggregator's.
    tiny = OrderedDict(weight=torch.zeros(10, 100), bias=torch.zeros(1))
    pipeline.aggregate(pipeline.init(tiny), tiny, arriving(tiny, updates), RoundInfo(0, 1, 0))
    params = OrderedDict(weight=torch.zeros(size // 1000, 1000), bias=torch.zeros(size % 1000 or 1))
    state = pipeline.init(params)
    # The baseline holds the global parameters: the server keeps those whatever it aggregates.
    # Writing 5 to clear_refs resets the kernel's high-water mark (VmHWM) to the current size,
    # so the peak below is this aggregation's, not the imports'.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    pipeline.aggregate(state, params, arriving(params, updates), RoundInfo(0, 1, 0))
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    model_bytes = sum(v.numel() * v.element_size() for v in params.values())
    print(json.dumps({"extra_bytes": max(0, peak - baseline) * 1024, "model_bytes": model_bytes,
                      "seconds": seconds}))


# -- parent side -----------------------------------------------------------------------------

def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_child(args: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run this script as a child; its JSON report plus whole-process seconds and peak tree memory."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            # Every 0.1 s: walking the process tree costs CPU that the child would otherwise
            # have (at 20 ms it took ~15% of a core); the child's own peak is added below.
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        _, err = proc.communicate()
        done_rounds = [float(m) for m in re.findall(r"^round \d+: ([0-9.]+) s$", err or "", re.M)]
        partial = (f"; {len(done_rounds)} rounds done, median of rounds 2+ "
                   f"{statistics.median(done_rounds[1:]):.2f} s" if len(done_rounds) > 1 else "")
        return {"error": f"did not finish within {timeout:.0f} s{partial}"}
    finally:
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    report = json.loads(lines[-1])
    return {**report, "wall_s": wall, "peak_bytes": max(peak, report.get("own_peak_bytes", 0))}


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        for p in [*root.children(recursive=True), root]:
            p.kill()
    except psutil.NoSuchProcess:
        pass


def _median_run(runs: list[dict]) -> dict:
    """The run with the median whole-process time (its other numbers come with it)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    return sorted(ok, key=lambda r: r["wall_s"])[len(ok) // 2]


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def speed_table(args: argparse.Namespace) -> list[str]:
    sys.path.insert(0, str(HERE))
    from workloads import WORKLOADS

    from fedmi.core import params as P

    lines = ["| workload | contender | s/round | set-up s | imports s | fixed s | whole process s | peak MiB "
             "| fedmi / plain (round) | Flower / fedmi (round) | max weight diff vs plain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.workloads:
            runs: dict[str, list[dict]] = {c: [] for c in args.contenders}
            if "flower" in runs and key == "W4" and args.skip_flower_w4:
                runs["flower"].append({"error": "skipped (--skip-flower-w4)"})
            # Runs interleaved (plain, sequential, ..., then again): a slow spell of the shared
            # machine then touches every contender alike instead of whichever ran during it.
            for _ in range(args.w4_runs if key == "W4" else args.runs):
                for contender, done in runs.items():
                    if done and "error" in done[-1]:
                        continue
                    w4_flower = contender == "flower" and key == "W4"
                    path = str(Path(tmp) / f"{key}-{contender}.safetensors")
                    done.append(run_child(["--child", key, contender, path],
                                          args.flower_w4_timeout if w4_flower else args.timeout))
                    done[-1]["weights"] = path
            results: dict[str, dict] = {}
            for contender, done in runs.items():
                results[contender] = r = _median_run(done)
                r["round"] = statistics.median(r["round_s"]) if "round_s" in r else None
                print(f"  {key} {contender}: " + (r["error"] if "error" in r else
                      f"{r['round']:.4f} s/round, whole {r['wall_s']:.1f} s"), file=sys.stderr, flush=True)
            plain = results.get("plain", {})
            plain_w = P.load(plain["weights"]) if "error" not in plain and "weights" in plain else None
            best_fedmi = min((results[c]["round"] for c in FEDMI if results.get(c, {}).get("round")), default=None)
            for contender, r in results.items():
                if "error" in r:
                    lines.append(f"| {key} | {contender} | {r['error']} |  |  |  |  |  |  |  |  |")
                    continue
                diff = None
                if plain_w is not None:
                    other = P.load(r["weights"])
                    diff = max(float((plain_w[k] - other[k]).abs().max()) for k in plain_w)
                ratio_plain = r["round"] / plain["round"] if contender in FEDMI and plain.get("round") else None
                ratio_flower = r["round"] / best_fedmi if contender == "flower" and best_fedmi else None
                fixed = r["wall_s"] - len(r["round_s"]) * r["round"]  # start-up, warm-up, shutdown
                lines.append(
                    f"| {key} | {contender} | {_fmt(r['round'], 4)} | {_fmt(r['setup_s'], 2)} | "
                    f"{_fmt(r['imports_s'], 2)} | {_fmt(fixed, 1)} | {_fmt(r['wall_s'], 1)} | "
                    f"{r['peak_bytes'] / 2**20:.0f} | "
                    f"{_fmt(ratio_plain, 2)} | {_fmt(ratio_flower, 1)} | {'–' if diff is None else f'{diff:.1e}'} |")
    return [*lines, "", *(f"- {k}: {WORKLOADS[k].title}, {WORKLOADS[k].rounds} rounds" for k in args.workloads)]


def memory_table(args: argparse.Namespace) -> list[str]:
    lines = [f"| W5: aggregation of {args.w5_updates:,} updates, {args.w5_size:,} parameters | needs every update "
             "| peak extra memory / model size | seconds |", "|---|---|---:|---:|"]
    from fedmi.server import parse_pipeline

    for reducer in args.w5_reducers:
        needs_all = parse_pipeline(reducer).needs_all_updates
        # Large blocks straight from mmap: freed memory leaves the process at once, so the peak
        # resident size measures live tensors rather than the allocator's free lists.
        r = run_child(["--child-w5", reducer, str(args.w5_updates), str(args.w5_size)], args.timeout,
                      env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        needs = "yes" if needs_all else "no (streaming)"
        if "error" in r:
            lines.append(f"| {reducer} | {needs} | {r['error']} |  |")
            continue
        print(f"  W5 {reducer}: {r['extra_bytes'] / r['model_bytes']:.2f} x model", file=sys.stderr, flush=True)
        lines.append(f"| {reducer} | {needs} | "
                     f"{r['extra_bytes'] / r['model_bytes']:.2f} | {r['seconds']:.1f} |")
    return lines


def machine() -> str:
    import torch

    try:
        import flwr
        flower = f"flwr {flwr.__version__}"
        import ray
        flower += f", ray {ray.__version__}"
    except ImportError:
        flower = "Flower not installed"
    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), {flower}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:5])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-w5":
        return child_w5(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W1,W2,W3,W4,W5", type=lambda s: s.split(","))
    ap.add_argument("--contenders", default=",".join(CONTENDERS), type=lambda s: s.split(","))
    ap.add_argument("--runs", type=int, default=3, help="runs per contender; the median run is reported")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a contender's run is stopped")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--skip-flower-w4", action="store_true", help="Flower on 1,000 clients takes minutes")
    ap.add_argument("--w4-runs", type=int, default=1, help="runs per contender on W4 (each takes minutes)")
    ap.add_argument("--flower-w4-timeout", type=float, default=300,
                    help="stop Flower's W4 after this many seconds and report the rounds it finished")
    ap.add_argument("--w5-updates", type=int, default=1000)
    ap.add_argument("--w5-size", type=int, default=1_000_000)
    ap.add_argument("--w5-reducers", default="weighted_mean;median;krum(f=100)", type=lambda s: s.split(";"),
                    help="reducers separated by ';'")
    ap.add_argument("--out", type=Path, help="also write the report to this Markdown file")
    args = ap.parse_args()
    if args.skip_flower:
        args.contenders = [c for c in args.contenders if c != "flower"]
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown:
        ap.error(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    report = [f"Machine: {machine()}", "",
              f"Command: `{command}`; median of {args.runs} run(s), W4: {args.w4_runs}", ""]
    print("\n".join(report), flush=True)
    speed = [w for w in args.workloads if w != "W5"]
    sections = []
    if speed:
        sections.append(lambda: speed_table(argparse.Namespace(**{**vars(args), "workloads": speed})))
    if "W5" in args.workloads:
        sections.append(lambda: memory_table(args))
    for section in sections:
        lines = section()
        print("\n".join(lines) + "\n", flush=True)
        report += [*lines, ""]
        if args.out:  # written section by section: a later failure keeps what was measured
            args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
