"""Tests of ddpo.py: the DDIM step and its log-probability against diffusers and torch.distributions, the per-prompt
stat tracker by hand, the rewards, bad input, end-to-end runs on the tiny offline pipelines (save, reload with
diffusers, resume), 2 processes under torchrun against one, and learning (marked slow: images trained to be
brighter end brighter than images trained to be darker, from the same seed)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load_file

import ddpo
from conftest import learning_seed, record_learning, torchrun
from utils import tiny_sd
from utils.hub import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_model():
    """The tiny Stable-Diffusion-like pipeline (and tiny/sd-uncond beside it), built once and cached on disk.
    Checked per test (a stat when cached): `python -m utils.assets` replaces the whole tiny/ folder."""
    return str(tiny_sd.build(ROOT / "tiny" / "sd"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run many small ops, where thread synchronisation dominates: one thread is as fast, and
    does not slow down tenfold on a busy machine (with two, every op waits for a descheduled worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_ddpo(*flags, timeout=300):
    return subprocess.run([sys.executable, "ddpo.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1"})


def tiny_args(model, out, **overrides) -> ddpo.Args:
    """Smallest useful run: 2 epochs of 4 images, 4 DDIM steps, CFG on, LoRA (the defaults' code paths)."""
    kw = dict(model=model, output_dir=str(out), num_epochs=2, num_steps=4, sample_batch_size=4,
              num_batches_per_epoch=2, train_batch_size=2, gradient_accumulation_steps=2, stat_min_count=2,
              stat_buffer_size=4, prompts=str(write_prompts(Path(out).parent / "prompts.txt", ["cat", "dog"])))
    return ddpo.Args(**(kw | overrides))


def write_prompts(path: Path, prompts) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p + "\n" for p in prompts))
    return path


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# The DDIM step and its log-probability
# ---------------------------------------------------------------------------------------------------------
def make_scheduler(num_steps=10, **config):
    scheduler = DDIMScheduler(**(tiny_sd.SD_SCHEDULE | config))
    scheduler.set_timesteps(num_steps)
    return scheduler


