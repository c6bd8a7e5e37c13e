"""sglang group rank arithmetic in the interleaved layout (engines = odd ranks)."""

import pytest

from colocate.engine.sglang_groups import (UnsupportedSglangGroup, engine_group_layout,
                                           engine_ranks, micro_batch_offsets, tp_groups,
                                           translate_groups, validate_engine_tp)


def test_examples():
    assert tp_groups(8, 2) == [[1, 3], [5, 7]]
    assert tp_groups(8, 4) == [[1, 3, 5, 7]]
    assert tp_groups(2, 1) == [[1]]
    layout = engine_group_layout(5, 8, 2)
    assert (layout.tp_rank, layout.tp_group, layout.world) == (0, (5, 7), (1, 3, 5, 7))
    assert layout.virtual_rank == 2


@pytest.mark.parametrize("world", range(2, 17, 2))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layouts_for_every_world(world, tp):
    engines = engine_ranks(world)
    assert engines == [r for r in range(world) if r % 2]
    if len(engines) % tp:
        with pytest.raises(ValueError, match="engine.tp_size"):
            validate_engine_tp(world, world, tp)
        with pytest.raises(ValueError, match="engine.tp_size"):
            tp_groups(world, tp)
        return
    validate_engine_tp(world, world, tp)
    groups = tp_groups(world, tp)
    assert sorted(r for g in groups for r in g) == engines  # a partition of the engines
    for g in groups:
        assert len(g) == tp and all(r % 2 for r in g)
        assert g == engines[engines.index(g[0]):engines.index(g[0]) + tp]  # consecutive
    for rank in engines:
        layout = engine_group_layout(rank, world, tp)
        assert rank in layout.tp_group and layout.tp_group[layout.tp_rank] == rank
        assert list(layout.tp_group) in groups
        assert layout.world == tuple(engines)


def test_trainer_rank_is_not_an_engine():
    with pytest.raises(ValueError, match="not an engine rank"):
        engine_group_layout(2, 8, 1)


def test_tp_not_dividing_engines_names_key_and_choices():
    with pytest.raises(ValueError, match=r"engine.tp_size: 2 does not divide the 3 engine.*\[1, 3\]"):
        validate_engine_tp(6, 6, 2)


def test_tp_group_must_stay_on_one_node():
    # 2 nodes x 2 GPUs (4 ranks per node, 2 engines per node): tp 4 would span both nodes.
    with pytest.raises(ValueError, match="across nodes"):
        validate_engine_tp(8, 4, 4)
    validate_engine_tp(8, 4, 2)
    validate_engine_tp(8, 4, 4, same_node=False)


def test_translate_groups_maps_engines_and_drops_padding():
    world = (1, 3, 5, 7)  # torch world 8 -> virtual 0..7, engines are virtual 0..3
    assert translate_groups("tp", [[0, 1], [2, 3], [4, 5], [6, 7]], world) == [[1, 3], [5, 7]]
    assert translate_groups("moe_ep", [[v] for v in range(8)], world) == [[1], [3], [5], [7]]
    assert translate_groups("pp", [[0, 2, 4, 6], [1, 3, 5, 7]], world) == [[1], [3], [5], [7]]
    with pytest.raises(UnsupportedSglangGroup, match="attn_cp"):
        translate_groups("attn_cp", [[0, 4], [1, 5]], world)


def test_micro_batch_offsets():
    assert micro_batch_offsets([5, 3, 7]) == [0, 5, 8]
