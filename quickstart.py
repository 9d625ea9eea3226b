"""The offline quickstart: SFT -> reward model -> PPO on real IMDB reviews, and DPO from the same SFT model on the
same preference pairs, then PPO and DPO side by side on held-out prompts; or (--pipeline grpo) SFT -> GRPO on sums a
program checks, with held-out accuracy along the way.

    python quickstart.py                    # the whole RLHF pipeline (see README for the measured time)
    python quickstart.py --fast             # a smoke-sized run (CI)
    python quickstart.py --pipeline grpo    # arithmetic: sft.py to a modest accuracy, then grpo.py raises it

A pipeline above the scripts (it runs them and imports ppo.py's scoring helpers), so it sits beside them, not in
utils/ (shared plumbing, which imports no algorithm script).

Every stage runs one of our scripts as a subprocess with the flags printed here, exactly as you would by hand.
A finished stage is skipped on the next call (unless --force); an interrupted one resumes from its checkpoint.
Outputs in --out: data/, sft/, reward/, ppo/, dpo/ (each a normal run folder), report.json, report.md, curves.png
(PPO's learning curves), ppo_vs_dpo.png;
with --pipeline grpo in --out/grpo: task/ (utils/arithmetic.py's problems), sft/, grpo/, report.md, curves.png.
"""

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from utils import assets as assets_lib
from utils import data as data_lib
from utils.assets import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent

KL_BUDGET = 6.0  # nats per sequence: PPO's policy must stay this close to the SFT policy (checked by the tests)
# Stage sizes: (full, fast). The full run is tuned to finish in about the time README states on 2 CPU cores.
SIZES = {
    "sft_steps": (400, 100), "reward_pairs": (1000, 400), "reward_steps": (60, 20), "reward_max_len": (128, 64),
    "ppo_episodes": (64 * 30, 64 * 22), "eval_prompts": (256, 512), "dpo_steps": (63, 50),
    "dpo_learning_rate": ("5e-4", "1e-3"),
}
# The fast run is a test (tests/test_quickstart.py: the judge must rise clearly): its evaluation uses more prompts
# than the full run's, so the judge's mean is measured closely (standard error ~0.016 with 512 prompts, ~0.03 with
# 128); generating for them costs seconds.


