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
    before, after = report["before"]["vader"]["mean"], report["after"]["vader"]["mean"]
    # The judge's mean over the 512 evaluation prompts has a standard error of ~0.016 (VADER's std ~0.355), so the
    # rise of a policy that did not learn is 0 +- 0.022: 0.05 is 2.3 of those. (It was 0.1, set before any seed
    # sweep: over seeds 1-10 the fast pipeline's rise was 0.089-0.159, so 0.1 failed on 2 seeds though PPO learned.)
    record_learning("quickstart_judge_rise", after - before, 0.05)
    assert after > before + 0.05, report
    assert report["after"]["reward_model"]["mean"] > report["before"]["reward_model"]["mean"]
    assert report["kl_after_vs_before"]["mean"] < KL_BUDGET  # the policy stays within the KL budget
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "report.md").exists()
    assert "[sft] python sft.py" in proc.stdout  # each stage prints the command a user can rerun
    # idempotent: a second call skips every finished stage
    again = run_script("quickstart.py", "--fast", "--out", out, "--seed", learning_seed(1), timeout=600)
    assert again.stdout.count("done already") == 3


def test_readme_prints_the_quickstart_commands():
    from pathlib import Path

    from conftest import ROOT
    from quickstart import stage_commands

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Quickstart") :].split("```")[1]
    printed = " ".join(block.replace("\\\n", " ").split())
    for argv in stage_commands(Path("quickstart"), Path("tiny"), fast=False, seed=1).values():
        assert "python " + " ".join(str(a) for a in argv) in printed, argv[0]
