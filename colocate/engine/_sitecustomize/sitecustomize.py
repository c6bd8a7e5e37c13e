"""Imported by Python at start-up in processes whose PYTHONPATH holds this directory (set by
colocate.engine.sglang_env.offline_engine_env for sglang's spawned scheduler processes).

It only acts when COLOCATE_SGLANG_NO_FLASHINFER=1, and then only installs an import hook
(importing colocate.engine imports torch, which the sglang processes import anyway). When
colocate cannot be imported, the switch is not set in this process and flashinfer may
JIT-compile: one line on stderr says so instead of silence."""

import os

if os.environ.get("COLOCATE_SGLANG_NO_FLASHINFER") == "1":
    try:
        from colocate.engine.sglang_env import install_import_hook
    except ImportError as e:
        import sys

        sys.stderr.write(f"colocate sitecustomize (pid {os.getpid()}): cannot import colocate "
                         f"({e}); sgl_kernel is not kept off flashinfer here, which may "
                         "JIT-compile. Put the directory holding colocate on PYTHONPATH\n")
    else:
        install_import_hook()