def random_step_inputs(scheduler, seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    n = len(scheduler.timesteps)
    steps = torch.tensor([0, n // 2, n - 1])[:batch]  # first, middle, last step of the chain
    return (torch.randn(batch, 4, 8, 8, generator=g), scheduler.timesteps[steps],
            torch.randn(batch, 4, 8, 8, generator=g))


def generators(n, seed=0):
    """One CPU generator per sample, as ddpo.py draws the noise."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("eta", [1.0, 0.3])
@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction"}, {"clip_sample": True},
                                    {"set_alpha_to_one": True}])
def test_step_matches_diffusers_ddim(eta, config):
    """Same noise in, same x_{t-1} out as diffusers' DDIMScheduler.step, per sample (timesteps differ in the batch)."""
    scheduler = make_scheduler(**config)
    model_output, timesteps, sample = random_step_inputs(scheduler)
    prev_sample, _ = ddpo.ddim_step_with_logprob(scheduler, model_output, timesteps, sample, eta,
                                                 generators=generators(3, seed=7))
    noise = torch.stack([torch.randn(sample.shape[1:], generator=g) for g in generators(3, seed=7)])
    for i, t in enumerate(timesteps.tolist()):
        expected = scheduler.step(model_output[i : i + 1], t, sample[i : i + 1], eta=eta,
                                  variance_noise=noise[i : i + 1]).prev_sample
        torch.testing.assert_close(prev_sample[i : i + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_logprob_equals_independent_gaussian_density(eta):
    """log p(x_{t-1} | x_t) = mean over dims of Normal(μ, σ).log_prob(x_{t-1}), with μ from diffusers' step without
    noise and σ = η sqrt(variance) from diffusers' own _get_variance."""
    scheduler = make_scheduler()
    model_output, timesteps, sample = random_step_inputs(scheduler)
    prev_sample = sample + 0.1 * torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))
    _, log_prob = ddpo.ddim_step_with_logprob(scheduler, model_output, timesteps, sample, eta, prev_sample=prev_sample)
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    for i, t in enumerate(timesteps.tolist()):
        mean = scheduler.step(model_output[i : i + 1], t, sample[i : i + 1], eta=eta,
                              variance_noise=torch.zeros_like(sample[i : i + 1])).prev_sample
        std = eta * scheduler._get_variance(t, t - step) ** 0.5
        expected = torch.distributions.Normal(mean, std).log_prob(prev_sample[i : i + 1]).mean()
        torch.testing.assert_close(log_prob[i], expected, atol=1e-5, rtol=1e-6)


def test_logprob_of_own_sample_and_gradient_through_mean_only():
    scheduler = make_scheduler()
    model_output, timesteps, sample = random_step_inputs(scheduler)
    model_output.requires_grad_(True)
    prev_sample, log_prob = ddpo.ddim_step_with_logprob(scheduler, model_output, timesteps, sample, 1.0,
                                                        generators=generators(3))
    assert log_prob.shape == (3,) and torch.isfinite(log_prob).all()
    log_prob.sum().backward()  # x_{t-1} is detached inside: the gradient reaches ε only through μ
    assert model_output.grad.abs().sum() > 0


def test_last_step_with_alpha_one_is_deterministic_and_not_trained():
    """set_alpha_to_one=True: ᾱ after the last step is 1, so σ = 0 there: x_{t-1} = x̂_0, log-prob 0 (no NaN), and
    the step is excluded from training. With SD's schedule (False) the last step stays stochastic."""
    scheduler = make_scheduler(set_alpha_to_one=True)
    stds = ddpo.ddim_std(*ddpo.ddim_alphas(scheduler, scheduler.timesteps), 1.0)
    assert stds[-1] == 0 and (stds[:-1] > 0).all()
    model_output, timesteps, sample = random_step_inputs(scheduler)
    prev_sample, log_prob = ddpo.ddim_step_with_logprob(scheduler, model_output, timesteps, sample, 1.0,
                                                        generators=generators(3))
    assert log_prob[-1] == 0 and torch.isfinite(prev_sample).all()
    expected = scheduler.step(model_output[-1:], timesteps[-1].item(), sample[-1:], eta=1.0).pred_original_sample
    torch.testing.assert_close(prev_sample[-1:], expected, atol=1e-5, rtol=1e-5)
    sd_scheduler = make_scheduler()
    assert (ddpo.ddim_std(*ddpo.ddim_alphas(sd_scheduler, sd_scheduler.timesteps), 1.0) > 0).all()


def test_policy_loss_clips_like_ppo():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, clipfrac, ratio_mean, _ = ddpo.policy_loss(new, old, advantages, cliprange=0.2)
    # per sample max(-A r, -A clip(r)): -1, -1.2 (clipped), -0.5, 1.5 -> mean -0.3; clipping active on sample 2 only
    torch.testing.assert_close(loss, torch.tensor(-0.3))
    assert clipfrac.item() == 0.25 and abs(ratio_mean.item() - 1.125) < 1e-6


def test_exact_div_is_the_one_copy_in_utils():
    """Plumbing has one copy (utils/runtime.py) that every script imports."""
    import ppo
    from utils.runtime import exact_div

    assert ddpo.exact_div is ppo.exact_div is exact_div


# ---------------------------------------------------------------------------------------------------------
# Advantages and rewards
# ---------------------------------------------------------------------------------------------------------
def test_per_prompt_stat_tracker_by_hand():
    tracker = ddpo.PerPromptStatTracker(buffer_size=4, min_count=3)
    std_135 = np.sqrt(8 / 3)  # population std of (1, 3, 5) and of (5, 7, 9)
    # epoch 1: no prompt has 3 rewards yet -> batch statistics (mean 3)
    adv = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    np.testing.assert_allclose(adv, [-2 / std_135, 0, 2 / std_135], rtol=1e-5)
    # epoch 2: a's buffer is (1, 3, 5, 7): its own mean 4, std sqrt(5); b has 2 < 3 -> batch stats (mean 7)
    adv = tracker.update(["a", "a", "b"], torch.tensor([5.0, 7.0, 9.0]))
    np.testing.assert_allclose(adv, [1 / np.sqrt(5), 3 / np.sqrt(5), 2 / std_135], rtol=1e-5)
    # epoch 3: the buffer keeps the last 4 rewards: (3, 5, 7, 1), mean 4, std sqrt(5)
    adv = tracker.update(["a"], torch.tensor([1.0]))
    assert tracker.buffers["a"] == [3.0, 5.0, 7.0, 1.0]
    np.testing.assert_allclose(adv, [-3 / np.sqrt(5)], rtol=1e-5)


def test_jpeg_rewards_order_flat_and_noise_images():
    flat = Image.new("RGB", (64, 64), (120, 130, 140))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    compress = ddpo.jpeg_compressibility([flat, noise], ["", ""])
    incompress = ddpo.jpeg_incompressibility([flat, noise], ["", ""])
    assert compress[0] > compress[1] and incompress[0] < incompress[1]
    assert compress == [-x for x in incompress] and 0.3 < incompress[0] < 2 < incompress[1]  # kB


def test_reward_fn_from_file_and_checks(tmp_path):
    (tmp_path / "my_reward.py").write_text("import numpy as np\n"
                                           "def brightness(images, prompts):\n"
                                           "    return [np.asarray(im.convert('L')).mean() / 255 for im in images]\n"
                                           "def wrong_length(images, prompts):\n    return [1.0]\n")
    images = [Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8), (0, 0, 0))]
    fn = ddpo.load_reward_fn(ddpo.Args(reward_fn=f"{tmp_path}/my_reward.py:brightness"), "cpu")
    assert ddpo.call_reward_fn(fn, 2, "test", images, ["a", "b"]).tolist() == [1.0, 0.0]
    bad = ddpo.load_reward_fn(ddpo.Args(reward_fn=f"{tmp_path}/my_reward.py:wrong_length"), "cpu")
    with pytest.raises(UserError, match="returned 1 scores for 2 samples"):
        ddpo.call_reward_fn(bad, 2, "test", images, ["a", "b"])
    with pytest.raises(UserError, match="has no function"):
        ddpo.load_reward_fn(ddpo.Args(reward_fn=f"{tmp_path}/my_reward.py:nope"), "cpu")


def tiny_aesthetic_args(folder: Path, **overrides) -> ddpo.Args:
    """Args of the aesthetic reward with a tiny random CLIP and MLP saved in `folder` (the real ones need the hub)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=tower, vision_config=tower | dict(image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(config).save_pretrained(folder / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder / "clip")
    dims = [8, 1024, 128, 64, 16, 1]
    layers = [0, 2, 4, 6, 7]  # the Linear layers of the reference's nn.Sequential (Dropouts between)
    torch.save({f"layers.{n}.{k}": v for n, (i, o) in zip(layers, zip(dims, dims[1:]))
                for k, v in torch.nn.Linear(i, o).state_dict().items()}, folder / "mlp.pth")
    return ddpo.Args(reward_fn="aesthetic", aesthetic_clip=str(folder / "clip"), aesthetic_mlp=str(folder / "mlp.pth"),
                     **overrides)


def test_aesthetic_reward_with_local_weights(tmp_path):
    """The aesthetic path with a tiny random CLIP and MLP saved locally (the real ones need the hub)."""
    fn = ddpo.load_reward_fn(tiny_aesthetic_args(tmp_path), "cpu")
    scores = ddpo.call_reward_fn(fn, 2, "test", [Image.new("RGB", (40, 40), (200, 0, 0)), Image.new("RGB", (40, 40))],
                                 ["a", "b"])
    assert scores.shape == (2,) and scores[0] != scores[1]


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear line, early
# ---------------------------------------------------------------------------------------------------------
def test_bad_input_errors(tiny_model, tmp_path):
    with pytest.raises(UserError, match="not a built-in .*aesthetic"):
        ddpo.main(ddpo.Args(model=tiny_model, reward_fn="jpeg-smallness", output_dir=str(tmp_path)))
    with pytest.raises(UserError, match="has no prompts"):
        ddpo.main(ddpo.Args(model=tiny_model, prompts=str(write_prompts(tmp_path / "empty.txt", ["", "  "])),
                            output_dir=str(tmp_path)))
    with pytest.raises(UserError, match="no text encoder"):
        ddpo.main(ddpo.Args(model=tiny_model + "-uncond", output_dir=str(tmp_path)))
    with pytest.raises(UserError, match="not divisible"):
        ddpo.main(ddpo.Args(model=tiny_model, sample_batch_size=3, num_batches_per_epoch=1, output_dir=str(tmp_path)))


def test_images_do_not_depend_on_how_the_batch_is_split(tiny_model):
    """Each image's noise comes from its own generator: 4 images in one batch == the same 4 in two batches of 2 (as
    on 2 processes); what the 2-process tests below rely on. Equal up to float32 rounding, not bit for bit: the
    batch shape changes the order in which the kernels sum (seen: identical on one CPU, up to 1.9e-5 apart on an
    AVX-512 one). Other noise for an image (a shared or mis-indexed generator) moves the latents by O(1)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_model)
    scheduler = make_scheduler(num_steps=3)
    args, prompts, cpu = ddpo.Args(guidance_scale=5.0), ["cat", "dog", "dog", "cat"], torch.device("cpu")
    negative_embeds = ddpo.encode_prompts(pipe, [""], cpu)

    def sample(indices):
        embeds = ddpo.encode_prompts(pipe, [prompts[i] for i in indices], cpu)
        generators = [ddpo.make_generator(0, 3, "noise", i) for i in indices]
        return ddpo.sample_trajectories(pipe, scheduler, embeds, negative_embeds, args, generators, cpu)

    whole, halves = sample(range(4)), (sample(range(2)), sample(range(2, 4)))
    for one, split in zip(whole, zip(*halves)):
        torch.testing.assert_close(torch.cat(split), one, rtol=1e-4, atol=1e-4)
    assert not torch.equal(whole[0][0], whole[0][3])  # distinct noise per image


