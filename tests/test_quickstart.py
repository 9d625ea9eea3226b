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
    record_learning("quickstart_judge_rise", after - before, 0.1)
    assert after > before + 0.1, report
    assert report["after"]["reward_model"]["mean"] > report["before"]["reward_model"]["mean"]
    assert report["kl_after_vs_before"]["mean"] < KL_BUDGET  # the policy stays within the KL budget
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "report.md").exists()
    assert "[sft] python sft.py" in proc.stdout  # each stage prints the command a user can rerun
    # idempotent: a second call skips every finished stage
    again = run_script("quickstart.py", "--fast", "--out", out, timeout=600)
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
