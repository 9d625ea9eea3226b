"""Reward sources of the language-model scripts: a sequence classifier that scores decoded text with its own
tokenizer (--reward-model), Python functions (--reward-fn: built-ins or the user's file.py:function), their
weighted sum, and the checks that make a user's mistake one clear line. How a score becomes the algorithm's reward
(KL shaping, normalisation, advantages) is in each script; nothing here is part of an algorithm."""

import functools
import importlib
import importlib.util
import re
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from utils.hub import UserError, check_tokenizer, from_pretrained
from utils.models import fuse_gelu
from utils.runtime import autocast


@functools.cache
def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def reward_vader(prompts, completions, completion_ids, **columns):
    """VADER compound sentiment of the completion, in [-1, 1] (a rule-based sentiment judge)."""
    return [vader().polarity_scores(c)["compound"] for c in completions]


def reward_length(prompts, completions, completion_ids, **columns):
    """Number of completion tokens (rewards long answers; try it with --missing-eos-penalty)."""
    return [float(len(ids)) for ids in completion_ids]


REWARD_FUNCTIONS = {"vader": reward_vader, "length": reward_length}


# Verifiable rewards (grpo.py): a program checks the answer. The dataset's `answer` column comes as a keyword.
ANSWER_MARKERS = (re.compile(r"####\s*(.+?)\s*$", re.S), re.compile(r"\\boxed\{([^{}]*)\}"))
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a text: after the last '####' (GSM8K's marker), else the last \\boxed{...}, else the
    last number; None if there is none. Numbers lose their thousands commas and trailing '.0' ("1,000.0" -> "1000")."""
    for marker in ANSWER_MARKERS:
        found = marker.findall(text)
        if found:
            return normalise_answer(found[-1])
    numbers = NUMBER.findall(text)
    return normalise_answer(numbers[-1]) if numbers else None


def normalise_answer(answer: str) -> str:
    answer = answer.strip().rstrip(".").replace(",", "")
    if NUMBER.fullmatch(answer) and "." in answer:
        answer = answer.rstrip("0").rstrip(".")
    return answer


def reward_accuracy(prompts, completions, completion_ids, answer, **columns):
    """1.0 where the completion's final answer equals the reference answer (itself extracted the same way, so a GSM8K
    solution "... #### 72" and a bare "72" both work), else 0.0."""
    return [float(extract_answer(c) is not None and extract_answer(c) == extract_answer(str(a)))
            for c, a in zip(completions, answer)]


def reward_format(prompts, completions, completion_ids, **columns):
    """1.0 where the completion ends with its answer: a number, optionally after '####', or a \\boxed{...}."""
    ending = re.compile(r"(?:####\s*)?(?:-?\d[\d,]*(?:\.\d+)?|\\boxed\{[^{}]*\})\s*$")
    return [float(bool(ending.search(c))) for c in completions]


VERIFIABLE_REWARDS = {"accuracy": reward_accuracy, "format": reward_format}


def reward_label_index(config, label: str) -> int:
    """Which logit of a multi-label classifier is the score: a label name (any case) or an index."""
    if config.num_labels == 1:
        return 0
    names = {str(v).lower(): int(k) for k, v in config.id2label.items()}
    if label.lower() in names:
        return names[label.lower()]
    if label.lstrip("-").isdigit() and -config.num_labels <= int(label) < config.num_labels:
        return int(label) % config.num_labels
    raise UserError(f"--reward-label {label!r} is not a label of the reward model, whose labels are "
                    f"{dict(config.id2label)}; pass one of those names or an index")


@torch.no_grad()
def score_with_model(reward_model, reward_tokenizer, texts, label_index: int, batch_size: int, device):
    """Score texts with a sequence classifier (its own tokenizer: we pass decoded text, never policy ids)."""
    scores = []
    for i in range(0, len(texts), batch_size):
        enc = reward_tokenizer(texts[i : i + batch_size], padding=True, truncation=True, return_tensors="pt")
        with autocast(device):
            logits = reward_model(**enc.to(device)).logits  # shape: [batch, num_labels]
        scores.append(logits[:, label_index].float().cpu())
    return torch.cat(scores)


def load_function(spec: str, flag: str, builtins: dict) -> Callable:
    """A function named `spec`: a key of `builtins`, `path/to/file.py:function` or `package.module:function`."""
    if spec in builtins:
        return builtins[spec]
    if ":" not in spec:
        raise UserError(f"{flag} {spec!r}: not a built-in ({', '.join(builtins)}) "
                        "and not of the form path/to/file.py:function or module:function")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") and not Path(where).is_file():
        raise UserError(f"{flag} {spec!r}: no such file {where!r}")
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ModuleNotFoundError as err:
        if err.name and (where == err.name or where.startswith(err.name + ".")):  # the module itself is missing
            raise UserError(f"{flag} {spec!r}: module {where!r} not found") from None
        raise UserError(f"{flag} {spec!r}: importing {where} failed: {_user_error(err)}") from None
    except Exception as err:  # the user's own code failed while it was imported: show its error, not ours
        raise UserError(f"{flag} {spec!r}: importing {where} failed: {_user_error(err)}") from None
    if not callable(getattr(module, name, None)):
        raise UserError(f"{flag} {spec!r}: {where} has no function {name!r}")
    return getattr(module, name)


def _user_error(err: Exception) -> str:
    """'Error: message (file:line)' at the innermost frame of the user's code where `err` was raised."""
    if isinstance(err, SyntaxError):
        return f"SyntaxError: {err.msg} ({err.filename}:{err.lineno})"
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{where}"


