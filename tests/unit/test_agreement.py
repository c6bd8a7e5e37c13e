"""The start-up agreement's messages (train/agreement.py), from hand-made views."""

from colocate.config import load_config
from colocate.train.agreement import (TrainerView, config_hash, disagreement, flat_config,
                                      shared_path_problems)


def view(rank, node, config="c0", data="d0" * 8, vocab="v0"):
    return TrainerView(rank, node, config, data, vocab)


def test_agreeing_trainers_pass():
    assert disagreement([view(0, "node 0 (a)"), view(2, "node 1 (b)")]) is None


def test_vocabulary_alone_names_the_rank_and_nothing_else():
    msg = disagreement([view(0, "node 0 (a)"), view(2, "node 1 (b)"), view(4, "node 2 (c)",
                                                                         vocab="v9")])
    assert msg.startswith("trainers disagree on what they train: trainer rank 4 on node 2 (c) "
                          "differs from trainer rank 0 on node 0 (a) in the draft vocabulary "
                          "(sha v0 vs v9)")
    assert "rank 2" not in msg and "data key" not in msg and "the config" not in msg


def test_config_difference_lists_the_keys():
    a, b = load_config(None, ["train.lr=1e-3"]), load_config(None, ["train.lr=2e-3"])
    assert config_hash(a) != config_hash(b) and config_hash(a) == config_hash(load_config(
        None, ["train.lr=0.001"]))
    views = [view(0, "n0", config_hash(a)), view(2, "n1", config_hash(b))]
    msg = disagreement(views, [flat_config(a), flat_config(b)])
    assert "in the config (hash" in msg and "train.lr 0.001 vs 0.002)" in msg


def test_missing_run_dir_and_data_are_named_per_node():
    ok = ("node 0 (a)", True, "/shared/run", True, "/shared/data.jsonl")
    views = [ok, ok, ("node 1 (b)", False, "/shared/run", False, "/shared/data.jsonl"),
             ("node 1 (b)", False, "/shared/run", False, "/shared/data.jsonl")]
    run, data = shared_path_problems(views)
    assert run.startswith("run.dir is not shared: ranks 2-3 on node 1 (b) do not see the probe")
    assert data.startswith("data.path is not readable by ranks 2-3 on node 1 (b) (looked for "
                           "/shared/data.jsonl)")
    assert shared_path_problems([ok, ok]) == []
