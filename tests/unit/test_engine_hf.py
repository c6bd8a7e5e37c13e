"""The transformers engine against plain transformers forwards on the tiny targets.

The reference runs every sequence ALONE (no packing) through a separately loaded
AutoModelForCausalLM with output_hidden_states=True; the engine runs them packed. Equality
proves both the capture (hooks = hidden_states[id + 1], final norm = hidden_states[-1]) and
that packed sequences do not attend to each other.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from colocate.config import Config, TargetSection
from colocate.engine import build_engine
from colocate.engine.hf import HFTargetEngine
from tests.unit.test_engine_base import make_batch, read_slot, slot_writer

SEQ_LENS = [9, 1, 14, 6]  # a single-token sequence too: its boundary is the subtlest
ATOL = 2e-5  # fp32; packed and per-sequence attention only differ in summation order


def reference(path: str, attn: str):
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                 attn_implementation=attn)
    return model.eval()


def unpacked_features(model, batch, aux_layer_ids):
    """(aux [T, n*H], last [T, H]) from one plain forward per sequence."""
    aux, last, start = [], [], 0
    for n in batch.seq_lens.tolist():
        with torch.no_grad():
            out = model(input_ids=batch.input_ids[None, start:start + n], output_hidden_states=True)
        hidden = out.hidden_states  # (embeddings, layer 0 out, ..., final norm out)
        aux.append(torch.cat([hidden[i + 1][0] for i in aux_layer_ids], dim=-1))
        last.append(hidden[-1][0])
        start += n
    return torch.cat(aux), torch.cat(last)


def engine_features(engine, batch):
    writer = slot_writer(engine.slot_bytes(64, 64))
    engine.prefill(batch, writer, budget=64)
    got = read_slot(writer)
    return got["aux_hidden"].clone(), got["last_hidden"].clone(), writer


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_capture_equals_unpacked_transformers(tiny_assets, kind, attn):
    path = tiny_assets[f"target_{kind}"]
    engine = HFTargetEngine(path, dtype=torch.float32, device=torch.device("cpu"),
                            aux_layer_ids=[0, 2, 4], attn_implementation=attn)
    assert engine.attn_implementation == attn and engine.num_layers == 6
    batch = make_batch(SEQ_LENS, engine.vocab_size, seed=1)
    aux, last, writer = engine_features(engine, batch)
    ref_aux, ref_last = unpacked_features(reference(path, attn), batch, [0, 2, 4])
    torch.testing.assert_close(aux, ref_aux, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(last, ref_last, atol=ATOL, rtol=1e-5)
    assert writer.meta["num_tokens"] == sum(SEQ_LENS) and writer.meta["num_sequences"] == 4


def test_default_ids_and_repeated_layers_fill_every_column(tiny_assets):
    path = tiny_assets["target_llama"]
    engine = HFTargetEngine(path, dtype=torch.float32, device=torch.device("cpu"))
    assert engine.aux_layer_ids == [1, 2, 2]  # Eagle3's default repeats layer 2 at L=6
    batch = make_batch([5, 7], engine.vocab_size, seed=2)
    aux, _, _ = engine_features(engine, batch)
    ref_aux, _ = unpacked_features(reference(path, "sdpa"), batch, [1, 2, 2])
    torch.testing.assert_close(aux, ref_aux, atol=ATOL, rtol=1e-5)
    assert torch.equal(aux[:, 128:256], aux[:, 256:])


def test_a_later_sequence_does_not_change_earlier_features(tiny_assets):
    engine = HFTargetEngine(tiny_assets["target_qwen3"], dtype=torch.float32,
                            device=torch.device("cpu"))
    first = make_batch([8, 6], engine.vocab_size, seed=3)
    ids = first.input_ids.clone()
    ids[8:] = (ids[8:] + 1) % engine.vocab_size  # a different second sequence
    second = make_batch([8, 6], engine.vocab_size, seed=3)
    second = type(second)(**{**second.__dict__, "input_ids": ids})
    aux_a, last_a, _ = engine_features(engine, first)
    aux_b, last_b, _ = engine_features(engine, second)
    assert torch.equal(aux_a[:8], aux_b[:8]) and torch.equal(last_a[:8], last_b[:8])
    assert not torch.allclose(last_a[8:], last_b[8:])


def test_isolation_comes_from_position_ids_without_cache(tiny_assets):
    """Negative control for the tests above: with a cache transformers skips the packing
    check and the second sequence attends to the first, so the comparison would catch a
    leak. This is why the engine passes use_cache=False."""
    engine = HFTargetEngine(tiny_assets["target_llama"], dtype=torch.float32,
                            device=torch.device("cpu"))
    batch = make_batch([8, 6], engine.vocab_size, seed=4)
    _, last, _ = engine_features(engine, batch)
    with torch.no_grad():
        leaky = engine.base(input_ids=batch.input_ids[None], position_ids=batch.positions[None],
                            use_cache=True).last_hidden_state[0]
    assert torch.allclose(leaky[:8], last[:8], atol=ATOL)
    assert not torch.allclose(leaky[8:], last[8:], atol=1e-3)


def test_build_engine_from_config(tiny_assets):
    cfg = Config(target=TargetSection(path=tiny_assets["target_llama"], aux_layer_ids=[0, 3]))
    engine = build_engine(cfg, torch.device("cpu"))
    assert isinstance(engine, HFTargetEngine)
    assert (engine.dtype, engine.aux_layer_ids, engine.hidden_size) == (torch.float32, [0, 3], 128)
    assert engine.attn_implementation == "sdpa"
    assert engine.vocab_size == engine.model.get_input_embeddings().num_embeddings
    assert all(not p.requires_grad for p in engine.model.parameters())


def test_bad_aux_ids_fail_at_construction(tiny_assets):
    with pytest.raises(ValueError, match=r"target.aux_layer_ids: \[5\] out of range.*0\.\.4"):
        HFTargetEngine(tiny_assets["target_llama"], dtype=torch.float32,
                       device=torch.device("cpu"), aux_layer_ids=[1, 5])


def test_single_sequence_takes_the_plain_causal_path(tiny_assets):
    # One sequence: transformers finds no packing and uses sdpa's is_causal, no mask at all.
    path = tiny_assets["target_qwen3"]
    engine = HFTargetEngine(path, dtype=torch.float32, device=torch.device("cpu"))
    batch = make_batch([17], engine.vocab_size, seed=5)
    aux, last, _ = engine_features(engine, batch)
    ref_aux, ref_last = unpacked_features(reference(path, "sdpa"), batch, engine.aux_layer_ids)
    torch.testing.assert_close(aux, ref_aux, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(last, ref_last, atol=ATOL, rtol=1e-5)
