"""Shared fixtures.

``tiny_assets`` builds the tiny tokenizer and targets once per test session into a
temporary directory (about half a minute, most of it training the Llama target; no
network), so tests never depend on what happens to be built in the checkout.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BUILD = os.path.join(REPO_ROOT, "examples", "tiny", "build.py")


def load_tiny_builder():
    """examples/tiny/build.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("tiny_build", TINY_BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_builder():
    """The examples/tiny/build.py module (generate_conversations, build, DATA_PATH, ...)."""
    return load_tiny_builder()


@pytest.fixture(scope="session")
def tiny_assets(tiny_builder, tmp_path_factory) -> dict[str, str]:
    """Paths from ``build()``: tokenizer, target_llama, target_qwen3 (dirs), data (JSONL)."""
    return tiny_builder.build(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_assets):
    """The tiny ChatML tokenizer (a fast tokenizer; treat it as read-only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
