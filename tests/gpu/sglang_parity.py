"""GPU parity: the sglang engine against the hf engine on the same packed micro-batch.

    torchrun --standalone --nproc-per-node 2 tests/gpu/sglang_parity.py --arch llama|qwen3 \
        [--quantization fp8]

Rank 1 (the engine of pair 0) builds both engines from the tiny target's real safetensors
and compares aux_hidden and last_hidden (max abs diff, relative error per tensor and per aux
column); rank 0 (a trainer) only passes the start and end barriers, which shows that sglang's
group setup never involves it. One arch per process: sglang keeps module-level globals, so a
process holds one sglang engine. Prints PASS/FAIL; writes $OUT/sglang_parity_<arch>.json.
--quantization fp8: the sglang engine with `engine.quantization=fp8` against the bf16 hf
engine: how far FP8 prefill moves the features (tolerance FP8_REL_TOL; the json says by how
much), written to sglang_parity_<arch>_fp8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

T0 = time.time()
REL_TOL = 2e-2  # bf16 through a few layers (the probes saw 6e-3 .. 1e-2)
FP8_REL_TOL = 1e-1  # FP8 weights and activations: the tiny Qwen3 read 7.3e-2 .. 8.4e-2 (H200)


def log(*args) -> None:
    print(f"[{time.time() - T0:7.1f}s rank {os.environ.get('RANK')}]", *args, flush=True)


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL) -> dict:
    diff = (got.float() - ref.float())
    rel = (diff.norm() / ref.float().norm().clamp_min(1e-12)).item()
    out = {"max_abs": diff.abs().max().item(), "rel": rel, "ok": rel < tol}
    log(f"{name}: max|diff|={out['max_abs']:.3e} rel={rel:.3e} {'ok' if out['ok'] else 'BAD'}")
    return out


def engine_side(args) -> dict:
    from colocate.config import load_config
    from colocate.engine import build_engine

    path = f"examples/tiny/target-{args.arch}"
    common = [f"target.path={path}", f"target.aux_layer_ids={args.aux}", "mps.mode=off",
              "data.max_length=256", "data.tokens_per_micro_step=1024", "target.dtype=bfloat16"]
    device = torch.device("cuda", torch.cuda.current_device())
    hf = build_engine(load_config(None, common + ["engine.backend=hf"]), device)
    log("hf engine ready:", hf.attn_implementation)
    t = time.time()
    sgl = build_engine(load_config(None, common + ["engine.backend=sglang",
                                                   f"engine.quantization={args.quantization}"]),
                       device)
    log(f"sglang engine ready in {time.time() - t:.1f}s")
    from sglang.srt.distributed import parallel_state as psm

    groups = {"world": psm.get_world_group().ranks, "tp": psm.get_tp_group().ranks,
              "pp": psm.get_pp_group().ranks}
    log("sglang groups:", groups)
    assert all(ranks == [1] for ranks in groups.values()), f"sglang groups not engine-only: {groups}"

    lens = [17, 33, 100, 6, 64]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, hf.vocab_size, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    T, H, K = ids.numel(), hf.hidden_size, hf.num_aux
    assert sgl.aux_layer_ids == hf.aux_layer_ids and sgl.hidden_size == H

    def run(engine):
        aux = torch.full((T, K * H), float("nan"), dtype=engine.dtype, device=device)
        last = torch.full((T, H), float("nan"), dtype=engine.dtype, device=device)
        with torch.no_grad():
            engine._forward(ids.to(device), pos.to(device), seq_lens.to(device), aux, last)
        torch.cuda.synchronize()
        return aux, last

    t = time.time()
    s_aux, s_last = run(sgl)
    log(f"sglang first forward (Triton JIT) {time.time() - t:.1f}s")
    s_aux2, s_last2 = run(sgl)  # pools cleared in between: a second run must repeat exactly
    h_aux, h_last = run(hf)
    result = {"arch": args.arch, "aux_layer_ids": hf.aux_layer_ids, "lens": lens,
              "groups": groups, "quantization": args.quantization}
    tol = REL_TOL if args.quantization == "none" else FP8_REL_TOL
    result["aux_hidden"] = compare("aux_hidden", s_aux, h_aux, tol)
    for k, layer in enumerate(hf.aux_layer_ids):
        result[f"aux_col{k}_layer{layer}"] = compare(
            f"  aux column {k} (layer {layer})", s_aux[:, k * H:(k + 1) * H],
            h_aux[:, k * H:(k + 1) * H], tol)
    result["last_hidden"] = compare("last_hidden", s_last, h_last, tol)
    result["repeatable"] = bool(torch.equal(s_aux, s_aux2) and torch.equal(s_last, s_last2))
    result["finite"] = bool(torch.isfinite(s_aux).all() and torch.isfinite(s_last).all())
    log("second sglang forward identical:", result["repeatable"], "finite:", result["finite"])
    result["pass"] = (result["aux_hidden"]["ok"] and result["last_hidden"]["ok"]
                      and result["repeatable"] and result["finite"])
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=("llama", "qwen3"), default="llama")
    ap.add_argument("--aux", default="[3,1,1]",
                    help="aux layer ids: unordered with a repeat, to test the column map")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--quantization", choices=("none", "fp8"), default="none",
                    help="the sglang engine's engine.quantization")
    args = ap.parse_args()
    from colocate.config import MpsSection
    from colocate.topology import close_topology, init_topology

    topo = init_topology(device="cuda", timeout_s=600.0, mps=MpsSection(mode="off"))
    status = 0
    if not topo.is_trainer:
        try:
            result = engine_side(args)
        except Exception:
            traceback.print_exc()
            result = {"arch": args.arch, "pass": False, "error": traceback.format_exc()}
        os.makedirs(args.out, exist_ok=True)
        suffix = "" if args.quantization == "none" else f"_{args.quantization}"
        with open(os.path.join(args.out, f"sglang_parity_{args.arch}{suffix}.json"), "w") as f:
            json.dump(result, f, indent=1)
        log("PASS" if result["pass"] else "FAIL", args.arch)
        status = 0 if result["pass"] else 1
    else:
        log("trainer: idle until the engine is done (it never enters sglang's groups)")
    close_topology(topo, timeout_s=600.0)
    return status


if __name__ == "__main__":
    sys.exit(main())