def call_reward_fn(fn: Callable, n: int, where: str, *inputs, **columns) -> torch.Tensor:
    """Call a user's reward function on a batch of `n` samples and check that it returned one finite float
    per sample. Its own errors come back with its traceback and the batch (`where`) they happened on.
    columns: the dataset's other columns, one value per sample, as keyword arguments (grpo.py)."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        scores = fn(*inputs, **columns)
    except Exception as err:
        frames = traceback.format_exception(type(err), err, err.__traceback__.tb_next)  # drop this frame
        raise UserError(f"reward function {name} raised on the batch of {where}:\n{''.join(frames).rstrip()}") from None
    try:
        scores = torch.as_tensor([float(s) for s in scores], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise UserError(f"reward function {name} must return one float per sample ({err}), {where}") from None
    if len(scores) != n:
        raise UserError(f"reward function {name} returned {len(scores)} scores for {n} samples, {where}")
    if not torch.isfinite(scores).all():
        bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
        raise UserError(f"reward function {name} returned NaN/inf for samples {bad[:10]} of the batch of {where}")
    return scores


class RewardModel:
    """A sequence classifier (--reward-model) with its own tokenizer: it reads decoded text, never policy ids, so
    any policy tokenizer works. The score is the logit of --reward-label (the only one for 1-output models)."""

    def __init__(self, name: str, label: str, device, trust_remote_code: bool = False, dtype=torch.float32):
        remote = dict(trust_remote_code=trust_remote_code)
        self.model = from_pretrained(AutoModelForSequenceClassification, name, "--reward-model", dtype=dtype, **remote)
        self.model.to(device).eval()
        fuse_gelu(self.model)
        self.tokenizer = from_pretrained(AutoTokenizer, name, "--reward-model", **remote)
        check_tokenizer(self.tokenizer, self.model.config, "--reward-model")
        if self.model.config.pad_token_id is None:  # else the classifier may read its score at a pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.name, self.device = name, device
        self.label_index = reward_label_index(self.model.config, label)

    def __call__(self, texts: list[str], batch_size: int) -> torch.Tensor:
        scores = score_with_model(self.model, self.tokenizer, texts, self.label_index, batch_size, self.device)
        if not torch.isfinite(scores).all():
            raise UserError(f"--reward-model {self.name!r} returned NaN/inf scores")
        return scores


def load_reward_fns(specs: list[str], builtins: Optional[dict] = None) -> dict:
    """{spec: function} for each --reward-fn (imported now, so a bad one fails before any weights load)."""
    return {spec: load_function(spec, "--reward-fn", builtins or REWARD_FUNCTIONS) for spec in specs}


def total_reward(reward_model: Optional[RewardModel], reward_fns: dict, weights: Optional[list[float]],
                 model_texts, prompts, completions, completion_ids, batch_size: int, where: str, **columns):
    """Each source's scores and their weighted sum (weights in order: the reward model, then each function;
    default all 1). model_texts: what the reward model reads; the functions get (prompts, completions,
    completion_ids) with the ids as lists, and the dataset's other `columns` as keywords (grpo.py).
    Returns (scores [batch], {source: scores [batch]})."""
    completion_ids = [ids.tolist() if isinstance(ids, torch.Tensor) else list(ids) for ids in completion_ids]
    parts = {}
    if reward_model is not None:
        parts["reward_model"] = reward_model(model_texts, batch_size)
    for spec, fn in reward_fns.items():
        parts[spec] = call_reward_fn(fn, len(completions), where, prompts, completions, completion_ids, **columns)
    weights = weights or [1.0] * len(parts)
    return sum(w * part for w, part in zip(weights, parts.values())), parts


def check_reward_flags(reward_model: Optional[str], reward_fn: list, reward_weights: Optional[list]) -> Optional[str]:
    """At least one reward source and one weight per source; returns --reward-model with 'none' made None."""
    reward_model = None if reward_model in (None, "none", "") else reward_model
    n_rewards = (reward_model is not None) + len(reward_fn)
    if n_rewards == 0:
        raise UserError("no reward: give --reward-model, --reward-fn, or both (scores are added)")
    if reward_weights is not None and len(reward_weights) != n_rewards:
        raise UserError(f"--reward-weights has {len(reward_weights)} values for {n_rewards} rewards "
                        "(--reward-model, if any, then each --reward-fn)")
    return reward_model
