"""The reference speculative decoder: its draft is the draft as trained, and it is lossless."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from colocate.config import DraftSection
from colocate.draft import DraftArch, Eagle3Draft, eagle3_unroll, target_distribution
from colocate.eval.chain import chain_generate
from colocate.eval.exported import read_export
from colocate.eval.reference import IncrementalDraft, ReferenceDecoder, load_reference
from tests.eval_exports import write_random_export

H, V, VD, NUM_AUX, STEPS = 32, 64, 40, 3, 4


def training_logits(draft, embed, aux, input_ids, seq_lens, unroll_steps):
    """Logits [steps, T, Vd] of every unroll step of `eagle3_unroll`, the training code
    itself: each step's hidden output, caught by a forward hook on the draft, through the
    draft's head (training runs the head only on counted rows; this compares every row)."""
    num_tokens = input_ids.numel()
    gen = torch.Generator().manual_seed(5)
    target = target_distribution(torch.randn(num_tokens, H, generator=gen),
                                 torch.randn(V, H, generator=gen), torch.arange(VD))
    caught = []
    handle = draft.register_forward_hook(
        lambda mod, args, out: caught.append(mod.lm_head(mod.norm(out[0])).detach()))
    try:
        positions = torch.cat([torch.arange(n) for n in seq_lens])
        eagle3_unroll(draft, embed, aux, target, input_ids, torch.ones(num_tokens, dtype=torch.bool),
                      positions, seq_lens, unroll_steps, 0.8)
    finally:
        handle.remove()
    return torch.stack(caught)


def test_incremental_draft_equals_the_training_unroll():
    cfg = LlamaConfig(hidden_size=H, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=V, num_hidden_layers=4)
    arch = DraftArch.from_target_config(cfg, DraftSection(draft_vocab_size=VD), NUM_AUX)
    draft = Eagle3Draft(arch, attention="loop", kernels="eager")
    draft.init_weights(torch.Generator().manual_seed(0), std=0.2)  # far from uniform logits
    gen = torch.Generator().manual_seed(1)
    seq_lens = [5, 13]  # packed: the second sequence must not see the first
    num_tokens = sum(seq_lens)
    embed = torch.randn(V, H, generator=gen)
    aux = torch.randn(num_tokens, NUM_AUX * H, generator=gen)
    input_ids = torch.randint(0, V, (num_tokens,), generator=gen)
    want = training_logits(draft, embed, aux, input_ids, seq_lens, STEPS)  # [K, T, Vd]

    start, length = seq_lens[0], seq_lens[1]
    x = input_ids[start:].tolist()
    d2t = torch.randint(0, V - VD, (VD,), generator=gen)
    inc = IncrementalDraft(draft, embed, d2t)
    compared = 0
    t = 0
    for chunk in (1, 3, 2, 1, 4, 1):  # committed positions arrive in uneven groups, as served
        got0 = inc.extend(aux[start + t:start + t + chunk], x[t + 1:t + 1 + chunk])
        torch.testing.assert_close(got0, want[0, start + t:start + t + chunk], rtol=0, atol=1e-5)
        t += chunk
        last = t - 1  # the chain starts at the last committed index
        num_steps = min(STEPS, length - 1 - last)  # steps whose input token exists
        tokens, logits = inc.chain(num_steps, teacher_tokens=x[last + 2:last + 1 + num_steps])
        for k in range(num_steps):
            torch.testing.assert_close(logits[k], want[k, start + last], rtol=0, atol=1e-5)
            d = int(logits[k].argmax())
            assert tokens[k] == d + int(d2t[d])  # proposals are target ids
            compared += 1
    assert t == length - 1 and compared >= 15


@pytest.fixture(scope="module")
def tiny_reference(tiny_assets, tmp_path_factory):
    export = write_random_export(tiny_assets["target_llama"], str(tmp_path_factory.mktemp("x")))
    target, draft = load_reference(tiny_assets["target_llama"], read_export(export),
                                   dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["target_llama"])
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
               for text in ("Count from 3 to 12.", "What is 17 * 4?", "Sort: pear apple fig")]
    return target, draft, prompts, frozenset([tokenizer.eos_token_id])


