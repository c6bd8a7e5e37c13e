"""The engine interface without a model: aux layer ids, batch checks, slot layout, FakeEngine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from colocate.config import Config, EngineSection, TargetSection
from colocate.data.packing import MicroBatch
from colocate.draft.eagle3_recipe import eagle3_layer_ids as default_aux_layer_ids
from colocate.engine import (FEATURE_NAMES, FakeEngine, build_engine, resolve_aux_layer_ids,
                             resolve_target_dtype)
from colocate.transport.layout import check_layout, dtype_from_name
from colocate.transport.ring import SlotOverflow, SlotWriter


def feature_needs(hidden_size, num_aux, dtype):
    """Eagle3's requirement table (the default recipe's)."""
    from colocate.config import load_config
    from colocate.draft.recipe import recipe_for

    return recipe_for(load_config(None)).feature_needs(hidden_size, num_aux, dtype)


def make_batch(seq_lens: list[int], vocab_size: int, seed: int = 0) -> MicroBatch:
    """A packed micro-batch of random tokens, laid out like `pack_micro_batch` does."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(seq_lens)
    return MicroBatch(
        input_ids=torch.randint(0, vocab_size, (num_tokens,), generator=gen),
        positions=torch.cat([torch.arange(n) for n in seq_lens]),
        loss_mask=torch.rand(num_tokens, generator=gen) < 0.5,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        indices=torch.arange(len(seq_lens)), epoch=0, start_state={}, end_state={})


def slot_writer(num_bytes: int) -> SlotWriter:
    """The real SlotWriter over one plain CPU buffer (a stand-in ring: no peer needed)."""
    buffer = torch.zeros(num_bytes, dtype=torch.uint8)
    ring = SimpleNamespace(slot_bytes=num_bytes, channel=SimpleNamespace(me="test engine"),
                           slots=SimpleNamespace(buffers=[buffer]))
    return SlotWriter(ring, slot=0, step=0)


def read_slot(writer: SlotWriter) -> dict[str, torch.Tensor]:
    """What a consumer would see: views of the slot bytes per the writer's layout."""
    buffer = writer._ring.slots.buffers[0]
    return {s.name: buffer[s.offset:s.offset + s.nbytes].view(dtype_from_name(s.dtype))
            .view(s.shape) for s in writer.specs}


# --------------------------------------------------------------------------- aux layer ids


def test_default_aux_layer_ids_follow_eagle3():
    assert default_aux_layer_ids(32) == [1, 15, 28]
    assert default_aux_layer_ids(6) == [1, 2, 2]  # repeats for shallow targets, like sglang
    assert resolve_aux_layer_ids(None, 36) == [1, 17, 32]


def test_too_shallow_for_default_says_set_the_key():
    with pytest.raises(ValueError, match=r"target\.aux_layer_ids.*only 3 decoder layers.*\[0, 1\]"):
        default_aux_layer_ids(3)


def test_aux_layer_id_out_of_range_names_key_range_and_reason():
    with pytest.raises(ValueError) as e:
        resolve_aux_layer_ids([0, 5, -1], num_layers=6)
    text = str(e.value)
    assert "target.aux_layer_ids" in text and "[5, -1]" in text and "0..4" in text
    assert "final norm" in text and "last_hidden" in text
    assert resolve_aux_layer_ids([0, 4], num_layers=6) == [0, 4]
    with pytest.raises(ValueError, match="target.aux_layer_ids: empty"):
        resolve_aux_layer_ids([], num_layers=6)


# --------------------------------------------------------------------------- prefill checks


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine(hidden_size=16, num_layers=8, vocab_size=50, seed=3)


@pytest.mark.parametrize("method, sp_size", [("eagle3", 1), ("dflash", 1), ("eagle3", 2)])
def test_the_engine_writes_exactly_what_the_recipe_trains_from(method, sp_size):
    # One definition of the message (transport.layout.feature_needs): the recipe's needs,
    # handed to the engine, are what its slot holds; DFlash's has no last_hidden, and with
    # sequence parallelism the halo features are longer than the chunk.
    from colocate.config import load_config
    from colocate.draft.recipe import recipe_for
    from colocate.sequence_parallel import SpChunk

    recipe = recipe_for(load_config(None, [f"draft.method={method}",
                                           f"train.sp_size={sp_size}"]))
    engine = FakeEngine(hidden_size=16, num_layers=8, vocab_size=50, seed=3)
    needs = recipe.feature_needs(engine.hidden_size, engine.num_aux, engine.dtype)
    engine.use_needs(needs)
    batch = make_batch([5, 1, 7], engine.vocab_size)
    chunk = SpChunk(0, sp_size, recipe.sp_halo) if sp_size > 1 else None
    writer = slot_writer(engine.slot_bytes(16, 16, chunk))
    engine.prefill(batch, writer, budget=16, chunk=chunk)
    assert sorted(s.name for s in writer.specs) == sorted(needs)
    assert ("last_hidden" in needs) == (method == "eagle3")
    assert check_layout(writer.specs, needs) == []


