"""Run learning tests over many seeds before trusting their thresholds (the brief: at least 10 seeds, all must pass).

    python benchmarks/seed_sweep.py test_ppo_learns_a_dense_reward --seeds 1-10 [--jobs 2]

Each run is `pytest -k TEST` with LEARNING_SEED=seed; the test records what it measured (tests/conftest.py,
record_learning). Prints one line per seed and the lowest margin over the threshold; writes the runs to
runs/seed_sweep/TEST.jsonl.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seeds_from(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def run_one(test: str, seed: int, log: Path) -> dict:
    env = {**os.environ, "LEARNING_SEED": str(seed), "LEARNING_LOG": str(log), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", test, "tests"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    mine = [r for r in rows if r["seed"] == seed]
    return {"seed": seed, "passed": proc.returncode == 0, "seconds": round(time.perf_counter() - start, 1),
            "measured": mine[-1] if mine else None, "tail": proc.stdout[-300:] if proc.returncode else ""}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("test")
    parser.add_argument("--seeds", default="1-10")
    parser.add_argument("--jobs", type=int, default=1)
    a = parser.parse_args()
    out = ROOT / "runs" / "seed_sweep"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with ThreadPoolExecutor(a.jobs) as pool:
        for r in pool.map(lambda s: run_one(a.test, s, out / f"{a.test}.{s}.log"), seeds_from(a.seeds)):
            m = r["measured"]
            print(f"seed {r['seed']:>3}: {'pass' if r['passed'] else 'FAIL'}  "
                  + (f"value {m['value']:.4f} threshold {m['threshold']:.4f}" if m else "no measurement")
                  + f"  ({r['seconds']} s)" + (f"\n{r['tail']}" if r["tail"] else ""), flush=True)
            results.append(r)
    with open(out / f"{a.test}.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    measured = [r["measured"] for r in results if r["measured"]]
    if measured:
        worst = min(measured, key=lambda m: m["value"] - m["threshold"])
        print(f"{a.test}: {sum(r['passed'] for r in results)}/{len(results)} passed; lowest value {worst['value']:.4f} "
              f"(seed {worst['seed']}) vs threshold {worst['threshold']:.4f}")


if __name__ == "__main__":
    main()