def stage_commands(out: Path, tiny: Path, fast: bool, seed: int) -> dict:
    """The command of each stage, as a user would type it from the repository root."""
    size = {k: v[1] if fast else v[0] for k, v in SIZES.items()}
    return {
        "sft": [
            "sft.py", "--model", tiny / "policy", "--from-scratch", "--config-overrides", "n_layer=4", "n_embd=128",
            "n_head=4", "n_positions=256", "--tokenizer", tiny / "tokenizer", "--dataset", tiny / "imdb/train.jsonl",
            "--max-seq-length", "128", "--packing", "--batch-size", "16", "--learning-rate", "1e-3",
            "--max-steps", size["sft_steps"], "--eval-fraction", "0.01", "--max-eval-examples", "64",
            "--eval-every", max(size["sft_steps"] // 4, 1), "--save-every", max(size["sft_steps"] // 4, 1),
            "--seed", seed, "--output-dir", out / "sft",
        ],
        "reward": [
            "reward.py", "--model", tiny / "minilm", "--dataset", out / "data/prefs_train.jsonl",
            "--eval-dataset", out / "data/prefs_test.jsonl", "--max-seq-length", size["reward_max_len"],
            "--batch-size", "16",
            "--learning-rate", "2e-4", "--max-steps", size["reward_steps"], "--eval-every", size["reward_steps"],
            "--seed", seed, "--output-dir", out / "reward",
        ],
        "ppo": [
            "ppo.py", "--model", out / "sft", "--reward-model", out / "reward", "--dataset", tiny / "prompts.jsonl",
            "--total-episodes", size["ppo_episodes"], "--batch-size", "64", "--mini-batch-size", "32",
            "--learning-rate", "4e-4", "--anneal-lr", "--score-scaling", "normalize", "--response-length", "24",
            # a fixed kl_coef for the 6-nat KL budget (see README, Quickstart: the adaptive controller overshoots it)
            "--kl-coef", "0.3", "--no-adaptive-kl", "--save-every", "5", "--seed", seed, "--output-dir", out / "ppo",
        ],
        # DPO: the same SFT model and the same pairs as the reward model, no reward model, no sampling; one epoch of
        # 1,000 pairs (fast: two of 400), the learning rate set for PPO's KL budget (see README, Quickstart)
        "dpo": [
            "dpo.py", "--model", out / "sft", "--dataset", out / "data/prefs_train.jsonl", "--eval-dataset",
            out / "data/prefs_test.jsonl", "--max-length", "128", "--batch-size", "16", "--learning-rate",
            size["dpo_learning_rate"],
            "--max-steps", size["dpo_steps"], "--eval-every", size["dpo_steps"], "--save-every", "20", "--seed", seed,
            "--output-dir", out / "dpo",
        ],
    }


# The GRPO pipeline: (full, fast) sizes. sft.py stops early, at a modest held-out accuracy (53-60% greedy over
# seeds 1-3, with a constant learning rate: a cosine schedule's length changes the whole run, and seeds then
# ranged from 3% to 65%), so that RL has room; grpo.py then trains on other problems, judged on held-out ones.
GRPO_SIZES = {"sft_steps": (350, 350), "grpo_steps": (1000, 300), "eval_every": (50, 50), "eval_problems": (1000, 500)}


def grpo_commands(out: Path, fast: bool, seed: int) -> dict:
    """The stages of --pipeline grpo, as a user would type them."""
    size = {k: v[1] if fast else v[0] for k, v in GRPO_SIZES.items()}
    return {
        "sft": ["sft.py", "--model", out / "task/init", "--dataset", out / "task/sft_train.jsonl", "--batch-size", "64",
                "--learning-rate", "5e-4", "--lr-scheduler", "constant", "--max-steps", size["sft_steps"],
                "--eval-fraction", "0", "--seed", seed, "--save-every", size["sft_steps"], "--output-dir", out / "sft"],
        "grpo": ["grpo.py", "--model", out / "sft", "--dataset", out / "task/rl_train.jsonl", "--eval-dataset",
                 out / "task/test.jsonl", "--max-eval-examples", size["eval_problems"], "--eval-every",
                 size["eval_every"], "--reward-fn", "accuracy", "--num-steps", size["grpo_steps"],
                 "--prompts-per-step", "32", "--num-generations", "8", "--max-completion-length", "6",
                 "--learning-rate", "1e-4", "--save-every", "50", "--seed", seed, "--output-dir", out / "grpo"],
    }


def grpo_pipeline(out: Path, fast: bool, force: bool, seed: int, rel) -> Path:
    """SFT -> GRPO on utils/arithmetic.py's sums; the report is the held-out accuracy curve grpo.py logged."""
    from utils import arithmetic
    from utils.plot import plot_metrics

    start = time.perf_counter()
    if force or not (out / "task/test.jsonl").exists():
        arithmetic.build(out / "task", seed)
    stage_times = {}
    for name, argv in grpo_commands(rel(out), fast, seed).items():
        stage_times[name] = f"{run_stage(name, argv, out / name, force):.0f} s"
    rows = [json.loads(line) for line in open(out / "grpo/metrics.jsonl")]
    evals = [r for r in rows if "eval/accuracy" in r]
    before, after = evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]
    n = GRPO_SIZES["eval_problems"][int(fast)]
    lines = ["# Quickstart report: SFT -> GRPO on sums a program checks (offline)", "",
             f"Held-out exact-match accuracy (greedy, {n} problems no stage trained on): {before:.3f} after SFT -> "
             f"{after:.3f} after {evals[-1]['step']} GRPO steps ({after - before:+.3f}).", "",
             "| GRPO step | held-out accuracy | train reward (sampled) |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['eval/accuracy']:.3f} | {format(r['reward'], '.3f') if 'reward' in r else '-'} |"
              for r in evals]
    lines += ["", "Stage times: " + ", ".join(f"{k} {v}" for k, v in stage_times.items()),
              f"Total: {time.perf_counter() - start:.0f} s"]
    (out / "report.json").write_text(json.dumps({"before": before, "after": after, "evals": evals}, indent=1))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_metrics(out / "grpo/metrics.jsonl", out / "curves.png", step_key="step", title="GRPO on sums (offline)",
                 panels=[("eval/accuracy", "held-out accuracy (greedy)"), ("reward", "train reward (sampled)"),
                         ("completions/mean_length", "completion length"), ("entropy", "entropy (nats/token)")])
    print((out / "report.md").read_text())
    return out / "report.md"


