"""Does reward.py learn as well with its exact shortcuts on (the defaults) as with each off?

    python benchmarks/reward_share_prefix.py --seeds 1-20                           # --share-prefix
    python benchmarks/reward_share_prefix.py --seeds 1-20 --flag trim-last-block    # --trim-last-block

Both give the scores and gradients of reading both whole texts plainly (tests/test_reward.py); what differs in
training is dropout. --share-prefix: the prompt draws one mask for both texts instead of one each.
--trim-last-block: the last block's MLP draws its mask at the scored tokens only. This trains the same GPT-2
classifier (the assets' tiny/policy) on IMDB preference pairs after a shared prompt (17 tokens of the assets'
tokenizer), with the flag on and off, for each seed, and prints the held-out accuracy and loss of both and their
paired difference.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import reward  # noqa: E402
from benchmarks.seed_sweep import seeds_from  # noqa: E402
from utils.assets import build, write_jsonl  # noqa: E402
from utils.data import imdb, sentiment_pairs  # noqa: E402

PROMPT = "Here is a movie review; is it a positive one? Review: "


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1-20")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--flag", choices=["share-prefix", "trim-last-block"], default="share-prefix")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "reward_share_prefix"))
    a = p.parse_args()
    torch.set_num_threads(1)
    assets, work = build(), Path(a.workdir)
    pairs = sentiment_pairs(imdb("train", assets), 1250, seed=7, max_words=100)
    write_jsonl(work / "train.jsonl", [{"prompt": PROMPT, **x} for x in pairs[:1000]])
    write_jsonl(work / "test.jsonl", [{"prompt": PROMPT, **x} for x in pairs[1000:]])
    results = {True: [], False: []}
    field = a.flag.replace("-", "_")
    for seed in seeds_from(a.seeds):
        for on in (True, False):
            # texts cut on the right: each keeps its prompt (cut on the left, 64-token texts would lose it)
            metrics_path = reward.main(reward.Args(
                model=str(assets / "policy"), dataset=str(work / "train.jsonl"), eval_dataset=str(work / "test.jsonl"),
                truncation_side="right", max_seq_length=64, max_steps=a.steps, batch_size=16, learning_rate=1e-3,
                eval_every=0, save_every=10**6, seed=seed, overwrite=True, **{field: on},
                output_dir=str(work / f"seed{seed}-{a.flag}-{'on' if on else 'off'}")))
            last = [json.loads(line) for line in open(metrics_path)][-1]
            results[on].append((last["eval/accuracy"], last["eval/loss"]))
        (acc_s, loss_s), (acc_w, loss_w) = results[True][-1], results[False][-1]
        print(f"seed {seed}: held-out accuracy {acc_s:.3f} on / {acc_w:.3f} off, "
              f"loss {loss_s:.3f} / {loss_w:.3f}", flush=True)
    for on, name in ((True, f"--{a.flag}"), (False, f"--no-{a.flag}")):
        acc, loss = zip(*results[on])
        print(f"{name}: accuracy mean {statistics.mean(acc):.3f} median {statistics.median(acc):.3f} "
              f"min {min(acc):.3f}; loss mean {statistics.mean(loss):.3f} median {statistics.median(loss):.3f}")
    diff = [s[0] - w[0] for s, w in zip(results[True], results[False])]
    print(f"paired accuracy difference (on - off): mean {statistics.mean(diff):+.3f}, "
          f"on higher on {sum(d > 0 for d in diff)} of {len(diff)} seeds")


if __name__ == "__main__":
    main()
