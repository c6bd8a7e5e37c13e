"""The start-up GEMM check (colocate/gemm_check.py) on the CPU. The one thing this machine
cannot reach is a GEMM library that computes wrong results under an MPS SM cap, so the tests
hand the real checker a deliberately wrong matmul in its place."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from colocate import gemm_check
from colocate.config import ConfigError
from colocate.draft.teacher import LOGIT_CHUNK_TOKENS
from colocate.gemm_check import GEMMS, GemmFailure, GemmShape

FORWARD, GRAD_X, GRAD_W = GEMMS
TINY = SimpleNamespace(num_hidden_layers=1, hidden_size=64, intermediate_size=160,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       vocab_size=300)


def wrong_when(result_shape: tuple[int, int], spoil):
    """torch.matmul, except that `spoil` edits results of `result_shape` in place."""
    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(a, b)
        if tuple(out.shape) == result_shape:
            spoil(out)
        return out
    return matmul


def test_correct_gemms_pass_at_the_models_shapes():
    shapes = (gemm_check.trainer_gemm_shapes(TINY, 96, draft_vocab_size=200)
              + gemm_check.engine_gemm_shapes(TINY, 96))
    assert gemm_check.check_gemms(shapes, "cpu") == []
    errors = gemm_check.gemm_errors(shapes[0], torch.device("cpu"))
    assert len(errors) == 3  # a trained layer: forward and both backward GEMMs
    for rows_err, column_err in errors:  # bf16 rounding only
        assert 0 < rows_err < 1e-2 and 0 < column_err < gemm_check.PROJECTION_TOL / 3
    assert len(gemm_check.gemm_errors(GemmShape(16, 8, 8, backward=False),
                                      torch.device("cpu"))) == 1  # forward only


def test_a_wrong_gemm_is_named_with_its_shape():
    shapes = [(48, 32, 16), (48, 16, 40)]
    # dw of the second shape is [40, 16]; no other result of either shape has that size.
    spoil = wrong_when((40, 16), lambda out: out.mul_(1.5))
    [failure] = gemm_check.check_gemms(shapes, "cpu", matmul=spoil)
    assert failure.shape == GemmShape(48, 16, 40) and failure.gemm == GRAD_W
    assert 0.3 < failure.error < 1.0
    assert "backward dw = dy.T @ x at 48x16->40" in str(failure)


def test_a_wrong_tile_outside_the_sampled_rows_is_caught():
    # sample_rows=0 leaves only the projection of all rows. An 8 x 8 tile of a 1024 x 512
    # result zeroed: a relative L2 over the whole projection (about 0.016) would pass it;
    # its worst column (about 0.12 of the RMS) does not.
    spoil = wrong_when((1024, 512), lambda out: out[:8, :8].zero_())
    failures = gemm_check.check_gemms([(1024, 32, 512)], "cpu", sample_rows=0, matmul=spoil)
    assert [f.gemm for f in failures] == [FORWARD]


def test_nan_is_a_failure():
    def nan_once(out):
        out[3, 5] = float("nan")
    failures = gemm_check.check_gemms([(32, 16, 24)], "cpu",
                                      matmul=wrong_when((32, 16), nan_once))
    assert [f.gemm for f in failures] == [GRAD_X] and math.isnan(failures[0].error)


QWEN3_8B = SimpleNamespace(num_hidden_layers=36, hidden_size=4096, intermediate_size=12288,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           vocab_size=151936)


def test_trainer_shapes_cover_the_draft_once_at_two_row_counts():
    shapes = gemm_check.trainer_gemm_shapes(QWEN3_8B, 65536, draft_vocab_size=32000)
    by_dims = {s[:3]: s.name for s in shapes}
    assert len(by_dims) == len(shapes) and all(s.backward for s in shapes)  # deduplicated
    t = gemm_check.MAX_TOKENS
    for rows in (t, t // 2):  # a full micro-step and a half one
        assert by_dims[(rows, 4096, 4096)] == "q_proj, o_proj"
        assert by_dims[(rows, 4096, 1024)] == "k_proj, v_proj"
        assert by_dims[(rows, 8192, 4096)] == "Eagle3 q_proj"
        assert by_dims[(rows, 12288, 4096)] == "fc, down_proj"  # 3 x hidden == intermediate
        assert by_dims[(rows, 4096, 12288)] == "gate_proj, up_proj"
        assert by_dims[(rows, 4096, 32000)] == "draft lm_head"
    assert by_dims[(LOGIT_CHUNK_TOKENS, 4096, 151936)] == "target lm_head"
    small = gemm_check.trainer_gemm_shapes(QWEN3_8B, 512, draft_vocab_size=10 ** 6)
    assert {s.tokens for s in small} == {512, 256}
    assert (512, 4096, 151936) in {s[:3] for s in small}  # draft vocab clamped to the target's


def test_engine_shapes_are_forward_only_fused_and_split_over_tensor_parallel_gpus():
    shapes = gemm_check.engine_gemm_shapes(QWEN3_8B, 8192, tp_size=2)
    assert not any(s.backward for s in shapes)
    by_dims = {s[:3]: s.name for s in shapes if s.tokens == 8192}
    assert by_dims[(8192, 4096, 3072)] == "qkv_proj"  # (4096 + 2 x 1024) / 2
    assert by_dims[(8192, 4096, 12288)] == "gate_up_proj"  # 2 x 12288 / 2
    assert by_dims[(8192, 4096, 2048)] == "q_proj"
    assert by_dims[(8192, 2048, 4096)] == "o_proj"
    assert by_dims[(8192, 6144, 4096)] == "down_proj"
    assert {s.tokens for s in shapes} == {8192, 4096}


# --------------------------------------------------------------------------- the start-up hook


def failing_check(shapes, device):  # stands in for check_gemms
    return [GemmFailure(GemmShape(*shapes[0]), GRAD_X, 0.4)]


def must_not_run(*args):
    raise AssertionError("the check ran although no cap applies")


@pytest.mark.parametrize("role,percent", [("trainer", 70), ("engine", 50)])
def test_a_capped_role_with_a_wrong_gemm_stops_naming_its_key(role, percent):
    with pytest.raises(ConfigError) as raised:
        gemm_check.check_sm_cap(role, percent, mps_active=True, device="cuda",
                                shapes=lambda: [(4096, 4096, 4096)], check=failing_check)
    msg = str(raised.value)
    assert msg.startswith(f"mps.{role}_sm_percent={percent}: ")
    assert "backward dx = dy @ w at 4096x4096->4096: relative error 0.4" in msg
    assert "wrong results under this MPS SM cap" in msg and "60, 70 and 80" in msg
    assert f"Set mps.{role}_sm_percent=100 (the default)" in msg


@pytest.mark.parametrize("percent,active,device", [(100, True, "cuda"), (70, False, "cuda"),
                                                   (70, True, "cpu")])
def test_no_check_without_a_cap_mps_or_cuda(percent, active, device):
    gemm_check.check_sm_cap("trainer", percent, mps_active=active, device=device,
                            shapes=must_not_run, check=must_not_run)


def test_a_capped_role_that_computes_right_logs_and_goes_on(caplog):
    with caplog.at_level(logging.INFO, logger="colocate.gemm_check"):
        gemm_check.check_sm_cap("engine", 60, mps_active=True, device="cuda",
                                shapes=lambda: [(8, 8, 8), (8, 8, 16)], check=lambda s, d: [])
    assert "mps.engine_sm_percent=60: the GEMMs of 2 shapes agree" in caplog.text
