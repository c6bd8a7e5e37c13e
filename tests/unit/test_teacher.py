"""The Eagle3 teacher: draft.teacher_argmax=fp8 against the exact full-vocabulary reference."""

import pytest
import torch

from colocate.config import load_config
from colocate.draft import teacher as teacher_mod
from colocate.draft.eagle3_recipe import Eagle3Recipe
from colocate.draft.recipe import FrozenTarget
from colocate.draft.teacher import Fp8ArgmaxTeacher, fp8_rows, target_distribution, teacher_for

H, V, VD = 64, 150, 37  # 113 other rows: not a multiple of 16, so the padding is exercised


def fp8_matmul_works() -> bool:
    try:
        values, scales = fp8_rows(torch.ones(16, 16))
        torch._scaled_mm(values, values.T, scale_a=scales, scale_b=scales.T,
                         out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


needs_fp8 = pytest.mark.skipif(not fp8_matmul_works(), reason="this torch has no CPU FP8 matmul")


def head_and_hidden(num_tokens=300, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=gen).to(dtype)
    hidden = (torch.randn(num_tokens, H, generator=gen) * 0.5).to(dtype)
    draft_ids = torch.randperm(V, generator=gen)[:VD].sort().values
    return hidden, weight, draft_ids


def test_fp8_rows_round_trip_within_e4m3_precision():
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2)) * 7
    values, scales = fp8_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (40, 1)
    back = values.float() * scales
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values in its normal range.
    assert ((back - x).abs() <= x.abs() / 16 + scales * 2 ** -9).all()
    torch.testing.assert_close(back.abs().amax(-1), x.abs().amax(-1))  # the row maximum is kept


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_teacher_soft_labels_equal_exact_and_argmax_differs_only_at_near_ties(dtype):
    hidden, weight, draft_ids = head_and_hidden(dtype=dtype)
    exact = target_distribution(hidden, weight, draft_ids)
    got = Fp8ArgmaxTeacher(weight, draft_ids, chunk_tokens=64)(hidden)  # several chunks

    # The soft labels come from the head's own rows in its dtype: the same distribution.
    torch.testing.assert_close(got.logits, exact.logits)
    torch.testing.assert_close(got.lse, exact.lse)
    assert torch.equal(got.top, exact.top)

    # in_draft: equal wherever the draft and non-draft maxima are further apart than FP8's
    # error on these logits; such rows must be most of them, with both outcomes present.
    full = hidden.double() @ weight.double().T
    is_draft = torch.zeros(V, dtype=torch.bool)
    is_draft[draft_ids] = True
    gap = (full[:, is_draft].amax(-1) - full[:, ~is_draft].amax(-1)).abs()
    # Two e4m3 roundings (<= 2^-4 each, random in sign) summed over H terms: the FP8 logits
    # here are off by ~1% of the row's largest logit, at most ~5%.
    clear = gap > 0.05 * full.abs().amax(-1)
    assert clear.float().mean() > 0.75
    assert torch.equal(got.in_draft[clear], exact.in_draft[clear])
    assert exact.in_draft[clear].any() and not exact.in_draft[clear].all()
    assert (got.in_draft == exact.in_draft).float().mean() > 0.95


@needs_fp8
def test_fp8_teacher_counts_an_exact_tie_as_in_the_draft():
    # Entries in {-1, 0, 1} and hidden states in {0, 1}: FP8 holds them exactly, so the FP8
    # logits are the exact integers. A non-draft row equal to the top draft row ties it; the
    # exact path then takes the lower token id, fp8 counts the position as in the draft.
    gen = torch.Generator().manual_seed(5)
    weight = torch.randint(-1, 2, (V, H), generator=gen).float()
    draft_ids = torch.randperm(V, generator=gen)[:VD].sort().values
    other = next(i for i in range(V) if i not in set(draft_ids.tolist()))
    top_draft = int(draft_ids[0])
    weight[other] = weight[top_draft]
    hidden = (weight[top_draft] > 0).float().expand(8, H)  # those two rows score highest
    teacher = Fp8ArgmaxTeacher(weight, draft_ids)
    assert torch.equal(teacher.other_max(hidden), (hidden @ weight[top_draft]))
    assert teacher(hidden).in_draft.all()


@needs_fp8
def test_fp8_teacher_whole_vocabulary_draft_is_always_in_draft():
    hidden, weight, _ = head_and_hidden(num_tokens=20)
    got = Fp8ArgmaxTeacher(weight, torch.arange(V))(hidden)
    exact = target_distribution(hidden, weight, torch.arange(V))
    assert got.in_draft.all() and torch.equal(got.top, exact.top)


@needs_fp8
def test_recipe_binds_the_teacher_the_config_names():
    hidden, weight, draft_ids = head_and_hidden(num_tokens=8)
    frozen = FrozenTarget(embed=weight, lm_head=weight, draft_ids=draft_ids)
    recipe = Eagle3Recipe(load_config(None, ["target.path=x", "draft.teacher_argmax=fp8"]))
    recipe.bind_frozen(frozen)
    bound = recipe._teacher[1](hidden)
    direct = Fp8ArgmaxTeacher(weight, draft_ids)(hidden)
    assert torch.equal(bound.in_draft, direct.in_draft)  # the FP8 argmax, not the exact one
    exact = teacher_for("exact", weight, draft_ids)(hidden)
    torch.testing.assert_close(bound.logits, exact.logits)


def test_fp8_teacher_refusals_name_the_key(monkeypatch):
    _, weight, draft_ids = head_and_hidden()
    with pytest.raises(ValueError, match="draft.teacher_argmax.*multiple of 16"):
        Fp8ArgmaxTeacher(weight[:, :40], draft_ids)

    def no_fp8(*args, **kwargs):  # a device without FP8 matmul (e.g. an A100)
        raise RuntimeError("torch._scaled_mm is only supported on CUDA sm89+")

    monkeypatch.setattr(teacher_mod.torch, "_scaled_mm", no_fp8)
    with pytest.raises(ValueError, match="draft.teacher_argmax: fp8 needs row-scaled FP8.*use exact"):
        Fp8ArgmaxTeacher(weight, draft_ids)
    with pytest.raises(ValueError, match="draft.teacher_argmax"):
        load_config(None, ["target.path=x", "draft.teacher_argmax=int8"])
