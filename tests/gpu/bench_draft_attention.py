"""Loop vs flex TTT attention: one Eagle3 unroll (forward + backward) at Qwen3-8B draft shapes.

A script, not a pytest test. On one GPU:

    python tests/gpu/bench_draft_attention.py                      # 8192 and 16384 tokens
    python tests/gpu/bench_draft_attention.py --tokens 16384 --impls flex

For each micro-step size it builds the draft (hidden 4096, 32 query / 8 KV heads of 128,
MLP 12288, draft vocab 32000, bf16), packs sequences of --seq-len tokens, runs
`eagle3_unroll` (7 steps) and `loss.backward()`, and prints per implementation: ms per
unroll, tokens/s and the peak memory allocated. The first iteration (flex compiles there)
is a warm-up and not timed. Then it checks that flex and the loop agree within bf16
tolerance on the loss, the last step's accuracy inputs and every parameter gradient
(relative L2 error), and exits non-zero when they do not.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import LlamaConfig

from colocate.config import DraftSection
from colocate.draft import DraftArch, Eagle3Draft
from colocate.draft.loss import eagle3_unroll
from colocate.draft.teacher import TargetDistribution
from draft_shapes import DRAFT_VOCAB, NUM_AUX, QWEN3_8B, REL_TOL, mismatches


def make_inputs(num_tokens: int, seq_len: int, hidden: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    seq_lens = [seq_len] * (num_tokens // seq_len)
    if num_tokens % seq_len:
        seq_lens.append(num_tokens % seq_len)
    logits = (torch.randn(num_tokens, DRAFT_VOCAB, device=device, generator=gen) * 4).bfloat16()
    return dict(
        embed_weight=torch.randn(QWEN3_8B["vocab_size"], hidden, device=device, generator=gen,
                                 dtype=torch.bfloat16) * 0.02,
        aux_hidden=torch.randn(num_tokens, NUM_AUX * hidden, device=device, generator=gen,
                               dtype=torch.bfloat16),
        target=TargetDistribution(logits=logits, lse=logits.float().logsumexp(-1),
                                  in_draft=torch.ones(num_tokens, dtype=torch.bool, device=device),
                                  top=logits.argmax(-1)),
        input_ids=torch.randint(0, QWEN3_8B["vocab_size"], (num_tokens,), device=device,
                                generator=gen),
        loss_mask=torch.ones(num_tokens, dtype=torch.bool, device=device),
        positions=torch.cat([torch.arange(n, device=device) for n in seq_lens]),
        seq_lens=seq_lens,
    )


def make_draft(attention: str, device: torch.device) -> Eagle3Draft:
    arch = DraftArch.from_target_config(LlamaConfig(**QWEN3_8B),
                                        DraftSection(draft_vocab_size=DRAFT_VOCAB), NUM_AUX)
    draft = Eagle3Draft(arch, attention=attention)
    draft.init_weights(torch.Generator().manual_seed(0))  # same weights for both paths
    draft = draft.to(device=device, dtype=torch.bfloat16)
    # bf16 parameters as FSDP's mixed precision gives the trainer, but RoPE frequencies stay
    # float32 there (FSDP casts parameters, not buffers); .to(dtype) cast them too.
    draft.midlayer.self_attn.inv_freq = arch.inv_freq().to(device)
    return draft


def run_unroll(draft: Eagle3Draft, inputs: dict, steps: int) -> torch.Tensor:
    draft.zero_grad(set_to_none=True)
    result = eagle3_unroll(draft, **inputs, unroll_steps=steps, position_decay=0.8)
    result.loss.backward()
    return result.loss.detach()


def bench(attention: str, inputs: dict, steps: int, iters: int, device: torch.device):
    """Returns (ms per unroll, peak GiB, loss, grads) or None on out-of-memory."""
    draft = make_draft(attention, device)
    try:
        run_unroll(draft, inputs, steps)  # warm-up: flex compiles here
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            loss = run_unroll(draft, inputs, steps)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / iters * 1e3
    except torch.OutOfMemoryError:
        return None
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    # Kept on the host so the next implementation's peak memory does not include them.
    grads = {n: p.grad.detach().float().cpu() for n, p in draft.named_parameters()}
    return ms, peak_gib, loss.float().item(), grads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8192,16384", help="tokens per micro-step, comma list")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=7, help="unroll steps")
    parser.add_argument("--iters", type=int, default=3, help="timed unrolls per cell")
    parser.add_argument("--impls", default="loop,flex")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    device = torch.device("cuda")
    impls = args.impls.split(",")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"{args.steps} unroll steps, sequences of {args.seq_len}")
    print(f"{'tokens':>7} {'impl':>5} {'ms/unroll':>10} {'tokens/s':>10} {'peak GiB':>9}")
    failures = []
    for num_tokens in (int(t) for t in args.tokens.split(",")):
        inputs = make_inputs(num_tokens, args.seq_len, QWEN3_8B["hidden_size"], device)
        results = {}
        for impl in impls:
            results[impl] = bench(impl, inputs, args.steps, args.iters, device)
            if results[impl] is None:
                print(f"{num_tokens:>7} {impl:>5} {'OOM':>10}")
                continue
            ms, peak, _, _ = results[impl]
            print(f"{num_tokens:>7} {impl:>5} {ms:>10.1f} {num_tokens / ms * 1e3:>10.0f} "
                  f"{peak:>9.2f}")
            torch.cuda.empty_cache()
        if results.get("loop") and results.get("flex"):
            (_, _, ref_loss, ref_grads), (_, _, loss, grads) = results["loop"], results["flex"]
            bad = mismatches(ref_loss, ref_grads, loss, grads)
            status = "agree" if not bad else "DISAGREE: " + "; ".join(bad)
            print(f"{num_tokens:>7} loop vs flex (rel tol {REL_TOL}): {status}")
            failures += bad
    counters = torch._dynamo.utils.counters["stats"]
    print(f"dynamo graphs compiled: {counters['unique_graphs']} (flex recompiles show here)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
