"""The offline quickstart's fast variant, end to end: SFT -> reward model -> PPO -> evaluation. The independent
judge (VADER sentiment, never used in training) must rate the completions after PPO clearly higher."""

import json

import pytest

from conftest import learning_seed, record_learning, run_script
from quickstart import KL_BUDGET


@pytest.mark.slow
def test_fast_quickstart_improves_the_independent_judge(tmp_path):
    out = tmp_path / "quickstart"
    proc = run_script("quickstart.py", "--fast", "--out", out, "--seed", learning_seed(1), timeout=1800)
    report = json.loads((out / "report.json").read_text())
    sft, ppo, dpo = (report["policies"][name] for name in ("sft", "ppo", "dpo"))
    # The judge's mean over the 512 evaluation prompts has a standard error of ~0.016 (VADER's std ~0.355), so the
    # rise of a policy that did not learn is 0 +- 0.022: 0.05 is 2.3 of those. (It was 0.1, set before any seed
    # sweep: over seeds 1-10 the fast pipeline's rise was 0.089-0.159, so 0.1 failed on 2 seeds though PPO learned.)
    record_learning("quickstart_judge_rise", ppo["vader"]["mean"] - sft["vader"]["mean"], 0.05)
    assert ppo["vader"]["mean"] > sft["vader"]["mean"] + 0.05, report
    assert ppo["reward_model"]["mean"] > sft["reward_model"]["mean"]
    assert ppo["kl_vs_sft"]["mean"] < KL_BUDGET  # the policy stays within the KL budget
    # DPO from the same SFT model on the same pairs: the judge rises too (threshold and seeds: DPO_RISE below)
    record_learning("quickstart_dpo_judge_rise", dpo["vader"]["mean"] - sft["vader"]["mean"], DPO_RISE)
    assert dpo["vader"]["mean"] > sft["vader"]["mean"] + DPO_RISE, report
    assert (out / "ppo_vs_dpo.png").stat().st_size > 10_000
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "report.md").exists()
    assert "[sft] python sft.py" in proc.stdout  # each stage prints the command a user can rerun
    # idempotent: a second call skips every finished stage
    again = run_script("quickstart.py", "--fast", "--out", out, "--seed", learning_seed(1), timeout=600)
    assert again.stdout.count("done already") == 4


# DPO's judge rise over seeds 1-10 of the fast pipeline: 0.156 to 0.230 (benchmarks/seed_sweep.py). As for PPO's, a
# policy that learned nothing rises 0 +- 0.022 (two means over 512 prompts): 0.05 is 2.3 of those.
DPO_RISE = 0.05


def test_readme_prints_the_quickstart_commands():
    from pathlib import Path

    from conftest import ROOT
    from quickstart import stage_commands

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Quickstart") :].split("```")[1]
    printed = " ".join(block.replace("\\\n", " ").split())
    for argv in stage_commands(Path("quickstart"), Path("tiny"), fast=False, seed=1).values():
        assert "python " + " ".join(str(a) for a in argv) in printed, argv[0]
