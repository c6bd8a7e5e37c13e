"""`colocate patches check|apply` against fake installed sglang trees."""

import os

import pytest

from colocate import patches
from colocate.engine.sglang_hooks import HOOK_TARGETS, SOURCE_MARKERS


def fake_tree(tmp_path, version="0.5.17", drop=None):
    """A tmp `sglang/` with __version__ and every function/marker the hooks rely on."""
    root = tmp_path / "site" / "sglang"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text(f"__version__ = '{version}'\n")
    files = {}
    for rel, name, _ in HOOK_TARGETS:
        files.setdefault(rel, []).append(f"def {name}(*args, **kwargs):\n    pass\n")
    for rel, marker, _ in SOURCE_MARKERS:
        files.setdefault(rel, []).append(f"# {marker}\n")
    for rel, parts in files.items():
        text = "".join(parts)
        if drop:
            text = text.replace(drop, "removed")
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_real_layout_passes(tmp_path):
    report = patches.check(fake_tree(tmp_path), patch_root=str(tmp_path / "none"))
    assert report.ok, report.problems
    assert report.version == "0.5.17"
    assert any("runtime hooks only" in line for line in report.lines)
    patches.require_sglang(fake_tree(tmp_path / "again"))


def test_missing_sglang(tmp_path):
    report = patches.check(str(tmp_path / "nowhere"))
    assert not report.ok and "not installed" in report.problems[0]
    with pytest.raises(patches.PatchError, match="engine.backend=sglang: sglang is not installed"):
        patches.require_sglang(str(tmp_path / "nowhere"))


def test_unsupported_version(tmp_path):
    with pytest.raises(patches.PatchError, match="sglang 0.5.19 is not supported.*0.5.17"):
        patches.require_sglang(fake_tree(tmp_path, version="0.5.19"))


@pytest.mark.parametrize("rel,name", [(r, n) for r, n, _ in HOOK_TARGETS])
def test_a_wrapped_function_that_disappears_fails_the_check(tmp_path, rel, name):
    report = patches.check(fake_tree(tmp_path, drop=f"def {name}("))
    assert not report.ok
    assert any(name in p and rel in p for p in report.problems)


@pytest.mark.parametrize("rel,marker", [(r, m) for r, m, _ in SOURCE_MARKERS])
def test_a_changed_source_line_fails_the_check(tmp_path, rel, marker):
    report = patches.check(fake_tree(tmp_path, drop=marker))
    assert not report.ok and any(marker in p for p in report.problems)


def test_version_from_underscore_version_file(tmp_path):
    root = tmp_path / "sglang"
    root.mkdir()
    (root / "__init__.py").write_text("from sglang.version import __version__\n")
    (root / "_version.py").write_text("__version__ = version = '0.5.17'\n")
    assert patches.installed_version(str(root)) == "0.5.17"


def test_patch_files_are_checked_and_applied(tmp_path):
    if os.system("command -v patch >/dev/null") != 0:
        pytest.skip("no patch(1)")
    root = fake_tree(tmp_path)
    target = os.path.join(root, "srt", "mem_cache", "memory_pool.py")
    original = open(target).read().splitlines(keepends=True)
    patch_dir = tmp_path / "patches" / "0.5.17"
    patch_dir.mkdir(parents=True)
    body = "".join(" " + line for line in original)
    (patch_dir / "demo.patch").write_text(
        "# sglang 0.5.17: demo patch for the test; remove with the test.\n"
        "# marker: colocate-demo-marker\n"
        "--- a/sglang/srt/mem_cache/memory_pool.py\n"
        "+++ b/sglang/srt/mem_cache/memory_pool.py\n"
        f"@@ -1,{len(original)} +1,{len(original) + 1} @@\n"
        f"{body}+# colocate-demo-marker\n")
    report = patches.check(root, patch_root=str(tmp_path / "patches"))
    assert not report.ok and any("not applied" in p for p in report.problems)
    report = patches.apply(root, patch_root=str(tmp_path / "patches"))
    assert report.ok, report.problems
    assert "colocate-demo-marker" in open(target).read()
    assert patches.apply(root, patch_root=str(tmp_path / "patches")).ok  # idempotent


def test_cli_is_registered():
    from colocate.cli import _commands

    assert _commands()["patches"][0] == "colocate.patches"
