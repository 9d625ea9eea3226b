"""TRL side of benchmarks/compare_trl.py: runs one TRL trainer (PPO, SFT, reward, GRPO or DPO) on a config written by
compare_trl.py and writes timings to a JSON file. Runs inside the benchmark-only TRL venv, never in ours:

    /tmp/trlvenv/bin/python benchmarks/trl_runner.py CONFIG.json RESULT.json

(see compare_trl.py's docstring for how to create that venv). The config's keys are the hyperparameters that
compare_trl.py passes to our scripts too; this file only maps them onto TRL's names. Timers wrap TRL's own
module-level functions (generation, forwards, reward scoring) and the optimizer, so TRL's code runs unchanged;
the wrappers cost a `time.perf_counter()` call each.
"""

import json
import os
import sys
import time
from collections import defaultdict

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402


class Timers:
    """Accumulated seconds and call counts per label; `wrap` times a function under a label."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            key = label(*args, **kwargs) if callable(label) else label
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1

        return timed


def step_clock():
    """A TrainerCallback that records the wall-clock time at train begin and at each step's end, and every log."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.step_ends, self.logs = None, [], []
            self.cpu_begin, self.cpu_step_ends = None, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin, self.cpu_begin = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())
            self.cpu_step_ends.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    return Clock()


def iteration_seconds(clock, cpu: bool = False):
    """Wall (or process CPU) seconds of each step: train begin -> first step end, then step end to step end."""
    ends = [clock.cpu_begin] + clock.cpu_step_ends if cpu else [clock.begin] + clock.step_ends
    return [b - a for a, b in zip(ends, ends[1:])]


