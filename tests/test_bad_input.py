"""Careless input, across every script: each case ends in one `error:` line that names the flag or file and says
what to do (exit status != 0, at most 3 lines on stderr, no traceback), before any weights load, and nothing a
user already has is lost (a run in --output-dir is never overwritten or resumed with other flags silently).

The cases run in-process (`python script.py` through runpy with sys.argv set, the interpreter's own path for
SystemExit messages), so 40 of them take seconds; test_a_few_cases_as_real_processes checks that a real process
prints the same."""

import json
import runpy
import shutil
import sys

import pytest
from transformers import AutoTokenizer

from conftest import ROOT, run_script
from utils.assets import read_jsonl, write_jsonl


@pytest.fixture(scope="module")
def world(assets, tmp_path_factory):
    """Valid base flags per script, and the broken things the cases point at."""
    tmp = tmp_path_factory.mktemp("bad_input")
    from utils import tiny_sd
    from utils.data import sentiment_pairs

    reviews = [(r["text"], r["label"]) for r in read_jsonl(assets / "imdb" / "test.jsonl")[:2000]]
    write_jsonl(tmp / "pairs.jsonl", sentiment_pairs(reviews, 8, seed=0, max_words=80))
    (tmp / "prompts.txt").write_text("cat\ndog\n")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "broken_reward.py").write_text("value = undefined_name + 1\n\ndef fn(p, c, i):\n    return [0.0]\n")
    (tmp / "syntax_reward.py").write_text("def fn(p, c, i)\n    return [0.0]\n")
    # a model whose code lives in its repository (config.json's auto_map)
    remote = shutil.copytree(assets / "policy", tmp / "remote_code_model")
    config = json.loads((remote / "config.json").read_text())
    config["model_type"] = "a_model_type_transformers_does_not_know"
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (remote / "config.json").write_text(json.dumps(config))
    # models whose embedding is smaller than their tokenizer (config only: the check runs before the weights load)
    for name in ("policy", "reward", "t5"):
        small = shutil.copytree(assets / name, tmp / f"small_vocab_{name}")
        config = json.loads((small / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(small)
        config["vocab_size"] = len(tok) - 10
        (small / "config.json").write_text(json.dumps(config))
    # tokenizers with neither EOS nor pad
    for name in ("policy", "reward"):
        no_eos = shutil.copytree(assets / name, tmp / f"no_eos_{name}")
        tok = AutoTokenizer.from_pretrained(no_eos)
        tok.eos_token, tok.pad_token = None, None
        tok.save_pretrained(no_eos)
        assert AutoTokenizer.from_pretrained(no_eos).eos_token_id is None
    # a folder that holds a run, one whose flags differ, one with a damaged checkpoint
    for name in ("old_run", "changed_run", "damaged_run"):
        (tmp / name).mkdir()
        (tmp / name / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp / "changed_run" / "args.json").write_text(json.dumps({"batch_size": 999, "seed": 7}))
    (tmp / "damaged_run" / "checkpoint").mkdir()
    (tmp / "damaged_run" / "checkpoint" / "training_state.pt").write_bytes(b"PK\x03\x04 cut short")
    base = {
        "ppo.py": ["--model", assets / "policy", "--reward-model", assets / "reward", "--dataset",
                   assets / "prompts.jsonl", "--total-episodes", 8, "--batch-size", 8, "--mini-batch-size", 8,
                   "--response-length", 4],
        "ppo_seq2seq.py": ["--model", assets / "t5", "--reward-model", assets / "reward", "--dataset",
                           assets / "prompts.jsonl", "--total-episodes", 8, "--batch-size", 8, "--mini-batch-size", 8,
                           "--response-length", 4],
        "sft.py": ["--model", assets / "policy", "--dataset", assets / "imdb" / "test.jsonl", "--max-steps", 1,
                   "--batch-size", 2, "--max-seq-length", 32],
        "reward.py": ["--model", assets / "reward", "--dataset", tmp / "pairs.jsonl", "--max-steps", 1,
                      "--batch-size", 2, "--max-seq-length", 32],
        "dpo.py": ["--model", assets / "policy", "--dataset", tmp / "pairs.jsonl", "--max-steps", 1, "--batch-size", 2,
                   "--max-length", 32],
        "ddpo.py": ["--model", tiny_sd.build(ROOT / "tiny" / "sd"), "--prompts", tmp / "prompts.txt", "--num-epochs", 1,
                    "--num-steps", 2, "--sample-batch-size", 2, "--num-batches-per-epoch", 1, "--train-batch-size",
                    2, "--gradient-accumulation-steps", 1],
    }
    return tmp, base


# (script, flags, what the error line must contain). T is the world's temporary folder, A the assets folder.
CASES = [
    # paths that do not exist are reported as such (not as an unreachable hub), before anything loads
    ("ppo.py", ["--model", "./nope"], "--model './nope': no such file or folder"),
    ("ppo_seq2seq.py", ["--model", "./nope"], "--model './nope': no such file or folder"),
    ("sft.py", ["--model", "./nope"], "--model './nope': no such file or folder"),
    ("reward.py", ["--model", "./nope"], "--model './nope': no such file or folder"),
    ("ddpo.py", ["--model", "./nope"], "--model './nope': no such file or folder"),
    ("dpo.py", ["--model", "./nope"], "--model './nope': no such file or folder"),
    ("dpo.py", ["--eval-dataset", "data/nope.jsonl"], "--eval-dataset 'data/nope.jsonl': no such file or folder"),
    ("ppo.py", ["--dataset", "data/nope.jsonl"], "--dataset 'data/nope.jsonl': no such file or folder"),
    ("sft.py", ["--dataset", "data/nope.jsonl"], "--dataset 'data/nope.jsonl': no such file or folder"),
    ("reward.py", ["--eval-dataset", "data/nope.jsonl"], "--eval-dataset 'data/nope.jsonl': no such file or folder"),
    ("ppo.py", ["--reward-model", "../nope/rm"], "--reward-model '../nope/rm': no such file or folder"),
    ("sft.py", ["--tokenizer", "/nope/tok"], "--tokenizer '/nope/tok': no such file or folder"),
    # a reward function file that exists but fails to import shows the user's own error
    ("ppo.py", ["--reward-fn", "T/broken_reward.py:fn"], "NameError: name 'undefined_name' is not defined"),
    ("ppo_seq2seq.py", ["--reward-fn", "T/syntax_reward.py:fn"], "SyntaxError"),
    ("ppo.py", ["--reward-fn", "T/missing.py:fn"], "no such file"),
    # remote code needs the explicit flag
    ("ppo.py", ["--model", "T/remote_code_model"], "--trust-remote-code"),
    ("sft.py", ["--model", "T/remote_code_model"], "--trust-remote-code"),
    ("dpo.py", ["--model", "T/remote_code_model"], "--trust-remote-code"),
    # numbers that cannot work
    ("ppo.py", ["--save-every", 0], "--save-every must be > 0"),
    ("ppo_seq2seq.py", ["--save-every", 0], "--save-every must be > 0"),
    ("sft.py", ["--save-every", 0], "--save-every must be > 0"),
    ("reward.py", ["--save-every", 0], "--save-every must be > 0"),
    ("ddpo.py", ["--save-every", 0], "--save-every must be > 0"),
    ("dpo.py", ["--beta", 0], "--beta must be > 0"),
    ("dpo.py", ["--dataset", "T/prompts.txt"], "needs the columns 'chosen' and 'rejected'"),
    ("ppo.py", ["--total-episodes", 0], "--total-episodes must be > 0"),
    ("ppo.py", ["--ppo-epochs", 0], "--ppo-epochs must be > 0"),
    ("ppo.py", ["--response-length", 0], "--response-length must be > 0"),
    ("ppo.py", ["--response-length-min", 9], "need 1 <= --response-length-min <= --response-length"),
    ("ppo_seq2seq.py", ["--response-length", 0], "--response-length must be > 0"),
    ("ppo.py", ["--learning-rate", "-1e-3"], "--learning-rate must be > 0"),
    ("sft.py", ["--learning-rate", "-1e-3"], "--learning-rate must be > 0"),
    ("reward.py", ["--batch-size", 0], "--batch-size must be > 0"),
    ("reward.py", ["--length-groups", -1], "--length-groups must be >= 1, or 0 for the default"),
    ("ddpo.py", ["--num-epochs", 0], "--num-epochs must be > 0"),
    ("sft.py", ["--max-steps", 0], "--max-steps must be >= 1"),
    # prompt + response longer than the model's context (the tiny GPT-2 has 256 positions)
    ("ppo.py", ["--prompt-max-tokens", 250, "--response-length", 24], "exceed the model's context of 256"),
    ("sft.py", ["--max-seq-length", 1000], "exceeds the model's context of 256"),
    # tokenizers the model cannot use
    ("ppo.py", ["--model", "T/small_vocab_policy"], "the model's embedding only"),
    ("ppo_seq2seq.py", ["--model", "T/small_vocab_t5"], "the model's embedding only"),
    ("reward.py", ["--model", "T/small_vocab_reward"], "the model's embedding only"),
    ("sft.py", ["--model", "T/small_vocab_policy"], "--model's embedding only"),
    ("dpo.py", ["--model", "T/small_vocab_policy"], "the model's embedding only"),
    ("dpo.py", ["--model", "T/no_eos_policy"], "neither a pad nor an EOS token"),
    ("ppo.py", ["--model", "T/no_eos_policy"], "neither a pad nor an EOS token"),
    ("reward.py", ["--model", "T/no_eos_reward"], "neither a pad nor an EOS token"),
    ("ppo.py", ["--reward-model", "T/no_eos_reward"], "neither a pad nor an EOS token"),
    # output folders: a file, not writable, a run that would be lost, flags that change a resumed run
    ("ppo.py", ["--output-dir", "T/a_file"], "--output-dir T/a_file is an existing file"),
    ("sft.py", ["--output-dir", "T/a_file/run"], "cannot be written to"),
    ("ppo.py", ["--output-dir", "T/old_run"], "already holds a run: pass --resume to continue it or --overwrite"),
    ("ddpo.py", ["--output-dir", "T/old_run"], "already holds a run: pass --resume to continue it or --overwrite"),
    ("dpo.py", ["--output-dir", "T/changed_run", "--resume", "--seed", 7],
     "--resume with flags that change the result: --batch-size 999 -> 2"),
    ("sft.py", ["--output-dir", "T/old_run", "--resume", "--overwrite"], "pass one of them"),
    ("reward.py", ["--output-dir", "T/changed_run", "--resume", "--seed", 7],
     "--resume with flags that change the result: --batch-size 999 -> 2"),
    ("ddpo.py", ["--output-dir", "T/damaged_run", "--resume"], "training_state.pt"),
]


def as_flags(flags, tmp, assets):
    return [str(f).replace("T/", f"{tmp}/").replace("A/", f"{assets}/") if isinstance(f, str) else str(f)
            for f in flags]


def run_in_process(script, argv, capfd, monkeypatch):
    """`python script argv...` in this process: (exit status or message, stderr as the user sees it)."""
    capfd.readouterr()
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    code = exit_info.value.code
    stderr = capfd.readouterr().err + (f"{code}\n" if isinstance(code, str) else "")  # the interpreter prints it
    return code, stderr


@pytest.mark.parametrize("script,flags,message", CASES, ids=[f"{c[0]}:{' '.join(map(str, c[1]))}" for c in CASES])
def test_careless_input_ends_in_one_clear_line(world, assets, script, flags, message, capfd, monkeypatch):
    tmp, base = world
    out = ["--output-dir", str(tmp / "runs" / f"{script}-{abs(hash(tuple(map(str, flags))))}")]
    argv = as_flags([*base[script], *out, *flags], tmp, assets)  # a later flag wins over the base's
    code, stderr = run_in_process(script, argv, capfd, monkeypatch)
    assert code not in (0, None), stderr
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) <= 3, stderr
    assert lines[-1].startswith("error: ") and as_flags([message], tmp, assets)[0] in lines[-1], stderr


def test_there_are_at_least_30_cases_over_every_script():
    assert len(CASES) >= 30 and {c[0] for c in CASES} == {"ppo.py", "ppo_seq2seq.py", "sft.py", "reward.py", "ddpo.py",
                                                        "dpo.py"}


def test_a_few_cases_as_real_processes(world, assets):
    """The same one line from a real `python script.py` (the in-process runs above stand for the rest)."""
    tmp, base = world
    picked = [c for c in CASES if c[2].startswith(("--model './nope'", "--save-every", "already holds a run"))]
    for script, flags, message in [picked[0], picked[5], picked[-1]]:  # ppo.py, sft.py, ddpo.py
        proc = run_script(script, *as_flags([*base[script], "--output-dir", tmp / "real", *flags], tmp, assets),
                          check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) <= 3 and lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