def run_stage(name: str, argv: list, out_dir: Path, force: bool) -> float:
    """Run one stage (skipped if done, resumed if interrupted); returns the seconds its run took (recorded when it
    finished, so a skipped stage reports its own time)."""
    done = out_dir / ".quickstart-done"
    if done.exists() and not force:
        print(f"[{name}] done already ({out_dir}); --force reruns it")
        return float(done.read_text().split()[0])
    argv = [str(a) for a in argv]
    if (out_dir / "args.json").exists():  # an interrupted stage: continue it, or start it again with --force
        argv.append("--overwrite" if force else "--resume")
    print(f"[{name}] python {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    if subprocess.run([sys.executable, *argv], cwd=ROOT).returncode != 0:
        sys.exit(f"error: the {name} stage failed (its message is above); rerun to resume it, or add --force")
    seconds = time.perf_counter() - start
    done.write_text(f"{seconds:.0f} s\n")
    return seconds


def evaluate(out: Path, eval_prompts: list, seed: int, n_samples: int = 6) -> dict:
    """The SFT policy, the PPO policy and the DPO policy on held-out prompts: reward-model score, an independent
    judge (VADER sentiment of the completion, never used in training), and KL(policy || SFT) on the policy's own
    samples (as ppo.py's objective/kl)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import ppo
    from utils.rewards import reward_vader, score_with_model

    device = torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "reward").eval()
    reward_tokenizer = AutoTokenizer.from_pretrained(out / "reward")
    args = ppo.Args(response_length=24)
    gen_config, stop_id = ppo.make_generation_config(args, tokenizer)
    prompts = ppo.build_prompts(_as_dataset(eval_prompts), tokenizer, "text", 2, 8, seed)
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    sft = AutoModelForCausalLM.from_pretrained(out / "sft").eval()
    report, completions = {"n_prompts": len(prompts), "policies": {}}, {}
    for name in POLICIES:
        lm = sft if name == "sft" else AutoModelForCausalLM.from_pretrained(out / name).eval()
        torch.manual_seed(seed)
        responses = []
        for i in range(0, len(prompts), 64):
            generated = ppo.generate(lm, prompts[i : i + 64], tokenizer.pad_token_id, gen_config, device)
            responses += ppo.truncate_after_stop(generated, stop_id)[0]
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        full_texts = [p + c for p, c in zip(prompt_texts, texts)]
        rm = score_with_model(reward_model, reward_tokenizer, full_texts, 0, 64, device)
        judge = reward_vader(prompt_texts, texts, None)
        result = {"reward_model": _mean_std(rm.tolist()), "vader": _mean_std(judge)}
        if name != "sft":
            result["kl_vs_sft"] = _mean_std(_sequence_kl(lm, sft, prompts, responses, tokenizer))
        report["policies"][name] = result
        completions[name] = texts
    report["samples"] = [{"prompt": prompt_texts[i], **{name: completions[name][i] for name in POLICIES}}
                         for i in range(min(n_samples, len(prompts)))]
    return report


POLICIES = {"sft": "SFT (start)", "ppo": "PPO", "dpo": "DPO"}


def _sequence_kl(lm, ref_lm, queries, responses, tokenizer):
    """Per-sequence k1 estimate sum_t log p(y_t) - log q(y_t) on the samples of lm (as ppo.py's objective/kl)."""
    import torch

    import ppo

    kls = []
    with torch.no_grad():
        for i in range(0, len(queries), 64):
            q_ids, q_mask = ppo.left_pad(queries[i : i + 64], tokenizer.pad_token_id)
            r_ids, r_mask = ppo.right_pad(responses[i : i + 64], tokenizer.pad_token_id)
            ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
            logp = ppo.logprobs_of(ppo.lm_forward(lm, ids, mask, q_ids.shape[1]), r_ids)
            ref_logp = ppo.logprobs_of(ppo.lm_forward(ref_lm, ids, mask, q_ids.shape[1]), r_ids)
            kls += ((logp - ref_logp) * r_mask).sum(1).tolist()
    return kls


def _as_dataset(records):
    import datasets

    return datasets.Dataset.from_list(records)


def _mean_std(xs):
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def gain(report: dict, name: str, metric: str) -> tuple[float, float]:
    """A policy's mean `metric` minus the SFT policy's, and the standard error of that difference (independent
    samples on the same prompts)."""
    a, b = report["policies"][name][metric], report["policies"]["sft"][metric]
    return a["mean"] - b["mean"], math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])


