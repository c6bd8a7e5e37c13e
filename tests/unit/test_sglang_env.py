"""The flashinfer switch reaches processes spawned the way sglang's Engine spawns its
scheduler: a fresh interpreter that inherits only the environment."""

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import pytest

from colocate.engine import sglang_env


@pytest.fixture
def fake_sgl_kernel(tmp_path, monkeypatch):
    """A stand-in sgl_kernel whose modules set `_has_flashinfer = True` when they load."""
    pkg = tmp_path / "sgl_kernel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("elementwise", "sampling"):
        (pkg / f"{name}.py").write_text("_has_flashinfer = True\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("sgl_kernel", "sgl_kernel.elementwise", "sgl_kernel.sampling"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("sgl_kernel", "sgl_kernel.elementwise", "sgl_kernel.sampling"):
        sys.modules.pop(name, None)


_CHILD = textwrap.dedent("""
    import sgl_kernel.elementwise, sgl_kernel.sampling
    print(sgl_kernel.elementwise._has_flashinfer, sgl_kernel.sampling._has_flashinfer)
""")


def _child_flags(env):
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_without_the_env_a_child_keeps_flashinfer(fake_sgl_kernel):
    assert _child_flags(dict(os.environ)) == ["True", "True"]


def test_offline_engine_env_switches_it_off_in_children(fake_sgl_kernel, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ["PYTHONPATH"])  # restored after the test
    monkeypatch.delenv(sglang_env.ENV_SWITCH, raising=False)
    sglang_env.offline_engine_env()
    assert _child_flags(dict(os.environ)) == ["False", "False"]
    # And in this process, through the import hook.
    import sgl_kernel.elementwise
    assert sgl_kernel.elementwise._has_flashinfer is False


def _spawned(queue):
    import sgl_kernel.sampling
    queue.put(sgl_kernel.sampling._has_flashinfer)


def test_multiprocessing_spawn_children_get_it(fake_sgl_kernel, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ["PYTHONPATH"])
    monkeypatch.delenv(sglang_env.ENV_SWITCH, raising=False)
    sglang_env.offline_engine_env()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_spawned, args=(queue,))
    proc.start()
    try:
        assert queue.get(timeout=60) is False
    finally:
        proc.join(timeout=60)


def test_children_import_this_colocate_from_any_directory(tmp_path, monkeypatch):
    # The sitecustomize imports colocate: a child started in another directory must find
    # this checkout's (here an editable install may point at another checkout, or none).
    import colocate

    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.delenv(sglang_env.ENV_SWITCH, raising=False)
    sglang_env.offline_engine_env()
    sglang_env.offline_engine_env()  # idempotent
    root = os.path.dirname(os.path.dirname(os.path.abspath(colocate.__file__)))
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [sglang_env._SITE_DIR, root,
                                                          "/somewhere/else"]
    out = subprocess.run([sys.executable, "-c", "import colocate; print(colocate.__file__)"],
                         cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert os.path.realpath(out.stdout.strip()) == os.path.realpath(colocate.__file__)


def test_a_site_directory_is_not_put_on_the_path(monkeypatch):
    import site

    import colocate

    root = os.path.dirname(os.path.dirname(os.path.abspath(colocate.__file__)))
    monkeypatch.setattr(site, "getsitepackages", lambda: ["/usr/lib/python3/x", root])
    assert sglang_env._package_root() is None


def test_a_child_that_cannot_import_colocate_says_so(tmp_path):
    broken = tmp_path / "colocate"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('no colocate here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([sglang_env._SITE_DIR, str(tmp_path)]),
               **{sglang_env.ENV_SWITCH: "1"})
    out = subprocess.run([sys.executable, "-c", "print('ran')"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "ran\n"
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "cannot import colocate (no colocate here)" in lines[0], lines
    assert "flashinfer" in lines[0] and "PYTHONPATH" in lines[0]


def test_offline_engine_kwargs_are_one_set_for_every_sglang_we_start(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    kw = sglang_env.offline_engine_kwargs("model", dtype=torch.bfloat16, mem_fraction=0.3,
                                          seed=7, cuda_graph=False, tp_size=2)
    assert kw == {"model_path": str(tmp_path / "model"), "load_format": "auto",
                  "dtype": "bfloat16", "skip_tokenizer_init": True,
                  "attention_backend": "triton", "sampling_backend": "pytorch",
                  "disable_cuda_graph": True, "mem_fraction_static": 0.3, "random_seed": 7,
                  "log_level": "warning", "tp_size": 2}
    kw = sglang_env.offline_engine_kwargs("/m", dtype="float16", mem_fraction=0.5, seed=0,
                                          cuda_graph=True, load_format="dummy")
    assert kw["dtype"] == "float16" and kw["load_format"] == "dummy"
    assert kw["disable_cuda_graph"] is False
    with pytest.raises(AssertionError, match="redefined"):
        sglang_env.offline_engine_kwargs("/m", dtype="float16", mem_fraction=0.5, seed=0,
                                         cuda_graph=False, random_seed=1)
