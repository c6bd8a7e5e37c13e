"""Are this GPU's bf16 GEMMs right? A start-up check for ranks under an MPS SM cap.

On an H200 (torch 2.11, cu130), as an MPS client with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=70,
cuBLAS returned a plain bf16 4096x4096x4096 `x @ w.T` and its two backward GEMMs with a
relative error of 0.3-0.4 against float64: wrong, silently. Which shapes fail depends on the
cap (at the Qwen3-8B shapes: many at 60, 70 and 80, none at 50 and 90). A capped rank
therefore runs the GEMMs its model will run, at the model's shapes, before any real work:

    shapes = lambda: trainer_gemm_shapes(target_config, cfg.data.tokens_per_micro_step)
    check_sm_cap("trainer", 70, mps_active=True, device=dev, shapes=shapes)  # raises if wrong

Each shape (tokens, in_features, out_features) is checked the way autograd issues a linear
layer: forward y = x @ w.T, backward dx = dy @ w and dw = dy.T @ x. The device computes
whole results (the GEMM library picks its kernel by shape, so the shape must be the real
one); the host recomputes in float64 only a few sampled rows of each, plus one projection
of all its rows onto random weights, which keeps the check to seconds even at lm_head sizes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from colocate.config import ConfigError
from colocate.draft.teacher import LOGIT_CHUNK_TOKENS
from colocate.metrics import Geometry

log = logging.getLogger(__name__)

MAX_TOKENS = 16384
"""Rows checked per shape at most (the host copies grow with them): larger micro-steps are
checked at this many rows, which is not proof for theirs."""
_HOST_CHUNK_ELEMENTS = 1 << 25  # float64 elements per host chunk (256 MiB)

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GemmShape(NamedTuple):
    tokens: int
    in_features: int
    out_features: int
    name: str = ""
    """Which layers use it (for messages only)."""
    backward: bool = True
    """Check the two backward GEMMs too (layers that are trained)."""

    def __str__(self) -> str:
        where = f" ({self.name})" if self.name else ""
        return f"{self.tokens}x{self.in_features}->{self.out_features}{where}"


@dataclass(frozen=True)
class GemmFailure:
    shape: GemmShape
    gemm: str
    """forward y = x @ w.T, backward dx = dy @ w or backward dw = dy.T @ x."""
    error: float
    """`combined_error` against float64 (NaN when the result had NaN)."""

    def __str__(self) -> str:
        return f"{self.gemm} at {self.shape}: relative error {self.error:.3g}"


GEMMS = ("forward y = x @ w.T", "backward dx = dy @ w", "backward dw = dy.T @ x")


# --------------------------------------------------------------------------- the shapes


def _row_counts(tokens: int) -> list[int]:
    """A full micro-step and a half one: packing leaves micro-steps short of the budget, and
    which GEMMs went wrong under a cap depended on the row count."""
    full = max(1, min(int(tokens), MAX_TOKENS))
    return sorted({full, max(1, full // 2)}, reverse=True)


def _merged(named: list[tuple[int, int, int, str, bool]]) -> list[GemmShape]:
    merged: dict[tuple[int, int, int, bool], list[str]] = {}
    for t, k, n, name, backward in named:
        merged.setdefault((t, k, n, backward), []).append(name)
    return [GemmShape(t, k, n, ", ".join(names), backward)
            for (t, k, n, backward), names in merged.items()]


def engine_gemm_shapes(hf_config: Any, tokens: int, *, tp_size: int = 1) -> list[GemmShape]:
    """The forward GEMMs of a target layer as an engine runs them on `tokens` rows: the
    projections one by one (hf) and fused (sglang: q/k/v in one, gate/up in one), each
    split over `tp_size` GPUs."""
    g = Geometry.from_hf_config(hf_config)
    hidden = g.hidden_size
    q, kv = g.num_heads * g.head_dim // tp_size, g.num_kv_heads * g.head_dim // tp_size
    inter = g.intermediate_size // tp_size
    named = []
    for rows in _row_counts(tokens):
        named += [(rows, hidden, q, "q_proj", False), (rows, hidden, kv, "k_proj, v_proj", False),
                  (rows, hidden, q + 2 * kv, "qkv_proj", False), (rows, q, hidden, "o_proj", False),
                  (rows, hidden, inter, "gate_proj, up_proj", False),
                  (rows, hidden, 2 * inter, "gate_up_proj", False),
                  (rows, inter, hidden, "down_proj", False)]
    return _merged(named)


def trainer_gemm_shapes(hf_config: Any, tokens: int, *, draft_vocab_size: int | None = None,
                        draft_intermediate_size: int = 0, num_aux: int = 3) -> list[GemmShape]:
    """The GEMMs a draft trainer runs on `tokens` rows, forward and backward: the draft
    layers (target-sized attention and MLP, Eagle3's 2 x hidden q/k/v inputs, the fc over
    `num_aux` target hidden states, the draft lm_head) and the full-vocabulary head on the
    chunks the teacher (and DFlash's loss) compute it in. A superset for either method:
    a shape the method does not run can only make the check stricter.

    `draft_vocab_size`: the Eagle3 lm_head's rows (clamped to the target vocabulary; None:
    the target's). `draft_intermediate_size`: draft.intermediate_size (0: the target's)."""
    g = Geometry.from_hf_config(hf_config)
    hidden, q, kv = g.hidden_size, g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    inter, vocab = draft_intermediate_size or g.intermediate_size, g.vocab_size
    draft_vocab = min(vocab, draft_vocab_size or vocab)
    named = []
    for rows in _row_counts(tokens):
        named += [(rows, hidden, q, "q_proj", True), (rows, hidden, kv, "k_proj, v_proj", True),
                  (rows, q, hidden, "o_proj", True),
                  (rows, 2 * hidden, q, "Eagle3 q_proj", True),
                  (rows, 2 * hidden, kv, "Eagle3 k_proj, v_proj", True),
                  (rows, num_aux * hidden, hidden, "fc", True),
                  (rows, hidden, inter, "gate_proj, up_proj", True),
                  (rows, inter, hidden, "down_proj", True),
                  (rows, hidden, draft_vocab, "draft lm_head", True)]
    named.append((min(_row_counts(tokens)[0], LOGIT_CHUNK_TOKENS), hidden, vocab,
                  "target lm_head", True))
    return _merged(named)


# --------------------------------------------------------------------------- the check


PROJECTION_TOL = 5e-2
"""Per-column error of a projection, over the reference's RMS. bf16 rounding of the result
alone gives about 0.002 per column (0.011 at most over 150k columns); one wrong 128 x 128
tile in 16,384 rows gives about 0.12."""


def check_gemms(shapes: Sequence[tuple], device: torch.device | str, *,
                sample_rows: int = 8, tol: float = 2e-2, seed: int = 0,
                matmul: Matmul = torch.matmul) -> list[GemmFailure]:
    """Run each shape's GEMMs (forward; backward too unless the shape says not) on `device`
    in bf16 and compare with float64 on the host; returns the failures (empty: all within
    tolerance).

    `matmul` is the device GEMM under test (tests pass a broken one). bf16 inputs with
    float32 accumulation land near 2e-3 here; the H200's wrong results were near 0.3."""
    device = torch.device(device)
    failures = []
    for index, shape in enumerate(shapes):
        shape = GemmShape(*shape)
        errors = gemm_errors(shape, device, sample_rows=sample_rows, seed=seed + index,
                             matmul=matmul)
        for gemm, (rows_err, column_err) in zip(GEMMS, errors):
            err = combined_error(rows_err, column_err, tol)
            if not err <= tol:  # NaN compares False: a NaN result fails
                failures.append(GemmFailure(shape, gemm, err))
    if device.type == "cuda":
        # The engine sizes its KV cache from free memory: give the check's blocks back.
        torch.cuda.empty_cache()
    return failures


