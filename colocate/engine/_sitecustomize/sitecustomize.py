"""Imported by Python at start-up in processes whose PYTHONPATH holds this directory (set by
colocate.engine.sglang_env.offline_engine_env for sglang's spawned scheduler processes).

It only acts when COLOCATE_SGLANG_NO_FLASHINFER=1, and then only installs an import hook:
importing colocate here costs nothing else (no torch, no sglang)."""

import os

if os.environ.get("COLOCATE_SGLANG_NO_FLASHINFER") == "1":
    try:
        from colocate.engine.sglang_env import install_import_hook
    except ImportError:  # colocate not importable in this process: nothing to switch
        pass
    else:
        install_import_hook()
