"""Build an offline wheel bundle of sglang 0.5.17 for an air-gapped GPU host.

    python launch/sglang_bundle.py [OUT_DIR]        (default .whl_sgl; keep it out of git)

Run it where the package registry is reachable. The bundle (~49 MiB) holds what a host
with Python 3.12 and torch 2.11 (cu130) lacks to run sglang's model runner, scheduler and
offline Engine in-process, with the parts colocate never loads removed:
sglang's Rust gateway, gRPC, multimodal and diffusion parts; sgl_kernel's FA3, flashmla and
sm100 libraries (only sm90 `common_ops` is loaded with triton attention); flashinfer's JIT
sources (nothing is compiled with triton attention and the pytorch sampler); xgrammar's
static library and headers. Debug sections of shared libraries are stripped.
Downloads are cached in $SGLANG_BUNDLE_CACHE (default /tmp/sglang-bundle-cache).
Install on the GPU host: docs/sglang.md.
"""

import base64
import csv
import fnmatch
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile

# sglang 0.5.17's own pins, then its import-time closure that a torch 2.11 host lacks or
# has in a version sglang rejects (transformers 5.12.1 needs tokenizers <= 0.23.0).
WHEELS = [
    "sglang==0.5.17", "sglang-kernel==0.4.5", "flashinfer_python==0.6.15.post1",
    "transformers==5.12.1", "xgrammar==0.2.1", "openai==2.6.1", "apache-tvm-ffi==0.1.11",
    "tokenizers==0.22.2", "pydantic==2.14.3", "pydantic_core==2.50.4",
    "typing_inspection==0.4.5", "annotated_types==0.8.0", "orjson==3.13.0", "pybase64==1.5.1",
    "msgspec==0.22.0", "pyzmq==27.3.0", "starlette==1.10.0", "sniffio==1.3.1", "distro==1.9.0",
    "dill==0.4.1", "ipython==9.18.1", "traitlets==5.16.1", "compressed-tensors==0.20.0",
    "loguru==0.7.3", "gguf==0.19.0", "partial_json_parser==0.2.1.1.post7",
    "setproctitle==1.3.8", "fastapi==0.165.0", "uvicorn==0.54.0", "opentelemetry-api==1.45.2",
]
# Also imported, present on the verified GPU host; add them for a host without them.
WHEELS_IF_MISSING = ["torchvision==0.26.0", "pillow==13.0.0", "nvidia-ml-py==13.615.71",
                     "annotated-doc==0.0.7"]

# Entries dropped from a wheel, by the wheel's normalized name.
DROP = {
    "sglang": ["sglang/srt/grpc/_core*.so", "sglang/srt/server/_core*.so",
               "sglang/srt/multimodal/_core*.so", "sglang/multimodal_gen/*"],
    "sglang_kernel": ["sgl_kernel/flash_ops*.so", "sgl_kernel/infllm_ops*.so",
                      "sgl_kernel/flashmla_ops*.so", "sgl_kernel/sm100/*"],
    "flashinfer_python": ["flashinfer/data/cccl/*", "flashinfer/data/csrc/*",
                          "flashinfer/data/cutlass/*", "flashinfer/data/include/*",
                          "flashinfer/data/spdlog/*"],
    "xgrammar": ["xgrammar/lib/*", "xgrammar/include/*"],
}

PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def normalize(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def download(spec: str, cache: str) -> str:
    """The cached wheel of `spec` (name==version), downloaded when missing."""
    name, version = spec.split("==")

    def cached():
        for f in os.listdir(cache):
            parts = f.split("-")
            if f.endswith(".whl") and normalize(parts[0]) == normalize(name) and parts[1] == version:
                return os.path.join(cache, f)
        return None

    if cached() is None:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", cache, spec]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run(cmd, check=True)
    path = cached()
    if path is None:
        raise SystemExit(f"sglang_bundle: pip downloaded no wheel for {spec} into {cache}")
    return path


def strip_debug(data: bytes) -> bytes:
    """An ELF shared library without its DWARF sections (xgrammar ships ~50 MB of them);
    code and symbols untouched. Unchanged when `strip` is missing or fails."""
    with tempfile.NamedTemporaryFile(suffix=".so", delete=False) as f:
        f.write(data)
    try:
        ok = subprocess.run(["strip", "--strip-debug", f.name], capture_output=True).returncode == 0
        return open(f.name, "rb").read() if ok else data
    except FileNotFoundError:
        return data
    finally:
        os.unlink(f.name)


def repack(src: str, out_dir: str, drop: list[str]) -> None:
    """Copy the wheel without the `drop` entries and with stripped libraries; its RECORD
    is rewritten so pip verifies the new contents."""
    dst = os.path.join(out_dir, os.path.basename(src))
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED,
                                                      compresslevel=9) as zout:
        record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in zin.infolist():
            name = info.filename
            if name == record or name.endswith("/") or any(fnmatch.fnmatch(name, p) for p in drop):
                continue
            data = zin.read(name)
            if (name.endswith(".so") or ".so." in name) and data[:4] == b"\x7fELF":
                data = strip_debug(data)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            rows.append((name, f"sha256={digest.decode()}", str(len(data))))
        rows.append((record, "", ""))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        zout.writestr(record, text.getvalue())
    print(f"{os.path.basename(dst)}: {os.path.getsize(dst) / 2**20:.1f} MiB")


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else ".whl_sgl"
    cache = os.environ.get("SGLANG_BUNDLE_CACHE", "/tmp/sglang-bundle-cache")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(cache, exist_ok=True)
    for old in os.listdir(out_dir):
        if old.endswith(".whl"):
            os.remove(os.path.join(out_dir, old))
    specs = WHEELS + (WHEELS_IF_MISSING if os.environ.get("WITH_HOST_PACKAGES") == "1" else [])
    for spec in specs:
        wheel = download(spec, cache)
        repack(wheel, out_dir, DROP.get(normalize(spec.split("==")[0]), []))
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"{len(specs)} wheels in {out_dir}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
