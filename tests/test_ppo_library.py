"""ppo.py as a library: the README snippet runs as written, and a library call of ppo_step reproduces the
script's own update bit for bit."""

import copy
import re
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

import ppo
from conftest import ROOT
from test_ppo_e2e import read_metrics, tiny_args
from utils.models import fuse_gelu


def test_readme_library_snippet_runs(assets):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### PPO as a library") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"kl -?\d\.\d{4}  policy loss -?\d\.\d{4}", proc.stdout), proc.stdout


def check_library_call_matches_script(module, main_args, model_cls, model_dir, monkeypatch):
    """Record the batch and state that `module.main` hands to its own `ppo_step`, then redo that update with a
    library call on models loaded as a user would: weights and statistics must be bit-identical."""
    recorded = {}
    real_step = module.ppo_step

    def spy(args, policy, ref_lm, optimizer, queries, responses, scores, kl_ctl, score_moments, pad_id, generator):
        recorded.update(args=copy.deepcopy(args), before=copy.deepcopy(policy.state_dict()), queries=queries,
                        responses=responses, scores=scores.clone(), kl_coef=kl_ctl.kl_coef, pad_id=pad_id,
                        generator=generator.get_state())
        stats = real_step(args, policy, ref_lm, optimizer, queries, responses, scores, kl_ctl, score_moments,
                          pad_id, generator)
        recorded.update(after=copy.deepcopy(policy.state_dict()), stats=dict(stats))  # main adds keys later
        return stats

    monkeypatch.setattr(module, "ppo_step", spy)
    assert len(read_metrics(module.main(main_args))) == 1

    lm = model_cls.from_pretrained(model_dir)
    policy = module.PolicyAndValue(lm, lm.config.hidden_size).eval()
    policy.load_state_dict(recorded["before"])
    ref_lm = model_cls.from_pretrained(model_dir).eval()
    fuse_gelu(lm)  # as the scripts do (same function, another kernel: bits differ without it)
    fuse_gelu(ref_lm)
    args = recorded["args"]
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True)  # as the scripts
    kl_ctl = module.KLController(recorded["kl_coef"], args.kl_target, args.kl_horizon)
    generator = torch.Generator()
    generator.set_state(recorded["generator"])
    stats = real_step(args, policy, ref_lm, optimizer, recorded["queries"], recorded["responses"],
                      recorded["scores"], kl_ctl, module.RunningMoments(), recorded["pad_id"], generator)
    after = policy.state_dict()
    assert all(torch.equal(after[k], recorded["after"][k]) for k in after)

    def strip(stats):  # timings differ run to run
        return {k: v for k, v in stats.items() if not k.startswith("perf/")}

    assert strip(stats) == strip(recorded["stats"])


def test_library_call_matches_the_scripts_update_bit_for_bit(assets, tmp_path, monkeypatch):
    args = tiny_args(assets, tmp_path, total_episodes=8, reward_fn=["length"], reward_weights=[1.0, -0.1])
    check_library_call_matches_script(ppo, args, AutoModelForCausalLM, assets / "policy", monkeypatch)
