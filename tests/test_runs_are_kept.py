"""Nothing a user already has is lost: a run in --output-dir is never overwritten without --overwrite, never
resumed with flags that change its result, and a resume survives a half-written metrics line and a damaged last
checkpoint (falling back to the previous one, kept as checkpoint.old). A full disk is one line naming the folder.
(The one-line refusals themselves, for every script, are cases of test_bad_input.py.)"""

import errno
import json
from pathlib import Path

import pytest

import ppo
import sft
from test_ppo_e2e import read_metrics, tiny_args
from utils.hub import UserError
from utils.runtime import Tracker, atomic_dir, cli, complete_checkpoint


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_a_rerun_without_resume_is_refused_and_overwrite_replaces(assets, tmp_path):
    out = tmp_path / "run"
    ppo.main(tiny_args(assets, tmp_path, total_episodes=24))  # 3 iterations
    before = lines(out / "metrics.jsonl"), (out / "checkpoint" / "training_state.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a run: pass --resume to continue it or --overwrite"):
        ppo.main(tiny_args(assets, tmp_path, total_episodes=8))
    assert (lines(out / "metrics.jsonl"), (out / "checkpoint" / "training_state.pt").read_bytes()) == before
    ppo.main(tiny_args(assets, tmp_path, total_episodes=8, overwrite=True))  # 1 iteration, from scratch
    assert [json.loads(m)["iteration"] for m in lines(out / "metrics.jsonl")] == [1]
    assert not (out / "checkpoint.old").exists()  # the old run's checkpoints went with it


def test_resume_refuses_flags_that_change_the_result_and_allows_a_longer_run(assets, tmp_path, capsys):
    out = tmp_path / "run"
    ppo.main(tiny_args(assets, tmp_path, total_episodes=16))
    args_json = (out / "args.json").read_text()
    with pytest.raises(UserError, match=r"--resume with flags that change the result: --seed 1 -> 2; "
                                        r"--batch-size 8 -> 4\. Rerun"):
        ppo.main(tiny_args(assets, tmp_path, total_episodes=16, batch_size=4, mini_batch_size=4,
                           gradient_accumulation_steps=1, seed=2, resume=True))
    assert (out / "args.json").read_text() == args_json  # not overwritten by the refused run
    # a longer run, another save interval: allowed
    ppo.main(tiny_args(assets, tmp_path, total_episodes=24, save_every=3, resume=True))
    assert [m["iteration"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert "learning-rate schedule" not in capsys.readouterr().err
    # with --anneal-lr the schedule depends on the run's length: allowed too, and a warning line says so
    ppo.main(tiny_args(assets, tmp_path / "annealed", total_episodes=16, anneal_lr=True))
    ppo.main(tiny_args(assets, tmp_path / "annealed", total_episodes=24, anneal_lr=True, resume=True))
    assert "warning: --resume with another run length (--total-episodes 16 -> 24)" in capsys.readouterr().err


def test_resume_survives_a_half_written_metrics_line(assets, tmp_path):
    out = tmp_path / "run"
    ppo.main(tiny_args(assets, tmp_path, total_episodes=16))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "objective/sco')  # killed during the write
    ppo.main(tiny_args(assets, tmp_path, total_episodes=24, resume=True))
    assert [m["iteration"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(assets, tmp_path, capsys):
    whole = read_metrics(ppo.main(tiny_args(assets, tmp_path / "whole", total_episodes=32)))  # 4 iterations
    out = tmp_path / "cut" / "run"
    ppo.main(tiny_args(assets, tmp_path / "cut", total_episodes=24))  # checkpoints after 2 (.old) and 3
    weights = next((out / "checkpoint").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated (a disk error, a partial copy)
    capsys.readouterr()
    resumed = read_metrics(ppo.main(tiny_args(assets, tmp_path / "cut", total_episodes=32, resume=True)))
    err = capsys.readouterr().err
    assert f"checkpoint damaged ({weights}" in err and "resuming from the previous one" in err
    assert [m["iteration"] for m in resumed] == [1, 2, 3, 4]  # iteration 3 redone, none twice
    for a, b in zip(whole, resumed):
        assert b["objective/scores"] == pytest.approx(a["objective/scores"], abs=1e-5)
        assert b["losses/policy_loss"] == pytest.approx(a["losses/policy_loss"], abs=1e-5)
    # both damaged: one line naming the file
    for folder in ("checkpoint", "checkpoint.old"):
        state = out / folder / "training_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(UserError, match=r"the checkpoint is damaged \(.*training_state.pt: .*\) and no complete"):
        complete_checkpoint(out / "checkpoint")


def test_a_full_disk_is_one_line_naming_the_folder_and_the_last_checkpoint_stays(tmp_path, monkeypatch, capsys):
    with atomic_dir(tmp_path / "checkpoint") as tmp:
        (tmp / "training_state.pt").write_text("complete")
    with pytest.raises(UserError, match=f"the disk holding {tmp_path} is full"):
        with atomic_dir(tmp_path / "checkpoint") as tmp:
            (tmp / "part").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "part"))
    assert (tmp_path / "checkpoint" / "training_state.pt").read_text() == "complete"
    assert not (tmp_path / "checkpoint.tmp").exists()  # the half-written copy gave its space back

    tracker = Tracker(tmp_path / "run", sft.Args(), step_key="step")
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(UserError, match=f"the disk holding {tmp_path / 'run'} is full"):
        tracker.log({"step": 1})
    monkeypatch.undo()

    def main(args):  # anything else that writes (the final model): the command line turns it into one line
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))

    monkeypatch.setattr("sys.argv", ["sft.py", "--output-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        cli(main, sft.Args)
    assert str(exit_info.value.code).startswith(f"error: the disk holding {tmp_path / 'run'} is full")


@pytest.mark.parametrize("script", ["ppo.py", "ppo_seq2seq.py", "sft.py", "reward.py", "ddpo.py", "grpo.py"])
def test_help_says_what_resume_and_overwrite_do(script):
    from conftest import run_script

    help_text = " ".join(run_script(script, "--help").stdout.replace("│", " ").split())  # tyro draws boxes
    assert "--overwrite" in help_text and "replace the run in --output-dir" in help_text
    assert "these may differ: --" in help_text and "--save-every" in help_text  # the flags a --resume may change
