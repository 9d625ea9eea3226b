"""Run by tests/test_ppo_ddp.py under torchrun (2 CPU processes, gloo): each rank whitens and trains on its
half of a fixed batch, with DDP or FSDP; rank 0 saves what it got so the test can compare with one process on
the whole batch."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ppo  # noqa: E402
from utils.distributed import all_gather, distribute, finish, init_distributed  # noqa: E402


def fixed_batch():
    """A batch of 8 episodes with equal response lengths (so per-rank token means average to the global one)."""
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(1, 4000, (n,), generator=g) for n in (3, 5, 2, 7, 4, 4, 6, 1)]
    responses = [torch.randint(1, 4000, (6,), generator=g) for _ in range(8)]
    scores = torch.randn(8, generator=g)
    x, mask = torch.randn(4, 5, generator=g), (torch.rand(4, 5, generator=g) > 0.3).float()
    return queries, responses, scores, x, mask


def update(policy_dir, world_size, fsdp, queries, responses, scores):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(policy_dir)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    policy = ppo.PolicyAndValue(lm, lm.config.n_embd).eval()
    args = ppo.check_args(ppo.Args(batch_size=8, mini_batch_size=8, total_episodes=8, ppo_epochs=2,
                                   learning_rate=1.0, max_grad_norm=None, fsdp=fsdp), world_size)
    ones = torch.ones(1, 2, dtype=torch.long)
    wrapped = distribute(policy, torch.device("cpu"), fsdp, lms=(policy.lm, ref), units=(policy.v_head,),
                         example_inputs=(ones, ones, 1, 1.0))  # DDP, or FSDP in place
    # SGD without clipping: the update scales with the gradient, so gradients summed rather than averaged over the
    # processes show (clipping, or Adam, would hide the scale). Adam's first steps also move each weight by ~lr x the
    # sign of its gradient, so a gradient within float noise of 0, whose sign the order of the sums (1 or 2
    # processes) decides, moved it by +-lr (a failure seen once in CI)
    optimizer = torch.optim.SGD(policy.parameters(), lr=args.learning_rate)
    kl_ctl = ppo.KLController(0.2, 6.0, 10000)
    stats = ppo.ppo_step(args, wrapped, ref, optimizer, queries, responses, scores, kl_ctl, ppo.RunningMoments(),
                         pad_id=0, generator=torch.Generator().manual_seed(0))
    weights = ppo.full_state_dicts(policy, None, fsdp)[0] if fsdp else policy.state_dict()  # FSDP: gathered
    return weights, stats, kl_ctl.kl_coef


def grpo_batch():
    """4 prompts x 2 completions of unequal lengths (the loss normalisers must count tokens over both processes)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 4000, (n,), generator=g) for n in (3, 5, 2, 7)]
    completions = [torch.randint(1, 4000, (n,), generator=g) for n in (6, 2, 5, 1, 3, 4, 2, 6)]
    return prompts, completions, torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 2.0])


def grpo_update(policy_dir, world_size, fsdp, prompts, completions, rewards, loss_type):
    """One grpo.py step (2 passes: the second off-policy; 2 micro-batches; batch-scaled advantages; KL to a
    reference) from fixed weights."""
    import grpo
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    args = grpo.check_args(grpo.Args(prompts_per_step=4, num_generations=2, gradient_accumulation_steps=2,
                                     num_iterations=2, scale_rewards="batch", beta=0.1, loss_type=loss_type,
                                     learning_rate=0.1, fsdp=fsdp), world_size)
    wrapped = distribute(policy, torch.device("cpu"), fsdp, lms=(policy, ref))
    optimizer = torch.optim.SGD(policy.parameters(), lr=args.learning_rate)  # Adam would amplify float noise
    stats = grpo.grpo_step(args, wrapped, ref, optimizer, prompts, completions, rewards,
                           generator=torch.Generator().manual_seed(0))
    weights = ppo.full_state_dicts(policy, None, fsdp)[0] if fsdp else policy.state_dict()
    return weights, stats


if __name__ == "__main__":
    policy_dir, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    device, rank, world_size = init_distributed("cpu")
    if mode.startswith("grpo"):  # grpo-ddp: each rank takes whole groups (2 prompts, their 4 completions)
        prompts, completions, rewards = grpo_batch()
        got = {t: grpo_update(policy_dir, world_size, False, prompts[rank * 2 : rank * 2 + 2],
                              completions[rank * 4 : rank * 4 + 4], rewards[rank * 4 : rank * 4 + 4], t)
               for t in ("dapo", "grpo", "dr_grpo")}
        if rank == 0:
            torch.save(got, out)
        finish()  # a barrier, then leave the group: nobody exits mid-collective
        sys.exit(0)
    queries, responses, scores, x, mask = fixed_batch()
    half = slice(rank * 4, rank * 4 + 4)
    rows = slice(rank * 2, rank * 2 + 2)
    whitened = all_gather(ppo.masked_whiten(x[rows], mask[rows]))
    weights, stats, kl_coef = update(policy_dir, world_size, mode == "fsdp", queries[half], responses[half],
                                     scores[half])
    if rank == 0:
        torch.save({"whitened": whitened, "weights": weights, "stats": stats, "kl_coef": kl_coef}, out)
    finish()  # a barrier, then leave the group: nobody exits mid-collective
