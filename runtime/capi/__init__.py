"""Build ``libddpm_rt``, the C ABI (``ddpm_rt.h``), with cffi's embedding mode.

    python -m ddpm_rt.capi --out build/capi      # -> build/capi/libddpm_rt.so + ddpm_rt.h

Why cffi's embedding mode: the runtime is Python (NumPy + ONNX Runtime + tokenizers); cffi
turns a plain C header into a shared library whose functions run Python, starting the
interpreter on the first call (without signal handlers), with no hand-written CPython API
code and no second implementation to keep in step. The price: the library needs libpython
and a Python environment with ddpm-rt installed at run time (see ddpm_rt.h). Needs
``cffi`` (the ``capi`` extra) and a C compiler.
"""

from __future__ import annotations

import argparse
import re
import shutil
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

HEADER = Path(__file__).with_name("ddpm_rt.h")


def _declarations() -> str:
    """The header's declarations as cffi's cdef reads them (no preprocessor lines)."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    keep = [ln for ln in text.splitlines() if not ln.strip().startswith("#")]
    body = "\n".join(keep)
    body = body.replace('extern "C" {', "").rstrip().rstrip("}")
    return body


def _init_code(site_dirs: list[str]) -> str:
    return f"""
import os, site, warnings
from libddpm_rt import ffi
_dirs = [d for d in os.environ.get("DDPM_RT_PYTHONPATH", "").split(":") if d] or {site_dirs!r}
for _d in _dirs:
    site.addsitedir(_d)
warnings.simplefilter("ignore")
from ddpm_rt.capi._impl import bind
bind(ffi)
"""


def build(out: Path, verbose: bool = False) -> Path:
    import cffi

    out.mkdir(parents=True, exist_ok=True)
    ffi = cffi.FFI()
    ffi.embedding_api(_declarations())
    ffi.set_source("libddpm_rt", '#include "ddpm_rt.h"', include_dirs=[str(HEADER.parent)])
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    ffi.embedding_init_code(_init_code([d for d in site_dirs if Path(d).is_dir()]))
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(ffi.compile(tmpdir=tmp, target="libddpm_rt.*", verbose=verbose))
        dest = out / lib.name
        shutil.copy2(lib, dest)
    shutil.copy2(HEADER, out / HEADER.name)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_rt.capi", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for libddpm_rt and ddpm_rt.h")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    try:
        lib = build(Path(args.out), args.verbose)
    except ModuleNotFoundError:
        print("error: building the C ABI needs cffi: pip install 'ddpm-rt[capi]'", file=sys.stderr)
        return 1
    print(
        f"wrote {lib} and {Path(args.out) / HEADER.name} (libpython: "
        f"{sysconfig.get_config_var('LIBDIR')})",
        file=sys.stderr,
    )
    return 0
