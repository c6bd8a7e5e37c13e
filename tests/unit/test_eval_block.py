"""Block drafting in the reference decoder: the DFlash draft as trained, lossless decoding,
and a full block accepted when the draft is right."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Qwen3Config

from colocate.config import DraftSection
from colocate.draft.dflash import DFlashArch, DFlashDraft
from colocate.draft.dflash_blocks import BlockLayout
from colocate.eval.block import BlockDraft
from colocate.eval.chain import chain_generate
from colocate.eval.exported import read_export
from colocate.eval.reference import ReferenceDecoder, load_reference
from tests.eval_exports import write_random_dflash_export

H, V, B, K = 32, 64, 6, 3


def test_block_draft_equals_the_training_blocks():
    """Logits of a served block after committing x_0..x_{a-1} equal the training forward's
    block at anchor a (dflash_blocks' mask over the whole sequence, context strictly < a)."""
    cfg = Qwen3Config(hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=48, vocab_size=V, num_hidden_layers=8)
    arch = DFlashArch.from_target_config(cfg, DraftSection(num_layers=2, block_size=B),
                                         [1, 3, 5], mask_token_id=V - 1)
    model = DFlashDraft(arch, attention="loop", kernels="eager")
    model.init_weights(torch.Generator().manual_seed(0), std=0.2)  # far from uniform logits
    gen = torch.Generator().manual_seed(1)
    length = 17
    embed, head = torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen)
    aux = torch.randn(length, K * H, generator=gen)
    x = torch.randint(0, V - 1, (length,), generator=gen)
    anchors = torch.tensor([[0, 3, 4, 9, 16]])

    layout = BlockLayout.build([length], anchors, B)
    ids, positions = layout.block_inputs(x, torch.arange(length), arch.mask_token_id)
    out = model(F.embedding(ids, embed), positions, model.project_context(aux),
                torch.arange(length), layout.dense_mask())
    want = F.linear(out.view(anchors.numel(), B, H)[:, 1:], head)  # [N, B-1, V]

    drafter = BlockDraft(model, embed, head)
    for n, a in enumerate(anchors[0].tolist()):
        drafter.reset()
        if a == 0:  # nothing committed yet: the block sees only itself
            drafter.last_token = int(x[0])
        else:  # committed in two uneven pieces, as verify steps would
            cut = a // 2 + 1
            drafter.extend(aux[:cut], x[1:cut + 1].tolist())
            drafter.extend(aux[cut:a], x[cut + 1:a + 1].tolist())
        assert drafter.num_committed == a and drafter.last_token == int(x[a])
        got = drafter.block_logits(B - 1)
        torch.testing.assert_close(got, want[n], rtol=1e-5, atol=1e-5)  # logits ~ 10
        assert drafter.propose(B - 1) == got.argmax(-1).tolist()


@pytest.fixture(scope="module")
def dflash_reference(tiny_assets, tmp_path_factory):
    path = tiny_assets["target_llama"]
    export = read_export(write_random_dflash_export(path, str(tmp_path_factory.mktemp("x")),
                                                    block_size=B))
    target, draft = load_reference(path, export, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(draft, BlockDraft) and export.method.num_steps(export.config, B - 1) == B - 1
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
               for text in ("Count from 3 to 12.", "What is 17 * 4?", "Sort: pear apple fig")]
    return target, draft, prompts, frozenset([tokenizer.eos_token_id])


def plain_greedy(target, prompt, max_new_tokens):
    out = target.model.generate(torch.tensor([prompt]), do_sample=False,
                                max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


class OracleBlock(BlockDraft):
    """The real block draft (it still drafts every block), whose proposals are replaced by
    the target's true continuation of the sequence it has committed: right only if its
    bookkeeping (committed length, last token) is."""

    def __init__(self, inner: BlockDraft, sequence: list[int]):
        self.__dict__.update(inner.__dict__)
        self.sequence = sequence

    def propose(self, num_steps):
        super().propose(num_steps)
        assert self.sequence[self.num_committed] == self.last_token
        start = self.num_committed + 1
        truth = self.sequence[start:start + num_steps]
        return truth + [0] * (num_steps - len(truth))


def test_block_decoding_is_lossless_and_an_oracle_accepts_whole_blocks(dflash_reference):
    target, draft, prompts, stop_ids = dflash_reference
    num_full_blocks = 0
    for prompt in prompts:
        want = plain_greedy(target, prompt, 40)
        gen = chain_generate(ReferenceDecoder(target, draft), prompt, num_steps=B - 1,
                             max_new_tokens=40, stop_ids=stop_ids)
        assert gen.tokens == want
        assert sum(gen.histogram) == gen.num_verify_steps and len(gen.histogram) == B
        assert len(gen.tokens) / gen.num_verify_steps >= 1.0

        oracle = OracleBlock(draft, prompt + want)
        gen = chain_generate(ReferenceDecoder(target, oracle), prompt, num_steps=B - 1,
                             max_new_tokens=40, stop_ids=stop_ids)
        assert gen.tokens == want
        # Every verify step accepts the whole block but possibly the last (the truth ends
        # at the stop token).
        assert gen.histogram[B - 1] >= gen.num_verify_steps - 1, gen.histogram
        num_full_blocks += gen.histogram[B - 1]
        if len(want) == 40 and want[-1] not in stop_ids:
            assert gen.num_verify_steps == -(-39 // B)  # 1 + B tokens per verify step
        assert_context_caught_up(target, oracle, prompt + gen.tokens)
    assert num_full_blocks >= 3


def assert_context_caught_up(target, draft, sequence):
    """The context after the commits is what one projection of a fresh target forward over
    the committed tokens gives: one row per token in the target's KV cache, which also holds
    the last verify step's block (the request ended there: never committed)."""
    num_committed = draft.num_committed
    assert num_committed == target.length - B
    ctx = draft.ctx.clone()
    target.reset()
    _, aux = target.forward(sequence[:num_committed])
    torch.testing.assert_close(ctx, draft.model.project_context(aux), rtol=0, atol=1e-4)