def test_batch_sizes_are_global_and_split_over_processes():
    args = ddpo.check_args(ddpo.Args(sample_batch_size=8, num_batches_per_epoch=2, train_batch_size=4), world_size=4)
    assert (args.world_size, args.samples_per_epoch, args.local_samples_per_epoch) == (4, 16, 4)
    assert (args.local_sample_batch_size, args.local_train_batch_size) == (2, 1)
    assert ddpo.check_args(ddpo.Args()).local_sample_batch_size == ddpo.Args().sample_batch_size  # one process
    with pytest.raises(UserError, match=r"--sample-batch-size \(over all processes\) / number of processes: 8 is not"):
        ddpo.check_args(ddpo.Args(sample_batch_size=8, train_batch_size=4), world_size=3)
    with pytest.raises(UserError, match=r"--train-batch-size \(over all processes\) / number of processes: 2 is not"):
        ddpo.check_args(ddpo.Args(sample_batch_size=8, train_batch_size=2), world_size=4)


def test_cli_errors_are_one_line_and_fast(tiny_model, tmp_path):
    result = run_ddpo("--model", tiny_model, "--eta", "0", "--output-dir", str(tmp_path))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: --eta 0.0")
    assert "Traceback" not in result.stderr
    start = time.perf_counter()
    result = run_ddpo("--model", "runwayml/stable-diffusion-v1-5", "--output-dir", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --model 'runwayml/stable-diffusion-v1-5'")
    assert time.perf_counter() - start < 60  # offline: fails after a 3 s probe, not after minutes of retries


# ---------------------------------------------------------------------------------------------------------
# End to end on the tiny pipelines
# ---------------------------------------------------------------------------------------------------------
def test_end_to_end_lora_cfg_saves_and_reloads(tiny_model, tmp_path):
    """As a user runs it: LoRA + classifier-free guidance; the LoRA file loads into the pipeline with diffusers."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    result = run_ddpo("--model", tiny_model, "--output-dir", str(out), "--num-epochs", "2", "--num-steps", "4",
                      "--sample-batch-size", "4", "--num-batches-per-epoch", "2", "--train-batch-size", "2",
                      "--reward", "jpeg-incompressibility", "--learning-rate", "1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch    2 | reward" in result.stdout and "done: model in" in result.stdout
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["losses/policy_loss"]) and r["objective/scores"] > 0 for r in rows)
    assert (out / "samples" / "epoch_0002.png").exists() and (out / "checkpoint" / "training_state.pt").exists()

    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    tuned = StableDiffusionPipeline.from_pretrained(tiny_model)
    tuned.load_lora_weights(out)
    latents, t, embeds = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert not torch.allclose(base.unet(latents, t, embeds).sample, tuned.unet(latents, t, embeds).sample)
    image = tuned(["cat"], num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_resume_continues_exactly(tiny_model, tmp_path):
    """2 epochs straight == 1 epoch, then --resume for the second (optimizer and stat buffers restored; the random
    draws are seeded from (seed, epoch), so there is no RNG state to restore)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    ddpo.main(tiny_args(tiny_model, straight))
    ddpo.main(tiny_args(tiny_model, split, num_epochs=1))
    ddpo.main(tiny_args(tiny_model, split, resume=True))
    a, b = metrics(straight), metrics(split)
    assert [r["epoch"] for r in b] == [1, 2]
    for key in ("objective/scores", "losses/policy_loss", "losses/approx_kl"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-5, abs=1e-12), key


def test_unconditional_full_unet_ema_custom_reward(tiny_model, tmp_path):
    """A model without text encoder (guidance 1), full UNet training with EMA, a reward function from a file;
    the output folder is a complete pipeline that diffusers loads, with the EMA weights."""
    from diffusers import DiffusionPipeline

    (tmp_path / "reward.py").write_text("import numpy as np\n"
                                        "def darkness(images, prompts):\n"
                                        "    return [-np.asarray(im.convert('L')).mean() / 255 for im in images]\n")
    out = tmp_path / "run"
    ddpo.main(tiny_args(tiny_model + "-uncond", out, guidance_scale=1.0, lora_r=0, ema_decay=0.5,
                        reward_fn=f"{tmp_path}/reward.py:darkness", learning_rate=1e-3))
    pipe = DiffusionPipeline.from_pretrained(out)
    base = DiffusionPipeline.from_pretrained(tiny_model + "-uncond")
    assert type(pipe).__name__ == "DDPMPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    changed = [not torch.equal(p, q) for p, q in zip(pipe.unet.parameters(), base.unet.parameters())]
    assert any(changed)


# ---------------------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo on CPU) against one
# ---------------------------------------------------------------------------------------------------------
# A run whose update does not depend on how the samples are shuffled or split between processes: one optimizer
# step per PPO pass covers all of the epoch's samples (train batch 4 x 2 accumulated = 8 images) and every
# stochastic step is trained, so the gradient is the mean over all (sample, step) pairs in any order. Each image's
# noise has its own generator, so both runs sample the same images; DDP then has to average the two processes'
# gradients into the single-process one (2 PPO passes: the second starts from updated weights, ratio != 1), and the
# advantages have to come from both processes' rewards.
DDP_RUN = dict(num_steps=4, sample_batch_size=4, num_batches_per_epoch=2, train_batch_size=4,
               gradient_accumulation_steps=2, ppo_epochs=2, learning_rate=1e-2, stat_min_count=2, stat_buffer_size=4)


def cli_flags(**kw) -> list[str]:
    return [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The same 2-epoch run in 2 CPU processes under torchrun and in one process: (folder of the 2-process run, its
    launcher's stdout, folder of the 1-process run)."""
    root, model = tmp_path_factory.mktemp("ddp"), str(tiny_sd.build(ROOT / "tiny" / "sd"))
    two, one = (tiny_args(model, root / name, num_epochs=2, **DDP_RUN) for name in ("two", "one"))
    proc = torchrun("ddpo.py", *cli_flags(model=model, output_dir=two.output_dir, prompts=two.prompts, num_epochs=2,
                                          **DDP_RUN))
    ddpo.main(one)
    return root / "two", proc.stdout, root / "one"


# Relative tolerances of the metrics of two runs that differ only in float rounding (the same gradient summed in
# another order). Rewards: the same images, so the same JPEG sizes (equal in every run here). Losses, ratio, grad
# norm: largest difference seen 1.5e-6. approx_kl = 0.5 mean (log ratio)^2 with log ratios ~3e-3 that are differences
# of nearly equal fp32 log-probs: 4.4e-5 seen. clipfrac counts (sample, step) pairs: one pair of 32 may change sides.
METRIC_TOLERANCES = {"objective/scores": 1e-6, "objective/scores_std": 1e-6, "losses/policy_loss": 1e-5,
                     "losses/ratio_mean": 1e-5, "losses/grad_norm": 1e-5, "losses/approx_kl": 1e-3}


def assert_same_metrics(rows, expected):
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected]
    for row, ref in zip(rows, expected):
        for key, rel in METRIC_TOLERANCES.items():
            assert row[key] == pytest.approx(ref[key], rel=rel), (row["epoch"], key, row[key], ref[key])
        assert row["losses/clipfrac"] == pytest.approx(ref["losses/clipfrac"], abs=1 / 32 + 1e-9), row["epoch"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(ddp_runs):
    """2 processes == 1 process with the same global batch: the reward statistics and the per-prompt stat buffers
    (computed from both processes' rewards), the losses and gradient norms (reduced over the processes), and the
    trained LoRA weights. Only the first process printed and wrote."""
    two, stdout, one = ddp_runs
    assert_same_metrics(metrics(two), metrics(one))
    assert metrics(two)[1]["losses/approx_kl"] > 0  # the second PPO pass trained off the sampling policy
    state, state_one = (torch.load(out / "checkpoint" / "training_state.pt", weights_only=True) for out in (two, one))
    assert state["stat_buffers"] == state_one["stat_buffers"] and len(state["stat_buffers"]["cat"]) == 4
    # Adam steps by ~lr x sign(gradient): where a gradient is ~0 rounding can flip it, so compare the whole vector
    # (2.8e-5 relative seen; 2 of 15,360 weights differ by more than 1e-5, at most 1.8e-4 with lr 1e-2)
    weights, weights_one = (load_file(out / "pytorch_lora_weights.safetensors") for out in (two, one))
    w, w_one = (torch.cat([ws[k].flatten() for k in sorted(weights_one)]) for ws in (weights, weights_one))
    assert (w - w_one).norm() < 1e-3 * w_one.norm()
    assert stdout.count("DDPO:") == stdout.count("epoch    2 |") == stdout.count("done: model in") == 1
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]


@pytest.mark.slow
def test_torchrun_run_resumes_in_one_process(ddp_runs, tmp_path):
    """The 2-process checkpoint holds no per-process state: resumed in one process for a third epoch, it continues
    as the 1-process run's checkpoint does (which continues as an uninterrupted run: test_resume_continues_exactly)."""
    two, _, one = ddp_runs
    resumed = {}
    for name, out in (("two", two), ("one", one)):
        shutil.copytree(out, tmp_path / name)
        prompts = json.loads((out / "args.json").read_text())["prompts"]  # the run's own (another file is refused)
        ddpo.main(tiny_args(str(tiny_sd.build(ROOT / "tiny" / "sd")), tmp_path / name, num_epochs=3, resume=True,
                            prompts=prompts, **DDP_RUN))
        resumed[name] = metrics(tmp_path / name)
    assert [r["epoch"] for r in resumed["two"]] == [1, 2, 3]
    assert_same_metrics(resumed["two"], resumed["one"])


# ---------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddpo_learns_to_brighten_or_darken_images(tiny_model, tmp_path):
    """DDPO on the tiny pipeline trained twice from the same seed, once to brighten its images (reward = mean pixel
    value) and once to darken them (its negative): both runs sample the same first epoch, and after 10 epochs of 64
    images the brightened images must be clearly brighter than the darkened ones. A detached loss leaves both runs
    identical (gap exactly 0); a flipped advantage sign trains each the wrong way (negative gap; checked by hand).
    Why this design: the tiny UNet's learning curves drift from seed to seed (Adam's steps are as large on noise as
    on signal): with 32 images an epoch jpeg-compressibility, the paper's task, rose by more than 0.03 kB on only
    3 of 10 seeds (range -0.019 to +0.091), brightness alone fell on 1 of 6 seeds, and this paired gap was
    negative on 2 of 12. With 64 images an epoch the gap was 0.019 to 0.086 on seeds 1-12 (median 0.057)."""
    gap = 0.0
    for reward in ("brightness", "darkness"):
        out = tmp_path / reward
        ddpo.main(ddpo.Args(model=tiny_model, output_dir=str(out), reward_fn=f"tests/rewards.py:{reward}",
                            num_epochs=10, num_steps=5, guidance_scale=1.0, sample_batch_size=64,
                            num_batches_per_epoch=1, train_batch_size=64, gradient_accumulation_steps=1, lora_r=0,
                            learning_rate=1e-3, save_every=100, seed=learning_seed(1)))
        scores = [r["objective/scores"] for r in metrics(out)]
        gap += (scores[-1] + scores[-2]) / 2  # brightness of one run's last two epochs, minus that of the other's
    record_learning("ddpo_brightness_gap", gap, 0.008)
    assert gap > 0.008, gap  # broken: <= 0; seeds 1-12 gave 0.019 to 0.086
