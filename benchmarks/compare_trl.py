"""Side by side with Hugging Face TRL: our scripts and TRL's trainers on the same tiny models, data and
hyperparameters, alternating fresh processes (ours, TRL, ours, TRL, ...) so the machine's drift cancels.

    python benchmarks/compare_trl.py                           # PPO: ppo.py vs trl.experimental.ppo.PPOTrainer
    python benchmarks/compare_trl.py --runs 5 --iterations 6   # longer, steadier
    python benchmarks/compare_trl.py --reward sentiment --iterations 16 --runs 1   # does it learn as well?
    python benchmarks/compare_trl.py --task profile            # cProfile of ppo.py on the same configuration
    python benchmarks/compare_trl.py --task sft                # sft.py vs trl.SFTTrainer (tokens/s)
    python benchmarks/compare_trl.py --task reward             # reward.py vs trl.RewardTrainer (pairs/s)
    python benchmarks/compare_trl.py --task reward --min-text-tokens 16   # texts of 16-124 tokens, mixed in a batch
    python benchmarks/compare_trl.py --task dpo --trl-python /tmp/trl116/bin/python   # dpo.py vs trl.DPOTrainer
    python benchmarks/compare_trl.py --task grpo --trl-python /tmp/trl116/bin/python --steps 30 --learning-rate 3e-4
                                                                # grpo.py vs trl.GRPOTrainer (TRL 1.16)

Prints, per metric, min/median/max over the runs for each side and the ratio of medians ours/TRL (> 1 is
better for throughput, < 1 is better for memory). Each run is a fresh process; its peak RSS comes from the
kernel's rusage of that child (os.wait4 in a small launcher process, see LAUNCHER), so it includes the
Python/torch/transformers import footprint of both sides (TRL also imports accelerate and pandas). The first
iteration of each run is a warm-up and is not timed.

What is held equal (PPO): the policy (tiny/policy, random 2-layer GPT-2), its tokenizer (pad = EOS), the
prompts (the same token ids: ppo.py's own `build_prompts`, 2-8 tokens, written to a file for TRL), the reward
model (a GPT2ForSequenceClassification with 1 label built from tiny/policy, pad id set; ppo.py gets the same
folder via --reward-model and reads logits[:, 0]), batch, mini-batch, micro-batch, PPO epochs, response
length, temperature, learning rate (constant, Adam, no weight decay), fixed KL coefficient (--no-adaptive-kl;
k1 estimator), clip ranges, vf_coef, gamma, lambda, no stop token and no missing-EOS penalty, fp32, no
gradient checkpointing (TRL's default is on: --trl-gradient-checkpointing turns it on), no gradient clipping
(TRL's PPOTrainer never clips, so ppo.py gets --max-grad-norm None).
Design differences that stay (they are part of what is compared): TRL's value function is a separate model
(a second GPT-2 trunk, initialised from the reward model as TRL's examples do) while ppo.py's value head sits
on the policy trunk (one forward gives logits and values); TRL takes rollout log-probs from generate's scores
while ppo.py recomputes them with one forward; TRL feeds token ids to the reward model while ppo.py decodes
and re-tokenizes (it supports reward models with another tokenizer); TRL's optimizer is transformers'
default (fused AdamW), ours torch's Adam. TRL 1.12 steps its optimizer once per batch per PPO epoch whatever
num_mini_batches says (accelerate's accumulation spans the whole batch; huggingface/trl#5645; counted by
trl_runner.py), so mini-batch = batch here, with micro-batches via gradient accumulation on both sides.
Both sides run with --threads (default 1) intra-op threads: on a shared 2-core machine two threads per
process made both sides many times slower from contention in our first runs. ppo.py is bit-reproducible run to
run here; TRL is not past a few iterations, so its score varies a little between runs. SFT and reward: see
compare_supervised.

The TRL side runs in a benchmark-only venv that sees our venv's torch, transformers and datasets through a .pth
file (never let pip touch torch==2.13.0): the recipe is in benchmarks/requirements-trl.txt (TRL 1.16 for
--task grpo; a TRL 1.12 venv for --task ppo, as 1.16 no longer ships PPOTrainer, and for the recorded sft/reward
figures). Our scripts never import TRL.
CPU timings on a shared machine are noisy: compare ratios from one session, never numbers across sessions.
"""

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TRL_RUNNER = Path(__file__).resolve().parent / "trl_runner.py"


