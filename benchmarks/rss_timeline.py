"""Where does a script's resident memory grow? Runs a script as __main__ under a sampler thread that records the
process RSS every 2 ms and, at each rise or fall of --step MB, the main thread's innermost frames.

    python benchmarks/rss_timeline.py sft.py --model tiny/policy --dataset ... --max-steps 3
    python benchmarks/rss_timeline.py --step 30 reward.py ...

Prints the timeline (seconds, MB, frames) and the peak (VmHWM) to stderr at exit. How sft.py's loss memory was
found: the step's growth sat in the head's logits, log-softmax and their gradients (see README, Performance).
"""

import os
import runpy
import sys
import threading
import time
import traceback


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def sample(samples: list, main_id: int, step_mb: int):
    last = 0
    while True:
        rss = rss_mb()
        if abs(rss - last) >= step_mb:
            frame = sys._current_frames().get(main_id)
            stack = traceback.extract_stack(frame)[-8:] if frame else []
            where = " <- ".join(f"{os.path.basename(s.filename)}:{s.lineno}:{s.name}" for s in reversed(stack))
            samples.append((time.perf_counter(), rss, where[:300]))
            last = rss
        time.sleep(0.002)


def main():
    argv = sys.argv[1:]
    step_mb = 15
    if argv[:1] == ["--step"]:
        step_mb, argv = int(argv[1]), argv[2:]
    if not argv:
        raise SystemExit(__doc__)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # the script's own imports (utils/)
    samples = []
    threading.Thread(target=sample, args=(samples, threading.get_ident(), step_mb), daemon=True).start()
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        start = samples[0][0] if samples else 0.0
        for t, rss, where in samples:
            print(f"{t - start:7.2f}s {rss:6d} MB  {where}", file=sys.stderr)
        with open("/proc/self/status") as f:
            print(next(line.strip() for line in f if line.startswith("VmHWM")), file=sys.stderr)


if __name__ == "__main__":
    main()
