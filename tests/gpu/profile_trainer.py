"""Where the trainer's time goes: its optimizer step at Qwen3-8B draft shapes, per phase and kernel.

A script, not a pytest test. On one GPU, repo root:

    python tests/gpu/profile_trainer.py                           # eager vs compiled kernels
    python tests/gpu/profile_trainer.py --kernels compiled --trace-dir /tmp/out

It runs the trainer's own code (`build_sharded_draft`, `micro_step`, `clip_and_step` from
colocate/train/trainer.py: FSDP2 over a one-rank mesh, the teacher head, the 7-step unroll,
AdamW) on fixed random features, without an engine or a ring: what `bench train`'s
"trainer alone" row measures minus the replayed ring. For each `draft.kernels` mode it
prints milliseconds per phase (CUDA events, as `bench train` reports them), tokens/s and
MFU, then one profiled step's kernels grouped by kind and the top kernels by GPU time
(a Chrome trace goes to --trace-dir). Finally it checks that the modes agree on the
first micro-step's loss and every gradient (relative L2, bf16 tolerance) and exits
non-zero when they do not.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from transformers import LlamaConfig

from colocate import metrics
from colocate.config import load_config
from colocate.draft import label_counts
from colocate.draft.recipe import FrozenTarget, recipe_for
from colocate.progress import PhaseTimer, peak_gib, phase_seconds
from colocate.train.health import NonFiniteGuard
from colocate.target import dummy_embed_and_head
from colocate.train.trainer import build_sharded_draft, clip_and_step, make_optimizer, micro_step
from draft_shapes import DRAFT_VOCAB, NUM_AUX, QWEN3_8B, REL_TOL, mismatches

KINDS = [  # kernel name pattern -> kind, first match wins
    ("flex attention", r"flex|triton_tem_fused"),
    ("matmul", r"gemm|nvjet|cutlass|sm90_xmma|ampere_|cublas|mm_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("fused (compiled)", r"^triton_"),
    ("reduction / softmax", r"reduce|softmax|norm|argmax|logsumexp|max_kernel|sum_kernel"),
    ("copy / cat / index", r"copy|cat|index|gather|scatter|fill|memcpy|memset|embedding"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]


def micro_step_inputs(seq_lens: list[int], shape: dict, device: torch.device, seed: int,
                      prompt_share: float = 0.0) -> dict:
    # Drawn on the host: CUDA's generator output depends on the SM count the process sees,
    # and run_sm_cap.sh compares runs under different MPS SM caps.
    gen = torch.Generator().manual_seed(seed)
    num_tokens, hidden = sum(seq_lens), shape["hidden_size"]
    return dict(
        feats=dict(
            aux_hidden=torch.randn(num_tokens, NUM_AUX * hidden, generator=gen,
                                   dtype=torch.bfloat16).to(device),
            last_hidden=torch.randn(num_tokens, hidden, generator=gen,
                                    dtype=torch.bfloat16).to(device),
            input_ids=torch.randint(0, shape["vocab_size"], (num_tokens,),
                                    generator=gen).to(device),
            # The first prompt_share of each sequence is its prompt: not trained on.
            loss_mask=torch.cat([torch.arange(n) >= round(prompt_share * n)
                                 for n in seq_lens]).to(device),
            positions=torch.cat([torch.arange(n, device=device) for n in seq_lens]),
        ),
        seq_lens=seq_lens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def device_time_us(event) -> float:
    # torch >= 2.4 names it device time; older releases cuda time.
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def print_profile(prof, step_ms: float, top: int) -> None:
    events = [e for e in prof.key_averages() if device_time_us(e) > 0]
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(e.key)] += device_time_us(e)
    total = sum(by_kind.values())
    print(f"  GPU kernel time of one step: {total / 1e3:.1f} ms (step wall {step_ms:.1f} ms)")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:<22} {us / 1e3:8.1f} ms  {100 * us / total:5.1f}%")
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: -device_time_us(e))[:top]
    print(f"  top {top} kernels: ms, calls, kind, name")
    for e in kernels:
        print(f"    {device_time_us(e) / 1e3:8.2f} {e.count:6d}  {kind_of(e.key):<20} {e.key[:90]}")


def run_mode(mode: str, args, shape, batches, device, mesh, embed, head, draft_ids, flops_per_token,
             peak):
    cfg = load_config(None, [f"draft.kernels={mode}", f"draft.attention={args.attention}",
                             f"draft.unroll_steps={args.unroll}", f"draft.draft_vocab_size={DRAFT_VOCAB}",
                             f"train.micro_steps={len(batches)}",
                             f"draft.teacher_argmax={args.teacher_argmax}"])
    recipe = recipe_for(cfg)
    _, model = build_sharded_draft(recipe, LlamaConfig(**shape), DRAFT_VOCAB,
                                   list(range(NUM_AUX)), mesh, torch.bfloat16, device)
    frozen = FrozenTarget(embed=embed, lm_head=head, draft_ids=draft_ids)
    optimizer = make_optimizer(model, cfg.train)
    timer = PhaseTimer(device)
    first = {}
    # The step's N_k, as the engine would send them: per-token loss over all micro-steps.
    label_totals = sum(label_counts(b["seq_lens"], b["feats"]["loss_mask"], args.unroll)
                       for b in batches)

    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, device)

    def one_step(record_first: bool = False):
        timer.mark("start")
        for i, batch in enumerate(batches):
            stats = micro_step(recipe, model, frozen, batch["feats"],
                               {"seq_lens": batch["seq_lens"]}, label_totals=label_totals,
                               num_trainers=1,
                               last=i == len(batches) - 1, timer=timer)
            if record_first and i == 0:
                first["loss"] = recipe.summary(stats.tolist())["loss"]
        if record_first:  # the first step's gradients (weights still the shared initial ones)
            first["grads"] = {n: p.grad.full_tensor().float().cpu()
                              for n, p in model.named_parameters()}
        clip_and_step(model, optimizer, None, cfg.train.grad_clip, guard, 0, True)
        timer.mark("optimizer")
        return phase_seconds(timer.take())

    t0 = time.perf_counter()
    one_step(record_first=True)  # compiles
    sync(device)
    print(f"[{mode}] first step (compiles) {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.warmup - 1):
        one_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    totals: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    for _ in range(args.steps):
        for phase, seconds in one_step().items():
            totals[phase] += seconds
    sync(device)
    wall = (time.perf_counter() - start) / args.steps
    tokens = sum(sum(b["seq_lens"]) for b in batches)
    tps = tokens / wall
    print(f"[{mode}] {tps:,.0f} tokens/s, MFU {100 * metrics.mfu(flops_per_token, tps, peak):.1f}%"
          f", {wall * 1e3:.1f} ms per step of {tokens} tokens, peak "
          f"{peak_gib(device):.1f} GiB")
    print("  per step, ms: " + "  ".join(f"{phase} {1e3 * s / args.steps:.1f}"
                                        for phase, s in totals.items()), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            one_step()
            sync(device)
        print_profile(prof, wall * 1e3, args.top)
        if args.trace_dir:
            os.makedirs(args.trace_dir, exist_ok=True)
            prof.export_chrome_trace(os.path.join(args.trace_dir, f"trainer_{mode}.json.gz"))
    return tps, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="eager,compiled", help="draft.kernels modes")
    parser.add_argument("--attention", default="flex")
    parser.add_argument("--teacher-argmax", default="exact", choices=("exact", "fp8"),
                        help="draft.teacher_argmax")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-step")
    parser.add_argument("--prompt-share", type=float, default=0.0,
                        help="share of each sequence's first tokens not trained on (a prompt)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-steps", type=int, default=2)
    parser.add_argument("--unroll", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compiles)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace-dir", default="")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--save", default="", help="write each mode's first-step loss and "
                        "gradients here (a reference for --reference)")
    parser.add_argument("--reference", default="", help="also check each mode against the "
                        "losses and gradients --save wrote (e.g. another MPS SM cap's run)")
    args = parser.parse_args()
    shape = dict(QWEN3_8B)
    if args.small:  # a smoke run of this script on the CPU (not a measurement)
        shape.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=96, vocab_size=40000)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (1,))

    # Micro-steps of different lengths, as packing makes them (the compiled kernels must
    # handle a change of T); the last sequence of the second is shorter.
    full = args.tokens // args.seq_len
    lens = [[args.seq_len] * full, [args.seq_len] * (full - 1) + [args.seq_len - 96]]
    batches = [micro_step_inputs(lens[i % 2], shape, device, seed=i,
                                 prompt_share=args.prompt_share)
               for i in range(args.micro_steps)]
    embed, head = dummy_embed_and_head(shape["vocab_size"], shape["hidden_size"], seed=0,
                                       dtype=torch.bfloat16, device=device)
    torch.manual_seed(0)  # the same draft vocabulary in every run (--save / --reference)
    draft_ids = torch.randperm(shape["vocab_size"])[:DRAFT_VOCAB].sort().values.to(device)
    geom = metrics.Geometry.from_hf_config(LlamaConfig(**shape))
    flops_per_token = metrics.draft_train_flops_per_token(
        geom, args.seq_len, draft_vocab_size=DRAFT_VOCAB, unroll_steps=args.unroll)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = metrics.peak_flops(device_name) or 989e12
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 0
    print(f"MPS SM cap {os.environ.get('CUDA_MPS_ACTIVE_THREAD_PERCENTAGE', 'none')}, "
          f"{sms} SMs reported")
    print(f"torch {torch.__version__}, {device_name}, {args.micro_steps} x "
          f"{args.tokens} tokens ({args.prompt_share:.0%} prompt), unroll {args.unroll}, "
          f"attention {args.attention}, "
          f"trainer {flops_per_token / 1e9:.2f} GFLOP/token", flush=True)

    results = {}
    for mode in args.kernels.split(","):
        results[mode] = run_mode(mode, args, shape, batches, device, mesh, embed, head,
                                 draft_ids, flops_per_token, peak)
        if cuda:
            torch.cuda.empty_cache()
    failures = []
    modes = list(results)
    for mode in modes[1:]:
        ref, other = results[modes[0]][1], results[mode][1]
        bad = mismatches(ref["loss"], ref["grads"], other["loss"], other["grads"])
        print(f"{modes[0]} vs {mode} (rel tol {REL_TOL}): "
              f"{'agree' if not bad else 'DISAGREE: ' + '; '.join(bad)}")
        failures += bad
    if args.save:
        torch.save({mode: first for mode, (_, first) in results.items()}, args.save)
    if args.reference:
        saved = torch.load(args.reference)
        for mode, (_, first) in results.items():
            bad = mismatches(saved[mode]["loss"], saved[mode]["grads"], first["loss"],
                             first["grads"])
            print(f"{mode} vs {args.reference} (rel tol {REL_TOL}): "
                  f"{'agree' if not bad else 'DISAGREE: ' + '; '.join(bad[:8])}")
            failures += bad
    counters = torch._dynamo.utils.counters["stats"]
    print(f"dynamo graphs compiled: {counters['unique_graphs']}")
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
