"""sglang settings that every sglang colocate starts shares: the Engine arguments
(`offline_engine_kwargs`) and the flashinfer switch, which must hold in every process sglang
starts.

The flashinfer switch: sgl_kernel routes rmsnorm, fused_add_rmsnorm and top-k/top-p
sampling to flashinfer whenever flashinfer imports, and flashinfer then JIT-compiles CUDA
sources (absent from the slim offline bundle, slow anyway). Setting
`sgl_kernel.elementwise._has_flashinfer = False` and `sgl_kernel.sampling._has_flashinfer =
False` right after those modules load keeps sgl_kernel on its precompiled kernels.

In-process that is one assignment (`avoid_flashinfer_jit`). But sglang's offline `Engine`
spawns its scheduler (and detokenizer) in fresh Python processes, where an in-process
assignment does not exist. So `offline_engine_env()` puts this package's `_sitecustomize/`
directory (and the directory holding `colocate` itself) on PYTHONPATH and sets
COLOCATE_SGLANG_NO_FLASHINFER=1: every child Python then imports that `sitecustomize`, which
installs `install_import_hook()` below, and the switch is set the moment sgl_kernel's modules
load there too. A child that cannot import colocate says so on stderr (one line).
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV_SWITCH = "COLOCATE_SGLANG_NO_FLASHINFER"
"""Set to 1 in a process's environment: its sitecustomize turns the flashinfer routing off."""

_SWITCHED_MODULES = ("sgl_kernel.elementwise", "sgl_kernel.sampling")
_SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sitecustomize")


def _switch_off(module) -> None:
    if hasattr(module, "_has_flashinfer"):
        module._has_flashinfer = False
    else:
        log.warning("%s has no _has_flashinfer switch; flashinfer may JIT-compile",
                    module.__name__)


def avoid_flashinfer_jit() -> None:
    """Switch sgl_kernel's routing to flashinfer off in this process (imports sgl_kernel)."""
    try:
        import sgl_kernel.elementwise
        import sgl_kernel.sampling
    except ImportError:
        return
    for name in _SWITCHED_MODULES:
        _switch_off(sys.modules[name])


class _SwitchAfterLoad(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of the switched modules so the switch is
    set right after the module body runs, before any caller can use it."""

    def find_spec(self, name, path, target=None):
        if name not in _SWITCHED_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_switch(module):
            exec_module(module)
            _switch_off(module)

        spec.loader.exec_module = exec_then_switch
        return spec


def install_import_hook() -> None:
    """Set the switch whenever sgl_kernel's modules load in this process (idempotent)."""
    if not any(isinstance(f, _SwitchAfterLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _SwitchAfterLoad())
    for name in _SWITCHED_MODULES:  # already imported: switch now
        if name in sys.modules:
            _switch_off(sys.modules[name])


def _package_root() -> str | None:
    """The directory holding this `colocate` package, for a child's PYTHONPATH; None when it
    is one of this interpreter's site directories (the child finds it there itself, and a
    site directory on PYTHONPATH would come before the standard library)."""
    import site

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    site_dirs = site.getsitepackages() + [site.getusersitepackages()]
    return None if any(os.path.realpath(root) == os.path.realpath(d) for d in site_dirs) \
        else root


def offline_engine_kwargs(path: str, *, dtype, mem_fraction: float, seed: int,
                          cuda_graph: bool, attention_backend: str = "triton",
                          load_format: str = "auto", **extra) -> dict:
    """Keyword arguments of sglang's `Engine` (= its ServerArgs) for the target at `path`:
    the ones `colocate generate`, `colocate eval` and the training engine share, plus
    `extra` (which may not redefine them). `dtype`: a torch.dtype or its name."""
    kwargs = dict(
        model_path=os.path.abspath(path),  # a relative path could be taken for a hub id
        load_format="dummy" if load_format == "dummy" else "auto",
        dtype=dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."),
        skip_tokenizer_init=True,  # token ids in and out: the prompts are ours, already encoded
        attention_backend=attention_backend,
        sampling_backend="pytorch",  # flashinfer's sampling kernels would JIT-compile
        disable_cuda_graph=not cuda_graph,
        mem_fraction_static=mem_fraction,
        random_seed=seed,
        log_level="warning",
    )
    assert not kwargs.keys() & extra.keys(), f"redefined: {sorted(kwargs.keys() & extra.keys())}"
    return {**kwargs, **extra}


def offline_engine_env() -> None:
    """Make the switch reach every process an sglang `Engine` spawns (call before creating
    it): children inherit os.environ, and Python imports `sitecustomize` at start-up. The
    sitecustomize imports colocate, so PYTHONPATH also gets the directory of THIS colocate:
    a child started elsewhere (another cwd) must not find none, or another checkout's."""
    install_import_hook()
    os.environ[ENV_SWITCH] = "1"
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    wanted = [p for p in (_SITE_DIR, _package_root()) if p is not None]
    os.environ["PYTHONPATH"] = os.pathsep.join(wanted + [p for p in paths if p not in wanted])