def write_report(out: Path, report: dict, stage_seconds: dict) -> Path:
    """report.md (tables: the three policies; PPO vs DPO; sample completions), report.json and ppo_vs_dpo.png."""
    from utils.plot import plot_bars

    lines = [
        "# Quickstart report: SFT -> reward model -> PPO, and SFT -> DPO (offline IMDB)", "",
        f"Held-out prompts: {report['n_prompts']} (first 2-8 tokens of held-out reviews); mean ± std.", "",
        "| policy | reward-model score | VADER judge (independent) | KL to SFT (nats/seq) |", "|---|---|---|---|",
    ]
    for name, label in POLICIES.items():
        r = report["policies"][name]
        kl = f"{r['kl_vs_sft']['mean']:.2f} ± {r['kl_vs_sft']['std']:.2f}" if "kl_vs_sft" in r else "0"
        lines.append(f"| {label} | {r['reward_model']['mean']:+.3f} ± {r['reward_model']['std']:.3f} | "
                     f"{r['vader']['mean']:+.3f} ± {r['vader']['std']:.3f} | {kl} |")
    lines += ["", "PPO vs DPO, each from the same SFT model and the same preference pairs (PPO through the reward "
              "model trained on them; DPO directly); gains over SFT ± standard error:", "",
              "| | judge gain | reward-model gain | KL to SFT | training time |", "|---|---|---|---|---|"]
    bars = {"VADER judge gain over SFT": {}, "reward-model gain over SFT": {}, "KL to SFT (nats/seq)": {},
            "training time (s)": {}}
    for name, seconds in (("ppo", stage_seconds["reward"] + stage_seconds["ppo"]), ("dpo", stage_seconds["dpo"])):
        judge, rm, kl = gain(report, name, "vader"), gain(report, name, "reward_model"), \
            report["policies"][name]["kl_vs_sft"]
        what = f"{seconds:.0f} s" + (f" (reward model {stage_seconds['reward']:.0f} s + PPO)" if name == "ppo" else "")
        lines.append(f"| {POLICIES[name]} | {judge[0]:+.3f} ± {judge[1]:.3f} | {rm[0]:+.3f} ± {rm[1]:.3f} | "
                     f"{kl['mean']:.2f} | {what} |")
        for title, value in zip(bars, (judge, rm, (kl["mean"], kl["std"] / math.sqrt(kl["n"])), (seconds, 0.0))):
            bars[title][POLICIES[name]] = value
    lines += ["", "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items()), "",
              "| prompt | " + " | ".join(POLICIES.values()) + " |", "|---" * (len(POLICIES) + 1) + "|"]

    def clean(text):  # one table cell
        return text.replace("|", "/").replace("\n", " ")

    lines += ["| " + " | ".join(clean(s[k]) for k in ("prompt", *POLICIES)) + " |" for s in report["samples"]]
    (out / "report.json").write_text(json.dumps({**report, "stage_seconds": stage_seconds}, indent=2))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_bars(bars, out / "ppo_vs_dpo.png", title=f"PPO vs DPO from the same SFT model ({report['n_prompts']} "
              "held-out prompts; error bars: standard error)")
    return out / "report.md"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="quickstart", help="output folder (default: ./quickstart)")
    parser.add_argument("--fast", action="store_true", help="smoke-sized stages (about 3 minutes)")
    parser.add_argument("--force", action="store_true", help="rerun finished stages")
    parser.add_argument("--seed", type=int, default=1, help="seed of every stage")
    parser.add_argument("--pipeline", choices=["rlhf", "grpo"], default="rlhf",
                        help="rlhf: SFT -> reward model -> PPO on IMDB; grpo: SFT -> GRPO on sums")
    a = parser.parse_args()
    out = (ROOT / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    start = time.perf_counter()

    def rel(path):  # paths in the printed commands relative to the repository, as a user types them
        return Path(path).relative_to(ROOT) if Path(path).is_relative_to(ROOT) else Path(path)

    if a.pipeline == "grpo":
        report = grpo_pipeline(out / "grpo", a.fast, a.force, a.seed, rel)
        print(f"quickstart done in {time.perf_counter() - start:.0f} s: {report}, {report.with_name('curves.png')}")
        return

    tiny = assets_lib.build()
    size = {k: v[1] if a.fast else v[0] for k, v in SIZES.items()}
    if a.force or not (out / "data/prefs_train.jsonl").exists():
        data_lib.build(out / "data", n_train=size["reward_pairs"], n_test=140, seed=0)
        test = read_jsonl(tiny / "imdb/test.jsonl")  # prompts.jsonl holds the first 1,024: evaluate on others
        write_jsonl(out / "data/eval_prompts.jsonl", ({"text": r["text"]} for r in test[-size["eval_prompts"]:]))

    commands = stage_commands(rel(out), rel(tiny), a.fast, a.seed)
    stage_seconds = {}
    for name, argv in commands.items():
        stage_seconds[name] = run_stage(name, argv, out / name, a.force)

    print("[eval] SFT, PPO and DPO policies on held-out prompts", flush=True)
    report = evaluate(out, read_jsonl(out / "data/eval_prompts.jsonl"), a.seed)
    report["total_seconds"] = round(time.perf_counter() - start)
    report_md = write_report(out, report, stage_seconds)
    from utils.plot import plot_metrics

    png = plot_metrics(out / "ppo/metrics.jsonl", out / "curves.png", title="PPO on the offline IMDB quickstart")
    print((out / "report.md").read_text())
    print(f"quickstart done in {report['total_seconds']} s: {report_md}, {png}, {out / 'ppo_vs_dpo.png'}, "
          f"{out / 'report.json'}")


if __name__ == "__main__":
    main()
