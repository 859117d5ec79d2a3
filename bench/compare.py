"""Run the benches and compare each ratio with the committed results in bench/results/.

Every watched figure is a ratio measured within one run (claypot against a
bare gRPC call, against an fsync, against itself at another concurrency...),
so it means the same on a busier or a quieter machine, unlike a raw rate.
A ratio that got worse than its committed value by more than ``--threshold``
(15% by default) is a regression: it is listed, and the exit code is 1.

    python bench/compare.py                      # runs calls and large_data
    python bench/compare.py --bench calls --repeat 2
    python bench/compare.py --current calls=/tmp/calls.json   # compare a saved run

On a shared machine a ratio can move by itself; ``--repeat N`` runs each bench
N times and keeps, for each ratio, the best of the runs (a regression must
then show in every run). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# For each bench: how to run it, its results file, and the ratios watched, each
# with the direction that is better. A path is dotted keys; ``sizes[bytes=N]``
# picks the element of a list whose ``bytes`` is N.
BENCHES: dict[str, dict] = {
    "calls": {
        "argv": ["bench/bench_calls.py"],
        "results": "calls.json",
        "watch": {
            "ratios.readonly_call_over_echo_p50": "lower",
            "ratios.mutating_call_over_echo_plus_fdatasync_p50": "lower",
            "ratios.make_persistent_over_floor": "higher",
            "ratios.eight_changing_callers_over_one": "higher",
            "ratios.threads_8_over_echo": "higher",
            "ratios.processes_4_over_echo": "higher",
            "ratios.make_persistent_over_dataclay": "higher",
            "ratios.threads_8_over_dataclay": "higher",
            "ratios.readonly_call_cpu_over_echo": "lower",
            "ratios.changing_call_cpu_over_echo": "lower",
            "ratios.readonly_call_over_socket_echo_p50": "lower",
            "ratios.lane_over_grpc_readonly_p50": "higher",
        },
    },
    "large_data": {
        "argv": ["-m", "bench.bench_large_data"],
        "results": "large_data.json",
        "watch": {
            "values[bytes=65536].call_vs_bare_echo": "higher",
            "values[bytes=262144].call_vs_bare_echo": "higher",
            "values[bytes=1048576].call_vs_bare_echo": "higher",
            "values[bytes=4194304].call_vs_bare_echo": "higher",
            "sizes[bytes=67108864].stream_round_trip_vs_bare_landed": "higher",
            "sizes[bytes=1073741824].stream_round_trip_vs_bare_landed": "higher",
            "sizes[bytes=1048576].round_trip_vs_bare": "higher",
            "sizes[bytes=1048576].stream_round_trip_vs_bare": "higher",
            "sizes[bytes=67108864].round_trip_vs_bare": "higher",
            "sizes[bytes=67108864].stream_round_trip_vs_bare": "higher",
            "sizes[bytes=1073741824].round_trip_vs_bare": "higher",
            "sizes[bytes=1073741824].stream_round_trip_vs_bare": "higher",
        },
    },
    "durability": {
        "argv": ["bench/bench_durability.py"],
        "results": "durability.json",
        "watch": {
            "policies.sync.call_vs_none": "higher",
            "policies.sync.call_4threads_vs_none": "higher",
            "policies.sync.make_persistent_vs_none": "higher",
            "log_fsync.storage_write_over_bare_append_p50": "lower",
        },
    },
    "compat": {
        "argv": ["bench/bench_compat.py"],
        "results": "compat.json",
        "watch": {
            "ratios_p50.compat_call_over_native_call": "lower",
            "ratios_p50.get_by_alias_over_native_call": "lower",
            "ratios_p50.alias_add_delete_over_native_call": "lower",
        },
    },
}
DEFAULT = ["calls", "large_data"]

_STEP = re.compile(r"^(?P<key>[^\[\]]+)(?:\[(?P<field>[^=\]]+)=(?P<value>[^\]]+)\])?$")


def pick(doc, path: str):
    """The value at ``path`` in ``doc``, or None where the document lacks it."""
    node = doc
    for step in path.split("."):
        m = _STEP.match(step)
        if m is None:
            raise ValueError(f"bad path step {step!r} in {path!r}")
        if not isinstance(node, dict) or m["key"] not in node:
            return None
        node = node[m["key"]]
        if m["field"]:
            if not isinstance(node, list):
                return None
            node = next((x for x in node if str(x.get(m["field"])) == m["value"]), None)
            if node is None:
                return None
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def better(values: list[float], direction: str) -> float:
    return max(values) if direction == "higher" else min(values)


def compare(name: str, baseline: dict, runs: list[dict], threshold: float) -> list[dict]:
    """One row per watched ratio: baseline, current (best of ``runs``), change, verdict."""
    rows = []
    for path, direction in BENCHES[name]["watch"].items():
        base = pick(baseline, path)
        seen = [v for v in (pick(r, path) for r in runs) if v is not None]
        row: dict = {
            "bench": name,
            "ratio": path,
            "better": direction,
            "baseline": base,
            "current": better(seen, direction) if seen else None,
        }
        if base is None or not seen or base == 0:
            row["verdict"] = "not compared"  # absent on one side (e.g. no dataClay here)
        else:
            cur = row["current"]
            # Positive change: better; negative: worse, as a fraction of the baseline.
            change = (cur - base) / base if direction == "higher" else (base - cur) / base
            row["change"] = round(change, 3)
            row["verdict"] = "regression" if change < -threshold else "ok"
        rows.append(row)
    return rows


def run_bench(name: str, extra: list[str], timeout: float) -> dict:
    """Run one bench as its own process; its JSON output."""
    argv = [sys.executable, *BENCHES[name]["argv"], *extra]
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"bench {name} failed ({res.returncode}): {res.stderr[-3000:]}")
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--bench",
        action="append",
        choices=sorted(BENCHES),
        help=f"a bench to run (repeatable; default: {' '.join(DEFAULT)})",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per bench; the best counts")
    p.add_argument(
        "--threshold", type=float, default=0.15, help="worse than the committed ratio by more than this fraction fails"
    )
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="directory of the committed results")
    p.add_argument(
        "--current",
        action="append",
        default=[],
        metavar="BENCH=FILE",
        help="compare this saved JSON instead of running the bench",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per bench run")
    p.add_argument("--save", metavar="DIR", help="also write each run's JSON to DIR")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    saved: dict[str, list[dict]] = {}
    for spec in a.current:
        name, sep, path = spec.partition("=")
        if not sep or name not in BENCHES:
            p.error(f"--current wants BENCH=FILE with BENCH one of {sorted(BENCHES)}")
        with open(path) as f:
            saved.setdefault(name, []).append(json.load(f))
    names = a.bench or ([] if saved else DEFAULT)
    report: dict = {"threshold": a.threshold, "benches": {}, "regressions": []}
    for name in list(dict.fromkeys(names + list(saved))):
        runs = list(saved.get(name, []))
        if not runs:
            for i in range(a.repeat):
                runs.append(run_bench(name, [], a.timeout))
                if a.save:
                    os.makedirs(a.save, exist_ok=True)
                    with open(os.path.join(a.save, f"{name}-{i}.json"), "w") as f:
                        json.dump(runs[-1], f, indent=2)
        with open(os.path.join(a.results, BENCHES[name]["results"])) as f:
            baseline = json.load(f)
        rows = compare(name, baseline, runs, a.threshold)
        report["benches"][name] = {"runs": len(runs), "ratios": rows}
        report["regressions"] += [r for r in rows if r["verdict"] == "regression"]
    report["ok"] = not report["regressions"]
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
