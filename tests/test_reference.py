"""PPO's reference model without a second full copy: --ref-shared-layers (the reference's embeddings and first
blocks are the policy's own modules, frozen; TRL's create_reference_model(num_shared_layers)) and --ref-offload (the
reference waits on the CPU between its forwards). Both compute exactly what a full frozen copy computes."""

import dataclasses

import pytest
import torch

import ppo
import ppo_seq2seq as s2s
from test_ppo_e2e import read_metrics, tiny_args
from utils.hub import UserError
from utils.models import on_device, own_weights, reference_model

CPU = torch.device("cpu")


def make(assets, tmp_path, **overrides):
    """ppo.make_policy on the tiny policy (2 blocks): (policy, reference)."""
    policy, _, ref_lm = ppo.make_policy(tiny_args(assets, tmp_path, **overrides), CPU, None)
    return policy, ref_lm


def batch():
    """Left-padded queries + responses of the tiny vocabulary: (query_responses, attention_mask, context_length)."""
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    responses = [torch.tensor([10, 11, 12, 13]), torch.tensor([14, 15])]
    q_ids, q_mask = ppo.left_pad(queries, 0)
    r_ids, r_mask = ppo.right_pad(responses, 0)
    return torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1), q_ids.shape[1]


def ref_logits(ref_lm):
    with torch.no_grad():
        return ppo.lm_forward(ref_lm, *batch())


@pytest.mark.parametrize("n", [1, 2])
def test_shared_reference_computes_what_a_full_frozen_copy_computes(assets, tmp_path, n):
    _, full = make(assets, tmp_path)
    _, shared = make(assets, tmp_path, ref_shared_layers=n)
    assert torch.equal(ref_logits(shared), ref_logits(full))


@pytest.mark.parametrize("n", [1, 2])
def test_shared_modules_are_the_policys_own_and_frozen(assets, tmp_path, n):
    policy, ref_lm = make(assets, tmp_path, ref_shared_layers=n)
    lm, ref = policy.lm.transformer, ref_lm.transformer
    shared = [lm.wte, lm.wpe, *lm.h[:n]]  # GPT-2: token and position embeddings, then the first n blocks
    assert all(m is r for m, r in zip(shared, [ref.wte, ref.wpe, *ref.h[:n]]))
    assert ref_lm.lm_head.weight is lm.wte.weight  # the tied head is the shared embedding: frozen too (as TRL)
    assert all(not p.requires_grad for m in shared for p in m.parameters())
    unshared = [*lm.h[n:], lm.ln_f]  # the policy trains these; the reference holds frozen copies of them
    assert all(p.requires_grad for m in [*unshared, policy.v_head] for p in m.parameters())
    own = own_weights(ref_lm, policy)  # the reference's own weights: copies, stored apart from the policy's
    assert len(own) == len([p for m in unshared for p in m.parameters()])
    assert not {t.data_ptr() for t in own} & {p.data_ptr() for p in policy.parameters()}
    assert all(not t.requires_grad for t in own)


def test_one_update_trains_the_rest_and_leaves_the_reference_at_the_initial_model(assets, tmp_path):
    """After a PPO update the policy's unshared weights moved, its shared ones did not (frozen), and the reference
    still computes the initial model's logits: sharing frozen layers is exact for the whole run."""
    args = ppo.check_args(tiny_args(assets, tmp_path, ref_shared_layers=1, batch_size=4, mini_batch_size=2,
                                    gradient_accumulation_steps=1, ppo_epochs=1))
    policy, ref_lm = make(assets, tmp_path, ref_shared_layers=1)
    initial = ref_logits(ref_lm)
    before_ref = {k: v.clone() for k, v in ref_lm.state_dict().items()}
    before_policy = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    queries = [torch.randint(1, 100, (3,)) for _ in range(4)]
    responses = [torch.randint(1, 100, (5,)) for _ in range(4)]
    ppo.ppo_step(args, policy, ref_lm, optimizer, queries, responses, torch.tensor([1.0, -1.0, 0.5, 0.0]),
                 ppo.KLController(0.2, 6.0, 10000), pad_id=0)
    after_policy = policy.state_dict()
    moved = {k for k in after_policy if not torch.equal(after_policy[k], before_policy[k])}
    assert "lm.transformer.h.1.mlp.c_fc.weight" in moved and "v_head.weight" in moved
    assert not {k for k in moved if k.startswith(("lm.transformer.wte", "lm.transformer.wpe", "lm.transformer.h.0."))}
    assert all(torch.equal(v, before_ref[k]) for k, v in ref_lm.state_dict().items())  # shared and unshared
    assert torch.equal(ref_logits(ref_lm), initial)
    _, full = make(assets, tmp_path)  # a fresh full frozen copy of the initial model
    assert torch.equal(ref_logits(full), initial)