def combined_error(rows_err: float, column_err: float, tol: float = 2e-2) -> float:
    """One number per GEMM in the sampled rows' unit (relative L2), the projection's column
    error scaled by `tol` / PROJECTION_TOL: within `tol` means right; NaN never is."""
    return _worst(rows_err, column_err * tol / PROJECTION_TOL)


def gemm_errors(shape: tuple, device: torch.device, *, sample_rows: int = 8, seed: int = 0,
                matmul: Matmul = torch.matmul) -> list[tuple[float, float]]:
    """For each GEMM checked at `shape` (GEMMS, in order: the forward, then the backward
    ones if `shape` has them), (relative L2 error of the sampled rows, the projection's
    worst column over the reference's RMS); NaN if the result had NaN."""
    shape = GemmShape(*shape)
    t, k, n = shape.tokens, shape.in_features, shape.out_features
    # Inputs are drawn on the device: drawing 10^8 numbers on the host would cost seconds.
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        # Scaled so that every result stays near unit size.
        return torch.randn(*size, generator=gen, device=device, dtype=torch.bfloat16) * scale

    x_TK, w_NK = randn(t, k), randn(n, k, scale=k ** -0.5)
    dy_TN = randn(t, n) if shape.backward else None
    # Sampled rows miss a wrong tile elsewhere, so each result is also projected onto
    # random row weights (v^T y against (v^T x) w^T): one more row, every column of which
    # sums over all rows. The device applies the weights with elementwise and reduction
    # kernels, not the GEMM library under test.
    v_T = torch.randn(t, generator=gen, device=device)
    u_N = torch.randn(n, generator=gen, device=device)

    def project(weights: torch.Tensor, m: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return (weights.unsqueeze(1 - dim) * m.float()).sum(dim)

    picker = torch.Generator().manual_seed(seed)
    rows = torch.randperm(t, generator=picker)[:sample_rows]      # of y and dx
    out_rows = torch.randperm(n, generator=picker)[:sample_rows]  # of dw
    rows_dev, out_rows_dev = rows.to(device), out_rows.to(device)
    x_host, w_host = x_TK.cpu(), w_NK.cpu()

    def host(*parts: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.cpu().double().reshape(-1, p.shape[-1]) for p in parts])

    # Each reference is one host GEMM: the sampled rows plus the projection's row (last).
    y_TN = matmul(x_TK, w_NK.T)
    pairs = [(host(y_TN[rows_dev], project(v_T, y_TN)),
              _host_mm(w_host, host(x_host[rows], project(v_T, x_TK)).T).T)]
    del y_TN
    if dy_TN is not None:
        dx_TK = matmul(dy_TN, w_NK)
        pairs.append((host(dx_TK[rows_dev], project(v_T, dx_TK)),
                      _host_mm(host(dy_TN[rows_dev], project(v_T, dy_TN)), w_host)))
        del dx_TK
        dw_NK = matmul(dy_TN.T, x_TK)
        pairs.append((host(dw_NK[out_rows_dev], project(u_N, dw_NK)),
                      _host_mm(host(dy_TN[:, out_rows_dev].T, project(u_N, dy_TN, dim=1)),
                               x_host)))
    return [(_rel(got[:-1], ref[:-1]), _worst_column(got[-1], ref[-1])) for got, ref in pairs]