# ---------------------------------------------------------------------------------------------------------
# Fresh child processes with their own peak RSS
# ---------------------------------------------------------------------------------------------------------
# A small launcher between us and each run. On Linux a process's peak RSS (ru_maxrss) starts at the RSS of the
# process it was forked from (the kernel carries the old memory's high-water mark across exec), so a child of
# this script, which holds torch and maybe a trained reward model, would inherit our few hundred MiB. The
# launcher is a fresh `python -S` (~10 MiB): it forks the run, waits for it with os.wait4 (that child's own
# rusage) and writes it to a file.
LAUNCHER = """
import json, os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"maxrss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime, "launcher_maxrss_kb":
               __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(cmd, log_path: Path, env: dict) -> dict:
    """Run `cmd` to completion in a fresh process (through LAUNCHER) with stdout+stderr in `log_path`; return
    its wall time, peak RSS (MiB, that process alone) and CPU time."""
    usage_path = Path(str(log_path) + ".rusage.json")
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(usage_path), *map(str, cmd)], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(open(log_path).readlines()[-30:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n--- {log_path} ---\n{tail}")
    usage = json.loads(usage_path.read_text())
    return {"wall_s": wall, "peak_rss_mb": usage["maxrss_kb"] / 1024, "cpu_s": usage["cpu_s"]}


def child_env(threads: int) -> dict:
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads > 0:  # same intra-op thread count on both sides (torch reads OMP_NUM_THREADS at start-up)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def summarize(rows, keys, title):
    """rows: list of {"side": "ours"|"trl", key: value}. Prints min/median/max per side and the ratio of the
    medians ours/TRL; for scores (which can be negative) the difference ours - TRL instead, marked with a sign."""
    print(f"\n{title}")
    print(f"{'metric':<26}{'ours median':>12}{'[min, max]':>22}{'TRL median':>12}{'[min, max]':>22}{'ours/TRL':>10}")
    table = {}
    for key, fmt in keys:
        cells = {}
        for side in ("ours", "trl"):
            values = [r[key] for r in rows if r["side"] == side and r.get(key) is not None]
            cells[side] = (statistics.median(values), min(values), max(values)) if values else None
        if not cells["ours"] or not cells["trl"]:
            continue
        if key.startswith("score"):
            ratio = cells["ours"][0] - cells["trl"][0]
            table[key] = {"ours": cells["ours"], "trl": cells["trl"], "difference": ratio}
        else:
            ratio = cells["ours"][0] / cells["trl"][0] if cells["trl"][0] else float("nan")
            table[key] = {"ours": cells["ours"], "trl": cells["trl"], "ratio": ratio}
        f = lambda v: format(v, fmt)  # noqa: E731
        span = lambda c: f"[{f(c[1])}, {f(c[2])}]"  # noqa: E731
        print(f"{key:<26}{f(cells['ours'][0]):>12}{span(cells['ours']):>22}{f(cells['trl'][0]):>12}"
              f"{span(cells['trl']):>22}{format(ratio, '+.4f' if key.startswith('score') else '.2f'):>10}")
    return table


# ---------------------------------------------------------------------------------------------------------
# Shared assets: one tokenizer, one reward/value model, the same prompt token ids
# ---------------------------------------------------------------------------------------------------------
def build_reward_model(policy_dir: Path, out: Path, kind: str, imdb: Path, seed: int = 0) -> Path:
    """A 1-label GPT2ForSequenceClassification on the policy's trunk and tokenizer (pad = EOS, pad id in the
    config, as TRL needs). kind='random': the policy's random trunk + a random score head (a weak signal);
    kind='sentiment': that model trained briefly on IMDB labels, so higher scores mean more positive text."""
    if (out / "config.json").exists():
        return out
    import torch
    import transformers
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    transformers.utils.logging.set_verbosity_error()  # the score head is new by design: no load report
    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.pad_token = tok.eos_token
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2ForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        model.config.pad_token_id = tok.eos_token_id
        if kind == "sentiment":
            train_sentiment(model, tok, imdb)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train_sentiment(model, tok, imdb: Path, steps: int = 300, batch: int = 64, seq: int = 32, lr: float = 2e-3):
    """Logistic regression on the first `seq` tokens of IMDB reviews (label 1 = positive); prints accuracy."""
    import torch

    from utils.assets import read_jsonl

    def batches(rows):
        enc = tok([r["text"] for r in rows], truncation=True, max_length=seq, padding=True, return_tensors="pt")
        return enc, torch.tensor([float(r["label"]) for r in rows])

    train, test = read_jsonl(imdb / "train.jsonl"), read_jsonl(imdb / "test.jsonl")[:1000]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    print(f"training the sentiment reward model ({steps} steps)...", flush=True)
    for step in range(steps):
        idx = torch.randint(len(train), (batch,), generator=gen).tolist()
        enc, y = batches([train[i] for i in idx])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**enc).logits[:, 0], y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        enc, y = batches(test)
        acc = ((model(**enc).logits[:, 0] > 0).float() == y).float().mean().item()
    print(f"sentiment reward model: {steps} steps in {time.perf_counter() - start:.0f} s, held-out accuracy on "
          f"the first {seq} tokens of 1000 test reviews: {acc:.3f}")


def write_prompt_ids(policy_dir: Path, dataset: Path, out: Path, seed: int) -> Path:
    """The exact prompts ppo.py builds (first 2-8 tokens, seeded), as token ids for TRL's dataset."""
    from transformers import AutoTokenizer

    import ppo
    from utils.hub import load_dataset

    tok = AutoTokenizer.from_pretrained(policy_dir)
    prompts = ppo.build_prompts(load_dataset(str(dataset), "train"), tok, "text", 2, 8, seed)
    with open(out, "w") as f:
        for p in prompts:
            f.write(json.dumps({"input_ids": p.tolist()}) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------------
def ppo_command(a, reward_dir: Path, out: Path, profile: Path = None):
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    return cmd + [
        str(ROOT / "ppo.py"), "--model", str(a.policy), "--reward-model", str(reward_dir),
        "--dataset", str(a.prompts), "--output-dir", str(out), "--device", a.device, "--seed", str(a.seed),
        "--batch-size", str(a.batch_size), "--mini-batch-size", str(a.mini_batch_size),
        "--gradient-accumulation-steps", str(a.gradient_accumulation_steps), "--ppo-epochs", str(a.ppo_epochs),
        "--total-episodes", str(a.batch_size * a.iterations), "--response-length", str(a.response_length),
        "--temperature", str(a.temperature), "--learning-rate", str(a.learning_rate), "--no-anneal-lr",
        "--kl-coef", str(a.kl_coef), "--no-adaptive-kl", "--kl-estimator", "kl",
        "--cliprange", "0.2", "--cliprange-value", "0.2", "--vf-coef", "0.1", "--gamma", "1.0", "--lam", "0.95",
        "--stop-token", "none", "--missing-eos-penalty", "None", "--max-grad-norm", "None",
        "--score-scaling", "none", "--save-every", "1000000", *a.extra.split(),
    ]


def ppo_trl_config(a, reward_dir: Path, prompt_ids: Path, out: Path) -> dict:
    return dict(task="ppo", policy=str(a.policy), reward_model=str(reward_dir), prompts_ids=str(prompt_ids),
                output_dir=str(out), device=a.device, seed=a.seed, threads=a.threads,
                batch_size=a.batch_size, mini_batch_size=a.mini_batch_size,
                gradient_accumulation_steps=a.gradient_accumulation_steps, ppo_epochs=a.ppo_epochs,
                iterations=a.iterations, response_length=a.response_length, temperature=a.temperature,
                learning_rate=a.learning_rate, kl_coef=a.kl_coef, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                gamma=1.0, lam=0.95, trl_gradient_checkpointing=a.trl_gradient_checkpointing)


def ppo_run_stats(side: str, iteration_s, gen_s, gen_tokens, scores, child, a, iteration_cpu_s=None) -> dict:
    timed = slice(1, None) if len(iteration_s) > 1 else slice(None)  # drop the warm-up iteration
    window = max(1, len(scores) // 2) if a.score_window == 0 else a.score_window
    return {
        "side": side, "iterations/s": 1 / statistics.mean(iteration_s[timed]),
        # CPU seconds per iteration resist a busy machine better than wall time (TRL's runner logs them; ppo.py
        # does if its metrics carry perf/iteration_cpu_s)
        "cpu s/iteration": statistics.mean(iteration_cpu_s[timed]) if iteration_cpu_s else None,
        "episodes/s": a.batch_size / statistics.mean(iteration_s[timed]),
        "gen tokens/s": sum(gen_tokens[timed]) / sum(gen_s[timed]),
        "generate share": sum(gen_s[timed]) / sum(iteration_s[timed]),
        "peak RSS MiB": child["peak_rss_mb"], "process wall s": child["wall_s"], "process cpu s": child["cpu_s"],
        f"score (last {window})": statistics.mean(scores[-window:]), "score (first)": scores[0],
    }


def compare_ppo(a, work: Path):
    if a.mini_batch_size != a.batch_size:
        raise SystemExit("TRL 1.12's PPOTrainer steps its optimizer once per batch (accelerate's gradient "
                         "accumulation spans the whole batch), so --mini-batch-size must equal --batch-size; "
                         "use --gradient-accumulation-steps for micro-batches")
    reward_dir = build_reward_model(a.policy, work / f"rm-{a.reward}", a.reward, a.imdb)
    prompt_ids = write_prompt_ids(a.policy, a.prompts, work / "prompt_ids.jsonl", a.seed)
    env = child_env(a.threads)
    rows = []
    print(f"PPO, {a.iterations} iterations ({a.iterations - 1} timed) x {a.runs} runs each, alternating; "
          f"batch {a.batch_size}, micro-batch {a.mini_batch_size // a.gradient_accumulation_steps}, "
          f"{a.ppo_epochs} epochs, {a.response_length} tokens, lr {a.learning_rate}, beta {a.kl_coef} fixed, "
          f"T {a.temperature}, reward '{a.reward}', threads {a.threads or 'default'}, device {a.device}")
    for r in range(a.runs):
        order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")  # ABBA: neither side always goes first
        for side in order:
            out = work / f"{side}-{r}"
            if side == "ours":
                child = run_child(ppo_command(a, reward_dir, out), work / f"{side}-{r}.log", env)
                metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
                tokens = [a.batch_size * m["charts/response_length"] for m in metrics]
                gen_s = [t / m["perf/rollout_tokens_per_s"] for t, m in zip(tokens, metrics)]
                cpu = [m["perf/iteration_cpu_s"] for m in metrics] if "perf/iteration_cpu_s" in metrics[0] else None
                row = ppo_run_stats(side, [m["perf/iteration_s"] for m in metrics], gen_s, tokens,
                                    [m["objective/scores"] for m in metrics], child, a, cpu)
            else:
                cfg_path, result_path = work / f"trl-{r}.json", work / f"trl-{r}.result.json"
                cfg_path.write_text(json.dumps(ppo_trl_config(a, reward_dir, prompt_ids, out)))
                child = run_child([a.trl_python, str(TRL_RUNNER), str(cfg_path), str(result_path)],
                                  work / f"{side}-{r}.log", env)
                res = json.loads(result_path.read_text())
                expected = a.ppo_epochs * a.iterations
                if res["optimizer_steps"] != expected:
                    print(f"warning: TRL took {res['optimizer_steps']} optimizer steps, ppo.py takes {expected}")
                row = ppo_run_stats(side, res["iteration_s"], res["generate_s"], res["generated_tokens"],
                                    res["scores"], child, a, res.get("iteration_cpu_s"))
                row["breakdown"] = res["breakdown_s"]
            rows.append(row)
            last = next(v for k, v in row.items() if k.startswith("score (last"))
            print(f"  run {r} {side:<4}: {row['iterations/s']:.3f} it/s, {row['gen tokens/s']:.0f} gen tok/s, "
                  f"peak RSS {row['peak RSS MiB']:.0f} MiB, wall {row['process wall s']:.1f} s, "
                  f"score first {row['score (first)']:+.4f} last {last:+.4f}", flush=True)
    score_key = next(k for k in rows[0] if k.startswith("score (last"))
    table = summarize(rows, [("iterations/s", ".3f"), ("episodes/s", ".1f"), ("cpu s/iteration", ".3f"),
                             ("gen tokens/s", ".0f"),
                             ("generate share", ".2f"), ("peak RSS MiB", ".0f"), ("process wall s", ".1f"),
                             ("process cpu s", ".1f"), ("score (first)", "+.4f"), (score_key, "+.4f")],
                      "PPO: ppo.py vs trl.experimental.ppo.PPOTrainer (ratio = ours / TRL)")
    trl_breakdown = [r["breakdown"] for r in rows if r["side"] == "trl"]
    if trl_breakdown:
        print("\nTRL time per phase (all iterations, mean over runs, s):",
              ", ".join(f"{k} {statistics.mean(b.get(k, 0) for b in trl_breakdown):.2f}" for k in trl_breakdown[0]))
    print("scores come from a", "briefly trained sentiment reward model" if a.reward == "sentiment" else
          "random reward model on a random policy: a weak signal (use --reward sentiment for a meaningful one)")
    return {"config": vars(a) | {"policy": str(a.policy), "prompts": str(a.prompts), "imdb": str(a.imdb)},
            "rows": rows, "table": table}


def profile_ppo(a, work: Path, top: int = 30):
    """Profile ppo.py on the comparison's configuration, in a fresh process (`--profile-child`): wall time per
    phase from timers around ppo.py's own functions (nested phases are listed under their parent), then
    cProfile's top functions by own time over the training run only (imports are done before it starts)."""
    reward_dir = build_reward_model(a.policy, work / f"rm-{a.reward}", a.reward, a.imdb)
    argv = ppo_command(a, reward_dir, work / "profile-run")[2:]  # ppo.py's flags
    prof, phases = work / "ppo.prof", work / "phases.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-child", str(prof), str(phases), *argv]
    child = run_child(cmd, work / "profile.log", child_env(a.threads))
    res = json.loads(phases.read_text())
    iters = [m["perf/iteration_s"] for m in (json.loads(row) for row in open(work / "profile-run" / "metrics.jsonl"))]
    print(f"ppo.py, {a.iterations} iterations, batch {a.batch_size}, micro-batch "
          f"{a.mini_batch_size // a.gradient_accumulation_steps}, {a.ppo_epochs} epochs, {a.response_length} tokens, "
          f"threads {a.threads or 'default'}; process wall {child['wall_s']:.1f} s, "
          f"peak RSS {child['peak_rss_mb']:.0f} MiB")
    print(f"iteration wall times (s): {', '.join(f'{t:.2f}' for t in iters)}; timers below cover all iterations "
          f"(the first is a warm-up); cProfile was on, which inflates Python-heavy phases")
    total = sum(iters)
    for label, (sec, calls) in res["phases"].items():
        print(f"  {sec:8.3f} s {100 * sec / total:5.1f}%  {calls:5d} calls  {label}")
    import pstats

    print(f"\ntop {top} functions by own time (training run only):")
    pstats.Stats(str(prof)).sort_stats("tottime").print_stats(top)
    print(f"profile kept in {prof} (python -m pstats {prof}; snakeviz {prof})")
    return {"phases": res["phases"], "iteration_s": iters}


def profile_child(prof_path: str, phases_path: str, argv: list):
    """Runs inside the child: ppo.main under cProfile with timers around its phases."""
    import cProfile
    from collections import defaultdict

    import torch
    import transformers
    import tyro
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    import ppo
    from utils import rewards

    importlib.import_module("transformers.models.gpt2.modeling_gpt2")  # lazy imports happen before profiling
    seconds, calls = defaultdict(float), defaultdict(int)

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            key = label(*args, **kwargs) if callable(label) else label
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - start
                calls[key] += 1
        return wrapper

    grad = lambda *a, **k: torch.is_grad_enabled()  # noqa: E731
    ppo.generate = timed("rollout: generate (KV cache, sampling)", ppo.generate)
    rewards.score_with_model = timed("rollout: reward model (re-tokenize + forward)", rewards.score_with_model)
    ppo.ppo_step = timed("ppo_step (all below)", ppo.ppo_step)
    ppo.PolicyAndValue.forward = timed(
        lambda *a, **k: "  policy+value forward, PPO epochs" if torch.is_grad_enabled() else
        "  policy+value forward, rollout (no grad)", ppo.PolicyAndValue.forward)
    lm_forward = ppo.lm_forward
    ppo.lm_forward = timed(lambda lm, *a, hidden=False, **k: "    (lm_forward inside the policy forward)" if hidden
                           else "  reference forward (no grad)", lm_forward)
    ppo.logprobs_of = timed(lambda *a, **k: "  logprobs_of" + (" (train)" if grad() else " (rollout)"), ppo.logprobs_of)
    ppo.entropy_of = timed("  entropy_of (rollout)", ppo.entropy_of)
    ppo.gae = timed("  gae (python loop over tokens)", ppo.gae)
    torch.Tensor.backward = timed("  backward", torch.Tensor.backward)
    torch.optim.Adam.step = timed("  optimizer step", torch.optim.Adam.step)
    PreTrainedTokenizerBase.batch_decode = timed("rollout: tokenizer.batch_decode",
                                                 PreTrainedTokenizerBase.batch_decode)
    ppo.save_checkpoint = timed("save_checkpoint (final)", ppo.save_checkpoint)

    args = tyro.cli(ppo.Args, args=argv)
    transformers.utils.logging.disable_progress_bar()
    profiler = cProfile.Profile()
    profiler.enable()
    ppo.main(args)
    profiler.disable()
    profiler.dump_stats(prof_path)
    top_level = sorted((k for k in seconds if not k.startswith(" ")), key=lambda k: -seconds[k])
    nested = sorted((k for k in seconds if k.startswith(" ")), key=lambda k: -seconds[k])
    order = [n for k in top_level for n in ([k] + nested if k.startswith("ppo_step") else [k])]
    ordered = {k: (seconds[k], calls[k]) for k in order}
    Path(phases_path).write_text(json.dumps({"phases": ordered}))


# ---------------------------------------------------------------------------------------------------------
# SFT and reward modelling: sft.py / reward.py vs TRL's SFTTrainer / RewardTrainer
# ---------------------------------------------------------------------------------------------------------
def short_texts(tok, texts, max_tokens: int, n: int):
    """The first n texts that have at least `max_tokens` tokens, cut to exactly that many (as text). Every text
    then has the same length (to within a token of re-tokenization), so steps hold equal token counts on both
    sides, and neither side truncates nor drops anything (TRL's RewardTrainer drops pairs over max_length while
    reward.py truncates them; both SFT sides and TRL's RewardTrainer append an EOS)."""
    ids = tok(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [tok.decode(x) for x in ids if len(x) == max_tokens][:n]


def supervised_stats(side, step_s, tokens, batch, child, unit) -> dict:
    """Per-step rates, first step (warm-up) dropped. tokens: real (non-pad) tokens of each step or None."""
    timed = slice(1, None) if len(step_s) > 1 else slice(None)
    step_mean = statistics.mean(step_s[timed])
    row = {"side": side, "steps/s": 1 / step_mean, f"{unit}/s": batch / step_mean,
           "peak RSS MiB": child["peak_rss_mb"], "process wall s": child["wall_s"], "process cpu s": child["cpu_s"]}
    if tokens is not None:
        row["tokens/s"] = sum(tokens[timed]) / sum(step_s[timed])
    return row


def compare_supervised(a, work: Path, task: str):
    """sft.py vs TRL's SFTTrainer, reward.py vs TRL's RewardTrainer, or dpo.py vs TRL's DPOTrainer: same model
    (tiny/policy unless --policy; a fresh 1-output head for reward), the same texts (IMDB reviews cut to
    --max-seq-length - 4 tokens; pairs: a positive review chosen over a negative one; for DPO after the prompt
    "Review:"), batch, steps, constant learning rate, AdamW without weight decay, gradient clipping at 1.0, fp32, no
    packing, no gradient checkpointing, no evaluation. Dropout as the model's config for SFT; off for reward and DPO
    (both sides' defaults; --extra --no-disable-dropout turns it on for reward on both sides).
    DPO: sigmoid loss, beta 0.1, a live reference copy on both sides."""
    script = ROOT / f"{task}.py"
    if not script.exists():
        raise SystemExit(f"--task {task}: {script.name} is not in the repository yet")
    from transformers import AutoTokenizer

    from utils.assets import read_jsonl

    tok = AutoTokenizer.from_pretrained(a.policy)
    rows_in = read_jsonl(a.imdb / "train.jsonl")
    data = work / f"{task}_data.jsonl"
    pool, cut = rows_in[: 4 * a.examples], a.max_seq_length - 4
    if task == "sft":
        records = [{"text": t} for t in short_texts(tok, [r["text"] for r in pool], cut, a.examples)]
    else:
        pos = short_texts(tok, [r["text"] for r in pool if r["label"] == 1], cut, a.examples)
        neg = short_texts(tok, [r["text"] for r in pool if r["label"] == 0], cut, a.examples)
        if task == "reward" and a.min_text_tokens:  # each text cut to its own length: batches hold mixed lengths
            rng = random.Random(a.seed)
            cut_at = lambda t: tok(t, add_special_tokens=False)["input_ids"][: rng.randint(a.min_text_tokens, cut)]  # noqa: E731
            pos, neg = ([tok.decode(cut_at(t)) for t in texts] for texts in (pos, neg))
        records = [{"chosen": c, "rejected": r} for c, r in zip(pos, neg)]
        if task == "reward" and a.prompt_tokens:  # both texts after one shared prompt (another review's start)
            cut = a.max_seq_length - 4 - a.prompt_tokens
            pos = short_texts(tok, [r["text"] for r in pool if r["label"] == 1], cut, a.examples)
            neg = short_texts(tok, [r["text"] for r in pool if r["label"] == 0], cut, a.examples)
            prompts = short_texts(tok, [r["text"] for r in rows_in[4 * a.examples :]], a.prompt_tokens, a.examples)
            records = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in zip(prompts, pos, neg)]
        if task == "dpo":  # a short prompt (masked from the loss on both sides); the reviews are the completions
            records = [{"prompt": "Review:", "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
                       for r in records]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for rec in records for t in rec.values()]
    mean_len = statistics.mean(lengths)
    if task == "dpo":  # the prompt is not a text of its own
        lengths = [len(tok(rec[k], add_special_tokens=False)["input_ids"]) for rec in records
                   for k in ("chosen", "rejected")]
        mean_len = statistics.mean(lengths)
    if task == "reward" and a.prompt_tokens:  # a reward model reads prompt + response as one text
        lengths = [len(tok(rec["prompt"] + rec[k], add_special_tokens=False)["input_ids"]) for rec in records
                   for k in ("chosen", "rejected")]
        mean_len = statistics.mean(lengths)
    print(f"{len(records)} {'texts' if task == 'sft' else 'pairs'}; tokens per text: mean {mean_len:.1f}, "
          f"min {min(lengths)}, max {max(lengths)}")
    with open(data, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    env, rows, unit = child_env(a.threads), [], "examples" if task == "sft" else "pairs"
    print(f"{task}: {a.steps} steps ({a.steps - 1} timed) x {a.runs} runs each, alternating; batch {a.batch_size} "
          f"{unit}, max {a.max_seq_length} tokens, lr {a.learning_rate} constant, threads {a.threads or 'default'}")
    for r in range(a.runs):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            out = work / f"{task}-{side}-{r}"
            if side == "ours":
                length = ["--max-length", str(a.max_seq_length)] if task == "dpo" else \
                    ["--max-seq-length", str(a.max_seq_length), "--eval-fraction", "0"]
                cmd = [sys.executable, str(script), "--model", str(a.policy), "--dataset", str(data),
                       "--output-dir", str(out), "--device", a.device, "--seed", str(a.seed),
                       "--batch-size", str(a.batch_size), "--max-steps", str(a.steps), *length,
                       "--learning-rate", str(a.learning_rate), "--lr-scheduler", "constant", "--weight-decay", "0.0",
                       "--max-grad-norm", "1.0", "--save-every", "1000000", *a.extra.split()]
                child = run_child(cmd, work / f"{task}-{side}-{r}.log", env)
                metrics = [m for m in (json.loads(line) for line in open(out / "metrics.jsonl")) if m["step"] > 0]
                if task == "sft":
                    # sft.py logs real tokens/s per step, not the step's tokens; every text has the same length
                    # (+ EOS) to within the spread printed above, so a step holds batch x that
                    tokens = [a.batch_size * (mean_len + 1)] * len(metrics)
                    step_s = [t / m["perf/tokens_per_s"] for t, m in zip(tokens, metrics)]
                else:  # a step scores batch x 2 texts of the same length (reward.py adds no EOS, dpo.py does)
                    step_s = [a.batch_size / m["perf/pairs_per_s"] for m in metrics]
                    tokens = [2 * a.batch_size * (mean_len + (task == "dpo"))] * len(metrics)
            else:
                cfg = dict(task=task, policy=str(a.policy), dataset=str(data), output_dir=str(out), device=a.device,
                           seed=a.seed, threads=a.threads, batch_size=a.batch_size, steps=a.steps,
                           max_seq_length=a.max_seq_length, learning_rate=a.learning_rate, max_grad_norm=1.0,
                           max_examples=len(records), packing=False, beta=0.1,
                           disable_dropout="--no-disable-dropout" not in a.extra.split())  # reward: as ours
                cfg_path, result_path = work / f"{task}-trl-{r}.json", work / f"{task}-trl-{r}.result.json"
                cfg_path.write_text(json.dumps(cfg))
                child = run_child([a.trl_python, str(TRL_RUNNER), str(cfg_path), str(result_path)],
                                  work / f"{task}-{side}-{r}.log", env)
                res = json.loads(result_path.read_text())
                step_s = res["iteration_s"]
                tokens = res["tokens"][: len(step_s)]
            row = supervised_stats(side, step_s, tokens, a.batch_size, child, unit)
            rows.append(row)
            print(f"  run {r} {side:<4}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "side"),
                  flush=True)
    keys = [("steps/s", ".2f"), (f"{unit}/s", ".1f"), ("tokens/s", ".0f")]
    keys += [("peak RSS MiB", ".0f"), ("process wall s", ".1f"), ("process cpu s", ".1f")]
    trainer = {"sft": "SFTTrainer", "reward": "RewardTrainer", "dpo": "DPOTrainer"}[task]
    table = summarize(rows, keys, f"{task}.py vs trl.{trainer} (ratio = ours / TRL)")
    return {"config": {k: str(v) for k, v in vars(a).items()}, "rows": rows, "table": table}


def compare_sft(a, work: Path):
    return compare_supervised(a, work, "sft")


def compare_reward(a, work: Path):
    return compare_supervised(a, work, "reward")


def compare_dpo(a, work: Path):
    return compare_supervised(a, work, "dpo")


def arithmetic_policy(a, work: Path) -> Path:
    """The arithmetic task (utils/arithmetic.py, seed --seed) and a policy that sft.py trained on it: a modest
    accuracy that RL can raise. Built once into the work folder (or taken from --grpo-task: a folder with sft/,
    rl_train.jsonl and test.jsonl)."""
    if a.grpo_task:
        return Path(a.grpo_task)
    from utils import arithmetic

    n_layer, n_embd, n_head = (int(x) for x in a.grpo_shape.split(","))
    task = arithmetic.build(work / "arith", a.seed, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    run_child([sys.executable, str(ROOT / "sft.py"), "--model", task / "init", "--dataset", task / "sft_train.jsonl",
               "--output-dir", task / "sft", "--max-steps", a.sft_steps, "--batch-size", 64, "--learning-rate", "5e-4",
               "--lr-scheduler", "constant", "--eval-fraction", "0", "--save-every", 1000000, "--seed", a.seed,
               "--overwrite"],
              work / "arith-sft.log", child_env(a.threads))
    return task


def greedy_accuracy(model_dir: Path, problems: list) -> float:
    """Held-out exact-match accuracy of greedy completions, the same function for both sides' final models."""
    from utils.arithmetic import evaluate

    return evaluate(model_dir, problems)["accuracy"]


def compare_grpo(a, work: Path):
    """grpo.py vs TRL's GRPOTrainer: the same policy (a tiny character-level GPT-2 that sft.py trained on
    utils/arithmetic.py's sums), the same problems (their order is each side's own), G, prompts per step, completion
    length, temperature 1 from the full distribution, loss dapo, group std scaling, no KL (beta 0: neither loads
    a reference), mu 1, constant learning rate, AdamW without weight decay, gradient clipping at 1, fp32, one
    optimizer step per generation batch with --gradient-accumulation-steps micro-batches. The reward is the same
    accuracy check. Measured: completions/s (first step a warm-up), the process's peak RSS, and the held-out greedy
    accuracy of each side's final model after the same number of completions (the same evaluation code)."""
    from utils.assets import read_jsonl

    task = arithmetic_policy(a, work)
    test = read_jsonl(task / "test.jsonl")[: a.eval_examples]
    start_accuracy = greedy_accuracy(task / "sft", test)
    env, rows = child_env(a.threads), []
    completions = a.prompts_per_step * a.num_generations
    print(f"grpo: {a.steps} steps ({a.steps - 1} timed) x {completions} completions ({a.prompts_per_step} prompts x "
          f"G {a.num_generations}, <= {a.max_completion_length} tokens) x {a.runs} runs each, alternating; lr "
          f"{a.learning_rate}; held-out greedy accuracy before: {start_accuracy:.3f} on {len(test)} problems")
    for r in range(a.runs):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            out = work / f"grpo-{side}-{r}"
            if side == "ours":
                cmd = [sys.executable, str(ROOT / "grpo.py"), "--model", task / "sft", "--dataset",
                       task / "rl_train.jsonl", "--output-dir", out, "--device", a.device, "--seed", a.seed,
                       "--num-steps", a.steps, "--prompts-per-step", a.prompts_per_step, "--num-generations",
                       a.num_generations, "--max-completion-length", a.max_completion_length, "--learning-rate",
                       a.learning_rate, "--gradient-accumulation-steps", a.gradient_accumulation_steps,
                       "--loss-type", "dapo", "--scale-rewards", "group", "--beta", "0", "--save-every", 1000000,
                       "--reward-fn", "accuracy", "--overwrite", *a.extra.split()]
                child = run_child(cmd, work / f"grpo-{side}-{r}.log", env)
                metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
                step_s = [m["perf/step_s"] for m in metrics if "perf/step_s" in m]
            else:
                cfg = dict(task="grpo", root=str(ROOT), policy=str(task / "sft"), dataset=str(task / "rl_train.jsonl"),
                           output_dir=str(out), device=a.device, seed=a.seed, threads=a.threads, steps=a.steps,
                           prompts_per_step=a.prompts_per_step, num_generations=a.num_generations,
                           max_completion_length=a.max_completion_length, temperature=1.0, loss_type="dapo",
                           scale_rewards="group", beta=0.0, epsilon=0.2, num_iterations=1,
                           learning_rate=a.learning_rate, gradient_accumulation_steps=a.gradient_accumulation_steps)
                cfg_path, result_path = work / f"grpo-trl-{r}.json", work / f"grpo-trl-{r}.result.json"
                cfg_path.write_text(json.dumps(cfg))
                child = run_child([a.trl_python, str(TRL_RUNNER), str(cfg_path), str(result_path)],
                                  work / f"grpo-{side}-{r}.log", env)
                step_s = json.loads(result_path.read_text())["iteration_s"]
            timed = step_s[1:] if len(step_s) > 1 else step_s
            row = {"side": side, "completions/s": completions / statistics.mean(timed),
                   "peak RSS MiB": child["peak_rss_mb"], "process wall s": child["wall_s"],
                   "held-out accuracy": greedy_accuracy(out, test)}
            rows.append(row)
            print(f"  run {r} {side:<4}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "side"),
                  flush=True)
    keys = [("completions/s", ".1f"), ("peak RSS MiB", ".0f"), ("process wall s", ".1f"), ("held-out accuracy", ".3f")]
    table = summarize(rows, keys, "grpo.py vs trl.GRPOTrainer (ratio = ours / TRL)")
    return {"config": {k: str(v) for k, v in vars(a).items()}, "start_accuracy": start_accuracy, "rows": rows,
            "table": table}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--profile-child":  # internal: see profile_ppo
        return profile_child(sys.argv[2], sys.argv[3], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["ppo", "profile", "sft", "reward", "grpo", "dpo"], default="ppo")
    p.add_argument("--runs", type=int, default=3, help="runs per side, alternating (>= 3 for min/median/max)")
    p.add_argument("--iterations", type=int, default=3, help="PPO iterations per run (the first is a warm-up)")
    p.add_argument("--batch-size", type=int, default=None, help="episodes (ppo; default 64) or examples/pairs per "
                   "optimizer step (sft/reward; default 16)")
    p.add_argument("--mini-batch-size", type=int, default=None, help="default and, for TRL 1.12, must be: --batch-size")
    p.add_argument("--gradient-accumulation-steps", type=int, default=2, help="micro-batches per mini-batch")
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--kl-coef", type=float, default=0.05, help="fixed (no adaptive control on either side)")
    p.add_argument("--reward", choices=["random", "sentiment"], default="random",
                   help="reward model: random (speed only) or briefly trained on IMDB sentiment (learning)")
    p.add_argument("--score-window", type=int, default=0, help="mean score over the last N iterations (0: half)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in both children (0: torch's default). 1 is steadiest on a "
                        "shared machine and fair to both sides")
    p.add_argument("--steps", type=int, default=6, help="sft/reward: optimizer steps per run (the first: warm-up)")
    p.add_argument("--examples", type=int, default=1024, help="sft/reward: texts (pairs) in the data file")
    p.add_argument("--max-seq-length", type=int, default=128, help="sft/reward: tokens per text")
    p.add_argument("--prompt-tokens", type=int, default=0, help="reward: the first this many tokens of each pair's "
                   "texts are a prompt both share (0: two unrelated reviews)")
    p.add_argument("--min-text-tokens", type=int, default=0, help="reward without a prompt: each text is cut to a "
                   "length drawn uniformly from this to --max-seq-length - 4 tokens (0: all that long)")
    p.add_argument("--prompts-per-step", type=int, default=32, help="grpo: prompts per generation batch")
    p.add_argument("--num-generations", type=int, default=8, help="grpo: completions per prompt (G)")
    p.add_argument("--max-completion-length", type=int, default=6, help="grpo: tokens per completion at most")
    p.add_argument("--sft-steps", type=int, default=350, help="grpo: sft.py steps that make the starting policy "
                   "(as quickstart.py --pipeline grpo)")
    p.add_argument("--eval-examples", type=int, default=1000, help="grpo: held-out problems for the accuracy")
    p.add_argument("--grpo-shape", default="2,128,4", help="grpo: the arithmetic policy's n_layer,n_embd,n_head")
    p.add_argument("--grpo-task", default=None, help="grpo: an arithmetic task folder with sft/ (else built)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's default; off to match ours")
    p.add_argument("--trl-python", default="/tmp/trlvenv/bin/python", help="python of the TRL venv")
    p.add_argument("--extra", default="", help="extra flags of our script (our side only, e.g. '--lora-r 8'; "
                   "reward: --no-disable-dropout turns dropout on for both sides)")
    p.add_argument("--assets", default=str(ROOT / "tiny"))
    p.add_argument("--policy", default=None, help="sft/reward/dpo: the model (default: the assets' tiny/policy); "
                   "e.g. a folder saved by utils.assets.build_policy with other sizes")
    p.add_argument("--workdir", default=None, help="keep runs, logs and models here (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the rows and the table to this file")
    a = p.parse_args()
    if a.batch_size is None:
        a.batch_size = 64 if a.task in ("ppo", "profile") else 16
    if a.mini_batch_size is None:
        a.mini_batch_size = a.batch_size

    from utils.assets import build

    if a.threads > 0:  # this process trains the sentiment reward model: same thread count as the children
        import torch

        torch.set_num_threads(a.threads)
    assets = build(a.assets)
    a.policy, a.prompts, a.imdb = Path(a.policy or assets / "policy"), assets / "prompts.jsonl", assets / "imdb"
    if a.task != "profile" and not Path(a.trl_python).exists():
        raise SystemExit(f"--trl-python {a.trl_python} not found: create the TRL venv (see this file's docstring)")
    with tempfile.TemporaryDirectory(prefix="compare_trl-") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tasks = {"ppo": compare_ppo, "profile": profile_ppo, "sft": compare_sft, "reward": compare_reward,
                 "grpo": compare_grpo, "dpo": compare_dpo}
        result = tasks[a.task](a, work)
        if a.json and result is not None:
            Path(a.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
