"""Check (or apply) what the sglang backend needs of the installed sglang.

    python -m colocate patches check [--root DIR]    version, hooked functions, patches
    python -m colocate patches apply [--root DIR]    apply patches/sglang/<version>/*.patch

Nothing here imports sglang (it needs CUDA); the installed files are read as text. For
sglang 0.5.17 the backend needs no patch: runtime hooks (colocate/engine/sglang_hooks.py)
confine sglang to the engine ranks, and `check` verifies that every function they wrap and
every source line they rely on is still there. Patch files, when a future version needs
one, live in patches/sglang/<version>/NAME.patch with a first line `# marker: TEXT` that is
present in the patched file (how `check` tells applied from not), plus why the patch exists
and when it can go; `apply` runs `patch -p1` in the directory holding the sglang package.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import subprocess
from dataclasses import dataclass, field

from colocate.engine.sglang_hooks import HOOK_TARGETS, SOURCE_MARKERS, SUPPORTED_SGLANG

PATCH_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "patches", "sglang")
_INSTALL_HINT = ("install the pinned version: pip install 'colocate[sglang]' (sglang==0.5.17), "
                 "or the offline bundle (docs/sglang.md)")


class PatchError(RuntimeError):
    """sglang missing, unsupported or not as the backend expects; the message says the fix."""


@dataclass
class Report:
    root: str | None                  # the installed sglang package directory
    version: str | None
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.root is not None and not self.problems


def find_sglang() -> str | None:
    """The installed sglang package directory, located without importing it."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def installed_version(root: str) -> str | None:
    """__version__ from the package's files (0.5.17 keeps it in _version.py)."""
    pattern = re.compile(r"""^__version__\s*=\s*(?:\w+\s*=\s*)*['"]([^'"]+)['"]""", re.M)
    for name in ("_version.py", "version.py", "__init__.py"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                m = pattern.search(f.read())
            if m:
                return m.group(1)
    return None


def _read(root: str, rel: str) -> str | None:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def patch_files(version: str, patch_root: str = PATCH_ROOT) -> list[str]:
    return sorted(glob.glob(os.path.join(patch_root, version, "*.patch")))


def _patch_marker(patch_path: str) -> tuple[str, str]:
    """(target file relative to the sglang package, marker text) from a patch's header."""
    with open(patch_path, encoding="utf-8") as f:
        text = f.read()
    marker = re.search(r"^# marker: (.+)$", text, re.M)
    target = re.search(r"^\+\+\+ b/sglang/(\S+)", text, re.M)
    if not marker or not target:
        raise PatchError(f"{patch_path}: needs a '# marker: TEXT' line and a '+++ b/sglang/...' "
                         "header")
    return target.group(1), marker.group(1).strip()


def check(root: str | None = None, patch_root: str = PATCH_ROOT) -> Report:
    """Everything the backend needs of the sglang tree at `root` (default: the installed)."""
    root = find_sglang() if root is None else root
    if root is None or not os.path.isdir(root):
        return Report(None, None, [f"sglang is not installed; {_INSTALL_HINT}"])
    version = installed_version(root)
    report = Report(root, version)
    report.lines.append(f"sglang {version or '<unknown version>'} at {root}; supported: "
                        f"{', '.join(SUPPORTED_SGLANG)}")
    if version not in SUPPORTED_SGLANG:
        report.problems.append(f"sglang {version} is not supported (supported: "
                               f"{', '.join(SUPPORTED_SGLANG)}); {_INSTALL_HINT}")
    for rel, name, why in HOOK_TARGETS:
        text = _read(root, rel)
        found = text is not None and re.search(rf"^def {re.escape(name)}\(", text, re.M)
        state = "found" if found else "MISSING"
        report.lines.append(f"  hook target {rel}:{name}: {state} ({why})")
        if not found:
            report.problems.append(f"sglang/{rel} has no function {name} ({why})")
    for rel, marker, why in SOURCE_MARKERS:
        text = _read(root, rel)
        found = text is not None and marker in text
        report.lines.append(f"  source {rel}: {'found' if found else 'MISSING'} {marker!r}")
        if not found:
            report.problems.append(f"sglang/{rel} no longer contains {marker!r} ({why})")
    patches = patch_files(version or "", patch_root)
    if not patches:
        report.lines.append(f"  patches: none needed for {version} (runtime hooks only)")
    for path in patches:
        rel, marker = _patch_marker(path)
        text = _read(root, rel)
        applied = text is not None and marker in text
        report.lines.append(f"  patch {os.path.basename(path)}: "
                            f"{'applied' if applied else 'NOT APPLIED'}")
        if not applied:
            report.problems.append(f"patch {os.path.basename(path)} is not applied to "
                                   f"sglang/{rel}; run `python -m colocate patches apply`")
    return report


def apply(root: str | None = None, patch_root: str = PATCH_ROOT) -> Report:
    """Apply every not-yet-applied patch for the installed version, then re-check."""
    report = check(root, patch_root)
    if report.root is None:
        raise PatchError(report.problems[0])
    for path in patch_files(report.version or "", patch_root):
        rel, marker = _patch_marker(path)
        if marker in (_read(report.root, rel) or ""):
            continue
        # The patch paths start with sglang/: run in the directory that holds the package.
        result = subprocess.run(["patch", "-p1", "--forward", "-i", path],
                                cwd=os.path.dirname(report.root), capture_output=True,
                                text=True, timeout=60)
        if result.returncode != 0:
            raise PatchError(f"{path} did not apply to {report.root}:\n{result.stdout}"
                             f"{result.stderr}")
    return check(root, patch_root)


def require_sglang(root: str | None = None) -> Report:
    """Start-up check of the sglang backend: PatchError naming the fix unless all is well."""
    report = check(root)
    if not report.ok:
        raise PatchError("engine.backend=sglang: " + "; ".join(report.problems))
    return report


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("check", "apply"))
    p.add_argument("--root", default=None,
                   help="the sglang package directory (default: the one Python would import)")


def main(args: argparse.Namespace) -> int:
    report = apply(args.root) if args.action == "apply" else check(args.root)
    for line in report.lines:
        print(line)
    for problem in report.problems:
        print(f"  problem: {problem}")
    print("OK" if report.ok else "NOT READY")
    return 0 if report.ok else 1