def _host_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float64, the large operand converted a chunk of its (contiguous) rows at a
    time: a float64 copy of a whole lm_head would be gigabytes."""
    if a.numel() >= b.numel():  # chunks of output rows
        chunk = max(1, _HOST_CHUNK_ELEMENTS // max(1, a.shape[1]))
        b = b.double()
        return torch.cat([a[start:start + chunk].double() @ b
                          for start in range(0, a.shape[0], chunk)])
    chunk = max(1, _HOST_CHUNK_ELEMENTS // max(1, b.shape[1]))  # chunks of the inner dim
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for start in range(0, b.shape[0], chunk):
        out += a[:, start:start + chunk].double() @ b[start:start + chunk].double()
    return out


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()  # NaN in, NaN out


def _worst_column(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst column's error over the reference's RMS: one wrong tile moves a few columns a
    lot, which a relative L2 over all of them would dilute."""
    rms = ref.pow(2).mean().sqrt().clamp(min=1e-30)
    return ((got - ref).abs().max() / rms).item()  # NaN in, NaN out


def _worst(a: float, b: float) -> float:
    return a if a != a else b if b != b else max(a, b)  # NaN wins: built-in max may drop it


# --------------------------------------------------------------------------- start-up


def check_sm_cap(role: str, sm_percent: int, *, mps_active: bool, device: torch.device | str,
                 shapes: Callable[[], Sequence[tuple]],
                 check: Callable[..., list] = check_gemms) -> None:
    """Start-up hook: a rank whose role runs under an MPS SM cap checks its GEMM shapes.

    Does nothing at 100 (the default), without MPS (the cap is then not applied) and off
    CUDA. Raises ConfigError naming mps.<role>_sm_percent, the first failure and the fix
    when a GEMM is wrong; logs the shapes' count and the time when all pass. `shapes` gives
    the role's shapes (asked only when checked); `check` is `check_gemms` (tests inject
    failures). Passing is evidence, not proof: only these shapes and row counts are run."""
    device = torch.device(device)
    if sm_percent >= 100 or not mps_active or device.type != "cuda":
        return
    key = f"mps.{role}_sm_percent"
    start = time.perf_counter()
    shapes = shapes()
    failures = check(shapes, device)
    took = time.perf_counter() - start
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ConfigError(
            f"{key}={sm_percent}: the GPU's GEMM library computed wrong results under this "
            f"MPS SM cap: {failures[0]}{more} against float64 on the host (measured on an "
            f"H200: caps of 60, 70 and 80 gave wrong bf16 GEMMs). Set {key}=100 (the default); "
            "tests/gpu/gemm_cap_probe.py checks other caps on this GPU")
    log.info("%s=%d: the GEMMs of %d shapes agree with float64 under the MPS SM cap (%.1f s)",
             key, sm_percent, len(shapes), took)