def test_prefill_writes_every_feature_where_the_trainer_expects_it(fake):
    batch = make_batch([5, 1, 7], fake.vocab_size)
    writer = slot_writer(fake.slot_bytes(16, 16))
    fake.prefill(batch, writer, budget=16)

    assert [s.name for s in writer.specs] == list(FEATURE_NAMES)
    assert check_layout(writer.specs, feature_needs(16, 3, torch.float32)) == []
    got = read_slot(writer)
    for name in ("input_ids", "positions", "loss_mask", "seq_lens"):
        assert torch.equal(got[name], getattr(batch, name)), name
    aux, last = fake.features(batch.input_ids, batch.positions)
    assert torch.equal(got["aux_hidden"], aux) and torch.equal(got["last_hidden"], last)
    assert writer.meta == {"num_tokens": 13, "num_sequences": 3, "aux_layer_ids": [1, 3, 4]}


def test_layout_mismatch_is_detected_by_feature_needs(fake):
    writer = slot_writer(fake.slot_bytes(16, 16))
    fake.prefill(make_batch([4, 4], fake.vocab_size), writer, budget=16)
    problems = check_layout(writer.specs, feature_needs(16, 2, torch.bfloat16))
    assert any("'aux_hidden' has dtype float32" in p for p in problems)
    assert any("'aux_hidden' dim 1 is 48, the trainer needs 32" in p for p in problems)


def test_over_budget_names_budget_and_batch_and_writes_nothing(fake):
    writer = slot_writer(fake.slot_bytes(16, 16))
    with pytest.raises(ValueError) as e:
        fake.prefill(make_batch([9, 8], fake.vocab_size), writer, budget=16)
    text = str(e.value)
    assert "data.tokens_per_micro_step=16" in text and "17 tokens in 2 sequences" in text
    assert writer.specs == []  # refused up front: no partial or truncated write


@pytest.mark.parametrize("mutate, match", [
    (lambda b: {"seq_lens": torch.tensor([5, 4], dtype=torch.int32)}, "do not sum to 10"),
    (lambda b: {"positions": torch.arange(10)}, "first mismatch at token 5"),
    (lambda b: {"loss_mask": b.loss_mask[:9]}, r"loss_mask has shape \[9\]"),
    (lambda b: {"input_ids": b.input_ids.clone().fill_(50)}, "outside the target's vocabulary"),
])
def test_malformed_batches_are_refused(fake, mutate, match):
    good = make_batch([5, 5], fake.vocab_size)
    bad = MicroBatch(**{**good.__dict__, **mutate(good)})
    with pytest.raises(ValueError, match=match):
        fake.prefill(bad, slot_writer(fake.slot_bytes(16, 16)), budget=16)


def test_slot_bytes_holds_a_full_budget_of_single_token_sequences(fake):
    budget = 12
    size = fake.slot_bytes(budget, max_sequences=budget)
    fake.prefill(make_batch([1] * budget, fake.vocab_size), slot_writer(size), budget=budget)
    with pytest.raises(SlotOverflow):  # and slot_bytes is not oversized by a whole tensor
        fake.prefill(make_batch([1] * budget, fake.vocab_size), slot_writer(size - 256),
                     budget=budget)


def test_fake_engine_is_deterministic_per_token_and_dtype():
    a = FakeEngine(8, 6, 20, aux_layer_ids=[0, 4], dtype=torch.bfloat16, seed=1)
    b = FakeEngine(8, 6, 20, aux_layer_ids=[0, 4], dtype=torch.bfloat16, seed=1)
    ids, pos = torch.tensor([3, 4, 3]), torch.tensor([0, 1, 0])
    aux, last = a.features(ids, pos)
    assert aux.dtype == last.dtype == torch.bfloat16 and aux.shape == (3, 16)
    assert torch.equal(aux, b.features(ids, pos)[0])
    assert torch.equal(aux[0], aux[2])  # same token, same position
    assert not torch.equal(aux[:, :8], aux[:, 8:])  # layers differ
    other = FakeEngine(8, 6, 20, aux_layer_ids=[0, 4], dtype=torch.bfloat16, seed=2)
    assert not torch.equal(aux, other.features(ids, pos)[0])


# --------------------------------------------------------------------------- build_engine


def test_target_dtype_auto_depends_on_device():
    assert resolve_target_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_target_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_target_dtype("float16", torch.device("cpu")) == torch.float16


def test_sglang_backend_without_sglang_names_the_install(monkeypatch):
    from colocate import patches

    monkeypatch.setattr(patches, "find_sglang", lambda: None)
    cfg = Config(engine=EngineSection(backend="sglang"))
    with pytest.raises(patches.PatchError, match="engine.backend=sglang: sglang is not installed"):
        build_engine(cfg, torch.device("cpu"))


@pytest.mark.parametrize("setup, match", [
    (lambda d: None, "is not a directory"),
    (lambda d: d.mkdir(), "has no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "but no weights"),
])
def test_missing_model_names_target_path(tmp_path, setup, match):
    path = tmp_path / "model"
    setup(path)
    cfg = Config(target=TargetSection(path=str(path)))
    with pytest.raises(ValueError, match=f"target.path: .*{match}"):
        build_engine(cfg, torch.device("cpu"))
