"""The sglang eval's parts that need no GPU: the engine arguments from an export, and the
spawned process that holds one engine (its failure reaches the parent as one error)."""

import pytest

from colocate.eval.exported import EvalError, ExportedDraft
from colocate.eval.sglang_eval import _in_child, speculative_args


def test_chain_arguments_from_the_export():
    export = ExportedDraft("/x/export", {"architectures": ["LlamaForCausalLMEagle3"]})
    assert speculative_args(export, 4) == {
        "speculative_algorithm": "EAGLE3", "speculative_draft_model_path": "/x/export",
        "speculative_num_steps": 4, "speculative_eagle_topk": 1,
        "speculative_num_draft_tokens": 5}


def test_unknown_architecture_names_the_file():
    export = ExportedDraft("/x/export", {"architectures": ["MedusaModel"]})
    with pytest.raises(EvalError, match="/x/export/config.json: architecture 'MedusaModel'"):
        speculative_args(export, 4)


def test_a_failing_engine_process_reports_its_cause():
    # Without sglang the child fails at its import; with it, at Engine() without a model.
    with pytest.raises(RuntimeError, match="the sglang engine failed: .*Error"):
        _in_child({}, [[1, 2, 3]], {"max_new_tokens": 1}, 1)