def count_optimizer_steps(optimizer, timers):
    """Count (and time) the steps the *inner* torch optimizer really takes (accelerate skips some)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.step = timers.wrap("optimizer_step", inner.step)


def count_tokens(trainer) -> list:
    """Wrap the trainer's collator to record the real (non-pad) tokens of each batch, in a list that fills as it
    trains (every attention mask of the batch summed; all ids if it has none)."""
    tokens, collator = [], trainer.data_collator

    def counting_collator(features):
        batch = collator(features)
        masks = [batch[k] for k in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask") if k in batch]
        tokens.append(int(sum(m.sum() for m in masks)) if masks else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    return tokens


def run_ppo(cfg):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    timers, gen_tokens, gen_seconds, widths = Timers(), [], [], []
    original_batch_generation = ppo_mod.batch_generation

    def batch_generation(model, queries, *args, **kwargs):
        start = time.perf_counter()
        query_responses, logits = original_batch_generation(model, queries, *args, **kwargs)
        gen_seconds.append(time.perf_counter() - start)
        timers.seconds["generate"] += gen_seconds[-1]
        timers.calls["generate"] += 1
        width = query_responses.shape[1] - queries.shape[1]
        gen_tokens.append(query_responses.shape[0] * width)
        widths.append(width)
        return query_responses, logits

    ppo_mod.batch_generation = batch_generation
    ppo_mod.forward = timers.wrap(lambda *a, **k: "forward_train" if torch.is_grad_enabled() else "forward_ref",
                                  ppo_mod.forward)
    value_models = []  # get_reward serves both the value model (rollout values) and the reward model (scores)
    ppo_mod.get_reward = timers.wrap(lambda model, *a, **k: "value_rollout" if model in value_models else "reward",
                                     ppo_mod.get_reward)

    tokenizer = AutoTokenizer.from_pretrained(cfg["policy"], padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token  # TRL needs a pad token; masks are then `ids != pad`
    policy = AutoModelForCausalLM.from_pretrained(cfg["policy"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(cfg["reward_model"], num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(cfg["reward_model"], num_labels=1)
    value_models.append(value_model)
    prompts = [json.loads(line)["input_ids"] for line in open(cfg["prompts_ids"])]
    dataset = Dataset.from_dict({"input_ids": prompts})

    micro = cfg["mini_batch_size"] // cfg["gradient_accumulation_steps"]
    if cfg["mini_batch_size"] != cfg["batch_size"]:
        # TRL 1.12 steps the optimizer every `gradient_accumulation_steps` micro-batches, and its rollout batch is
        # per_device_train_batch_size * gradient_accumulation_steps, so it steps once per batch whatever
        # num_mini_batches says: with mini-batch < batch it would take fewer optimizer steps than ppo.py
        # (huggingface/trl#5645; checked here: batch 64, 2 mini-batches, 4 epochs -> 4 steps, not 8).
        raise SystemExit("trl_runner: TRL's PPOTrainer only matches ppo.py with --mini-batch-size == --batch-size")
    config = PPOConfig(
        output_dir=cfg["output_dir"], report_to="none", seed=cfg["seed"], bf16=False, fp16=False,
        gradient_checkpointing=cfg.get("trl_gradient_checkpointing", False),
        per_device_train_batch_size=micro, gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        num_mini_batches=cfg["batch_size"] // cfg["mini_batch_size"], num_ppo_epochs=cfg["ppo_epochs"],
        total_episodes=cfg["batch_size"] * cfg["iterations"], local_rollout_forward_batch_size=cfg["batch_size"],
        response_length=cfg["response_length"], temperature=cfg["temperature"], stop_token=None,
        missing_eos_penalty=None, learning_rate=cfg["learning_rate"], lr_scheduler_type="constant",
        kl_coef=cfg["kl_coef"], kl_estimator="k1", cliprange=cfg["cliprange"], cliprange_value=cfg["cliprange_value"],
        vf_coef=cfg["vf_coef"], gamma=cfg["gamma"], lam=cfg["lam"], whiten_rewards=False,
        num_sample_generations=0, save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=cfg["device"] == "cpu",
    )
    clock = step_clock()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         callbacks=[clock])
    count_optimizer_steps(trainer.optimizer, timers)
    backward = trainer.accelerator.backward
    trainer.accelerator.backward = timers.wrap("backward", backward)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    logs = [log for log in clock.logs if "objective/scores" in log]
    return {
        "iteration_s": iteration_seconds(clock), "iteration_cpu_s": iteration_seconds(clock, cpu=True),
        "train_s": train_s,
        "generate_s": gen_seconds, "generated_tokens": gen_tokens, "response_widths": widths,
        "scores": [log["objective/scores"] for log in logs], "kl": [log["objective/kl"] for log in logs],
        "optimizer_steps": timers.calls["optimizer_step"],
        "breakdown_s": dict(timers.seconds), "breakdown_calls": dict(timers.calls),
        "n_params": {"policy": sum(p.numel() for p in policy.parameters()),
                     "value": sum(p.numel() for p in value_model.parameters())},
    }


def run_sft(cfg):
    """TRL's SFTTrainer on the same model, data, batch and sequence length as sft.py (see compare_trl.py)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(cfg["policy"])
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["policy"])
    texts = [json.loads(line)["text"] for line in open(cfg["dataset"])][: cfg["max_examples"]]
    dataset = Dataset.from_dict({"text": texts})
    config = SFTConfig(
        output_dir=cfg["output_dir"], report_to="none", seed=cfg["seed"], bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1, max_steps=cfg["steps"], learning_rate=cfg["learning_rate"],
        lr_scheduler_type="constant", max_length=cfg["max_seq_length"], packing=cfg["packing"],
        dataset_text_field="text", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=cfg["device"] == "cpu", eval_strategy="no",
        max_grad_norm=cfg["max_grad_norm"],
    )
    clock = step_clock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[clock])
    tokens = count_tokens(trainer)
    start = time.perf_counter()
    trainer.train()
    return {"iteration_s": iteration_seconds(clock), "train_s": time.perf_counter() - start, "tokens": tokens,
            "losses": [log["loss"] for log in clock.logs if "loss" in log]}