@pytest.mark.parametrize("arch", ["gpt2-untied", "llama"])
def test_sharing_finds_the_blocks_and_embeddings_of_other_models(arch):
    """Random tiny models built from configs: an untied head stays the policy's own (trained; the reference holds a
    frozen copy), and a Llama's `model.layers` and `embed_tokens` are found as GPT-2's `transformer.h` and `wte`."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=2))
        blocks, embedding = lm.model.layers, lm.model.embed_tokens
    else:
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=2, tie_word_embeddings=False))
        blocks, embedding = lm.transformer.h, lm.transformer.wte
    full, shared = reference_model(lm, 0, CPU, torch.float32), reference_model(lm, 2, CPU, torch.float32)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(shared(input_ids=ids).logits, full(input_ids=ids).logits)
    assert shared.get_input_embeddings() is embedding and not embedding.weight.requires_grad
    ref_blocks = shared.model.layers if arch == "llama" else shared.transformer.h
    assert [b is r for b, r in zip(blocks, ref_blocks)] == [True, True, False]
    assert lm.lm_head.weight.requires_grad and shared.lm_head.weight is not lm.lm_head.weight


def test_shared_layers_with_gradient_checkpointing_stay_shared(assets, tmp_path):
    policy, ref_lm = make(assets, tmp_path, ref_shared_layers=1, gradient_checkpointing=True)
    assert policy.lm.transformer.h[0] is ref_lm.transformer.h[0]
    _, full = make(assets, tmp_path)
    assert torch.equal(ref_logits(ref_lm), ref_logits(full))


def test_reference_model_casts_only_its_own_weights(assets):
    """The reference's own weights take the reference dtype (bf16 on a GPU with --dtype auto); the shared ones stay
    the policy's (float32), untouched."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(assets / "policy")
    ref_lm = reference_model(lm, 1, CPU, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in lm.parameters())
    assert ref_lm.transformer.h[1].mlp.c_fc.weight.dtype == torch.bfloat16
    assert ref_lm.transformer.h[0].mlp.c_fc.weight.dtype == torch.float32


def strip(rows):
    """Metrics without the timings and memory, which differ run to run."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.mark.parametrize("shared", [0, 2])
def test_offloaded_reference_gives_the_same_run(assets, tmp_path, shared):
    """On a CPU-only machine the offload moves nothing (the CPU is the device), but the path runs: the same metrics
    and samples (the sample table generates with the reference) as a run without it."""
    runs = [ppo.main(tiny_args(assets, tmp_path / str(offload), ref_offload=offload, ref_shared_layers=shared,
                               total_episodes=8, sample_every=1)) for offload in (False, True)]
    assert strip(read_metrics(runs[0])) == strip(read_metrics(runs[1]))
    samples = [read_metrics(run.parent / "samples.jsonl") for run in runs]
    assert samples[0] == samples[1]


def test_offloaded_reference_gives_the_same_run_seq2seq(assets, tmp_path):
    from test_ppo_seq2seq import tiny_args as s2s_args

    runs = [s2s.main(s2s_args(assets, tmp_path / str(offload), ref_offload=offload, total_episodes=8))
            for offload in (False, True)]
    assert strip(read_metrics(runs[0])) == strip(read_metrics(runs[1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moves weights between the CPU and a GPU")
def test_offloaded_reference_is_on_the_gpu_only_inside_on_device(assets, tmp_path):
    cuda = torch.device("cuda", torch.cuda.current_device())
    policy, _, ref_lm = ppo.make_policy(tiny_args(assets, tmp_path, ref_offload=True, ref_shared_layers=1,
                                                  device="cuda"), cuda, None)
    own = own_weights(ref_lm, policy)
    assert all(t.device == CPU for t in own) and all(p.device == cuda for p in policy.parameters())
    with on_device(ref_lm, cuda, keep=policy.lm):
        assert all(t.device == cuda for t in own)
    assert all(t.device == CPU for t in own) and all(p.device == cuda for p in policy.parameters())


@pytest.mark.parametrize("flags, message", [
    (dict(ref_shared_layers=1, lora_r=4), "with --lora-r there is no reference copy"),
    (dict(ref_offload=True, lora_r=4), "with --lora-r there is no reference copy"),
    (dict(ref_shared_layers=-1), "--ref-shared-layers must be >= 0"),
])
def test_bad_combinations_are_refused_in_one_line(assets, tmp_path, flags, message):
    with pytest.raises(UserError, match=message) as err:
        ppo.check_args(tiny_args(assets, tmp_path, **flags))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("module", [ppo, s2s])
def test_reference_options_are_refused_with_fsdp(module, assets, tmp_path):
    args = module.Args(fsdp=True, ref_offload=True, reward_model="none", reward_fn=["length"])
    with pytest.raises(UserError, match="do(es)? not work with --fsdp") as err:
        module.check_args(args, world_size=2)
    assert "\n" not in str(err.value)
    if module is ppo:
        with pytest.raises(UserError, match="do not work with --fsdp"):
            module.check_args(dataclasses.replace(args, ref_offload=False, ref_shared_layers=1), world_size=2)


def test_more_shared_layers_than_blocks_is_refused(assets, tmp_path):
    with pytest.raises(UserError, match="--ref-shared-layers 3: the model has 2 blocks; use at most 2") as err:
        make(assets, tmp_path, ref_shared_layers=3)
    assert "\n" not in str(err.value)
