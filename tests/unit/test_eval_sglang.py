"""The sglang eval's parts that need no GPU: the engine arguments from an export, and the
spawned process that holds one engine (its failure reaches the parent as one error)."""

from multiprocessing import get_context

import pytest

from colocate.eval.exported import EvalError, ExportedDraft
from colocate.eval.sglang_eval import _in_child, _last_word, _spec_counts, speculative_args


def test_chain_arguments_from_the_export():
    export = ExportedDraft("/x/export", {"architectures": ["LlamaForCausalLMEagle3"]})
    assert speculative_args(export, 4) == {
        "speculative_algorithm": "EAGLE3", "speculative_draft_model_path": "/x/export",
        "speculative_num_steps": 4, "speculative_eagle_topk": 1,
        "speculative_num_draft_tokens": 5}


def test_block_arguments_from_a_dflash_export():
    config = {"architectures": ["DFlashDraftModel"], "block_size": 16,
              "dflash_config": {"mask_token_id": 5, "target_layer_ids": [1, 9, 17, 25, 33]}}
    export = ExportedDraft("/x/export", config)
    assert export.aux_layer_ids == [1, 9, 17, 25, 33]
    with pytest.warns(UserWarning, match="eval.steps=4 does not apply to a DFlash draft.*15"):
        num_steps = export.method.num_steps(config, 4)
    assert num_steps == 15
    # sglang's DFLASH: the verify window is the block; num_steps and topk must be 1.
    assert speculative_args(export, num_steps) == {
        "speculative_algorithm": "DFLASH", "speculative_draft_model_path": "/x/export",
        "speculative_num_draft_tokens": 16, "speculative_num_steps": 1,
        "speculative_eagle_topk": 1}
    # parse_dflash_draft_config reads dflash_config.block_size first, then the top level.
    nested = {**config, "dflash_config": {**config["dflash_config"], "block_size": 8}}
    assert ExportedDraft("/x", nested).method.num_steps(nested, 7) == 7


def test_unknown_architecture_names_the_file():
    export = ExportedDraft("/x/export", {"architectures": ["MedusaModel"]})
    with pytest.raises(EvalError, match="/x/export/config.json: architecture 'MedusaModel'"):
        speculative_args(export, 4)


def test_a_failing_engine_process_reports_its_cause():
    # Without sglang the child fails at its import; with it, at Engine() without a model.
    with pytest.raises(RuntimeError, match="the sglang engine failed: .*Error"):
        _in_child({}, [[1, 2, 3]], {"max_new_tokens": 1}, 1)


def test_histogram_under_its_new_name_first_then_the_alias():
    both = {"completion_tokens": 9, "spec_verify_ct": 4,
            "spec_correct_drafts_histogram": [1, 0, 3], "spec_accept_histogram": [9, 9]}
    assert _spec_counts(both) == {"completion_tokens": 9, "spec_verify_ct": 4,
                                  "histogram": [1, 0, 3]}
    alias_only = {"completion_tokens": 9, "spec_verify_ct": 4, "spec_accept_histogram": [2, 2]}
    assert _spec_counts(alias_only)["histogram"] == [2, 2]
    # No draft (the baseline engine), or no verify step: neither key, nor spec_verify_ct.
    assert _spec_counts({"completion_tokens": 1}) == {"completion_tokens": 1,
                                                      "spec_verify_ct": 0, "histogram": []}


def _post_and_exit(results):
    results.put((True, {"posted": 1}))


def test_a_child_that_posted_and_exited_is_not_dead_without_an_answer():
    ctx = get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_post_and_exit, args=(results,))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert _last_word(results, proc) == (True, {"posted": 1})
    silent = ctx.Process(target=int)  # exits at once, posts nothing
    silent.start()
    silent.join(timeout=60)
    with pytest.raises(RuntimeError, match=r"died \(exit code 0\) before reporting"):
        _last_word(ctx.Queue(), silent)