def plain_greedy(target, prompt, max_new_tokens):
    out = target.model.generate(torch.tensor([prompt]), do_sample=False,
                                max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


class OracleSometimes:
    """The real decoder, except that its proposals are replaced by the target's true greedy
    continuation for `pattern[i]` tokens at verify step i (then a wrong token), so drafts get
    accepted and every commit path (crop, multi-position draft extend) runs."""

    def __init__(self, inner, truth, pattern):
        self.inner, self.truth, self.pattern = inner, truth, pattern
        self.emitted = 0

    def prefill(self, prompt):
        self.emitted = 1
        return self.inner.prefill(prompt)

    def propose(self, num_steps):
        self.inner.propose(num_steps)  # the real draft still runs its chain
        m = min(self.pattern[self.emitted % len(self.pattern)], num_steps)
        at = self.emitted
        drafts = self.truth[at:at + m] + [t + 1 for t in self.truth[at + m:at + num_steps]]
        return drafts + [0] * (num_steps - len(drafts))  # past the end: never reached

    def verify(self, tokens):
        return self.inner.verify(tokens)

    def commit(self, num_accepted, bonus):
        self.emitted += num_accepted + 1
        self.inner.commit(num_accepted, bonus)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_reference_decoder_is_lossless(tiny_reference, num_steps):
    target, draft, prompts, stop_ids = tiny_reference
    for prompt in prompts:
        want = plain_greedy(target, prompt, 40)
        gen = chain_generate(ReferenceDecoder(target, draft), prompt, num_steps=num_steps,
                             max_new_tokens=40, stop_ids=stop_ids)
        assert gen.tokens == want
        assert sum(gen.histogram) == gen.num_verify_steps
        # The same target with drafts that are often right: still exactly greedy.
        oracle = OracleSometimes(ReferenceDecoder(target, draft), want, pattern=[0, 4, 1, 3, 2])
        gen = chain_generate(oracle, prompt, num_steps=num_steps, max_new_tokens=40,
                             stop_ids=stop_ids)
        assert gen.tokens == want
        assert sum(gen.histogram[1:]) > 0  # drafts were accepted
        assert len(gen.tokens) / gen.num_verify_steps > 1.3
        assert_draft_caught_up(target, draft, prompt + gen.tokens)


def assert_draft_caught_up(target, draft, sequence):
    """After the commits, the draft's cache is what one extend over the committed sequence
    (aux from one fresh target forward, token t+1 at index t) gives."""
    num_committed = draft.num_committed
    keys, values, last = draft.keys.clone(), draft.values.clone(), draft._last[1].clone()
    target.reset()
    _, aux = target.forward(sequence[:num_committed])
    draft.reset()
    draft.extend(aux, sequence[1:num_committed + 1])
    torch.testing.assert_close(keys, draft.keys, rtol=0, atol=1e-4)
    torch.testing.assert_close(values, draft.values, rtol=0, atol=1e-4)
    torch.testing.assert_close(last, draft._last[1], rtol=0, atol=1e-4)


def test_close_lets_the_model_go_without_a_gc_pass(tiny_assets):
    """`colocate eval --engine both` frees the reference before sglang sizes its memory
    pools; the hooks must not keep the model alive (checked with the cyclic GC off)."""
    import gc
    import weakref

    from colocate.engine.hf import load_causal_lm
    from colocate.eval.reference import HFTarget

    model = load_causal_lm(tiny_assets["target_llama"], torch.float32, "sdpa").eval()
    target = HFTarget(model, [0, 1])
    target.reset()
    target.forward([1, 2, 3])
    gone = weakref.ref(model)
    del model
    gc.disable()
    try:
        target.close()
        del target
        assert gone() is None
    finally:
        gc.enable()
