"""Reward functions used by the tests through `--reward-fn tests/rewards.py:NAME` (as a user would)."""


def letter_e_fraction(prompts, completions, completion_ids, **columns):
    """Fraction of the completion's characters that are the letter 'e': dense, and climbable only by a policy
    that really shifts probability towards e-heavy tokens."""
    return [c.count("e") / max(len(c), 1) for c in completions]


def nan_reward(prompts, completions, completion_ids):
    return [float("nan")] * len(completions)


def crashing_reward(prompts, completions, completion_ids):
    return [1 / 0 for _ in completions]


def short_completions(prompts, completions, completion_ids):
    """Minus the number of completion tokens: pushes towards early EOS."""
    return [-float(len(ids)) for ids in completion_ids]


def brightness(images, prompts):
    """Mean pixel value of each image in [0, 1] (DDPO's reward signature: PIL images and their prompts): a
    smooth reward every pixel contributes to, so a few epochs of DDPO on the tiny pipeline raise it clearly."""
    import numpy as np

    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


def darkness(images, prompts):
    """Minus brightness: the same task with the reward's sign flipped (what a flipped advantage would optimise)."""
    return [-b for b in brightness(images, prompts)]