def run_reward(cfg):
    """TRL's RewardTrainer on the same model, preference pairs, batch and sequence length as reward.py."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(cfg["policy"])
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(cfg["policy"], num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = [json.loads(line) for line in open(cfg["dataset"])][: cfg["max_examples"]]
    # an explicit prompt: TRL prepends it to both texts, as reward.py does
    dataset = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected") if k in pairs[0]})
    config = RewardConfig(
        output_dir=cfg["output_dir"], report_to="none", seed=cfg["seed"], bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1, max_steps=cfg["steps"], learning_rate=cfg["learning_rate"],
        lr_scheduler_type="constant", max_length=cfg["max_seq_length"], save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=cfg["device"] == "cpu", eval_strategy="no",
        max_grad_norm=cfg["max_grad_norm"], disable_dropout=cfg.get("disable_dropout", True),  # as reward.py
    )
    clock = step_clock()
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[clock])
    tokens = count_tokens(trainer)
    start = time.perf_counter()
    trainer.train()
    return {"iteration_s": iteration_seconds(clock), "train_s": time.perf_counter() - start, "tokens": tokens,
            "losses": [log["loss"] for log in clock.logs if "loss" in log]}


def run_dpo(cfg):
    """TRL's DPOTrainer on the same model, pairs, batch, max length, beta and optimizer settings as dpo.py (sigmoid
    loss, live reference copy, dropout off as both default)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(cfg["policy"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["policy"])
    pairs = [json.loads(line) for line in open(cfg["dataset"])][: cfg["max_examples"]]
    dataset = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")})
    config = DPOConfig(
        output_dir=cfg["output_dir"], report_to="none", seed=cfg["seed"], bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=cfg["batch_size"], gradient_accumulation_steps=1,
        max_steps=cfg["steps"], learning_rate=cfg["learning_rate"], lr_scheduler_type="constant",
        max_length=cfg["max_seq_length"], save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=cfg["device"] == "cpu", eval_strategy="no",
        max_grad_norm=cfg["max_grad_norm"], beta=cfg["beta"], loss_type=["sigmoid"],
    )
    clock = step_clock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[clock])
    tokens = count_tokens(trainer)
    start = time.perf_counter()
    trainer.train()
    return {"iteration_s": iteration_seconds(clock), "train_s": time.perf_counter() - start, "tokens": tokens,
            "losses": [log["loss"] for log in clock.logs if "loss" in log]}


def run_grpo(cfg):
    """TRL's GRPOTrainer on the same model, problems, G, lengths, batch, loss and optimizer settings as grpo.py (see
    compare_trl.py's compare_grpo); the reward is the same accuracy check (utils.rewards.reward_accuracy)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, cfg["root"])
    from utils.rewards import reward_accuracy

    def accuracy(prompts, completions, answer, **kwargs):
        return reward_accuracy(prompts, completions, None, answer)

    tokenizer = AutoTokenizer.from_pretrained(cfg["policy"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["policy"])
    rows = [json.loads(line) for line in open(cfg["dataset"])]
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})
    completions_per_step = cfg["prompts_per_step"] * cfg["num_generations"]
    config = GRPOConfig(
        output_dir=cfg["output_dir"], report_to="none", seed=cfg["seed"], bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=cfg["device"] == "cpu", dataloader_num_workers=0,
        per_device_train_batch_size=completions_per_step // cfg["gradient_accumulation_steps"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"], num_generations=cfg["num_generations"],
        max_completion_length=cfg["max_completion_length"], temperature=cfg["temperature"], top_k=0, top_p=1.0,
        loss_type=cfg["loss_type"], scale_rewards=cfg["scale_rewards"], beta=cfg["beta"], epsilon=cfg["epsilon"],
        num_iterations=cfg["num_iterations"], learning_rate=cfg["learning_rate"], lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, max_steps=cfg["steps"], logging_steps=1, save_strategy="no",
        disable_tqdm=True, eval_strategy="no", log_completions=False,
    )
    clock = step_clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    trainer.save_model(cfg["output_dir"])
    tokenizer.save_pretrained(cfg["output_dir"])
    return {"iteration_s": iteration_seconds(clock), "train_s": train_s,
            "rewards": [log["reward"] for log in clock.logs if "reward" in log]}


def main():
    cfg_path, result_path = sys.argv[1], sys.argv[2]
    cfg = json.load(open(cfg_path))
    torch.manual_seed(cfg["seed"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    import trl

    result = {"ppo": run_ppo, "sft": run_sft, "reward": run_reward, "grpo": run_grpo, "dpo": run_dpo}[cfg["task"]](cfg)
    result.update(trl_version=trl.__version__, torch_version=torch.__version__,
                  torch_threads=torch.get_num_threads())
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
