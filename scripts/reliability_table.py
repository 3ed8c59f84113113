"""Run the hostile-input tests and write docs/reliability.md: the classes tried, how each ends.

    .venv/bin/python scripts/reliability_table.py

Each test case is one hostile input (a crafted bundle, argument, flag or signal); it passes
only when the runtime ends it as specified (one clear error naming what to fix, or a valid
image), so "handled" is the number of passing cases. Property-based tests count each as one
case; the examples hypothesis drew are in the text.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_hostile_bundles.py",
    "tests/test_hostile_inputs.py",
    "tests/test_signals.py",
    "tests/test_residue_files.py",
    "tests/test_residue_serve.py",
]

CLASSES = [  # (key, what was tried, how it must end)
    (
        "cache",
        "per-user optimised-graph cache: a FIFO, a link to /dev/zero or a 1 TiB sparse file "
        "in place of a cached graph or of its record, a record lying about the size",
        "a miss: the entry is rewritten as regular files and the run goes on (no hang, no "
        "MemoryError)",
    ),
    (
        "serve",
        "HTTP requests: a lone surrogate as a field's name or value, a bad `n` on the OpenAI "
        "route, a bad blend weight in either prompt field, streams abandoned mid-run",
        "a JSON 422 naming the field as the client sent it; no 500, no traceback, no "
        "pending-task warning",
    ),
    (
        "manifest",
        "damaged or mistyped manifest: every field's type and range, schema "
        "versions, `requires`, non-JSON, deep nesting, NaN/Infinity, 5 MiB",
        "BundleError naming the field",
    ),
    (
        "path",
        "manifest paths: `..`, absolute, sub-folders, hidden, symlinks leading out, a "
        "FIFO or folder in place of a file",
        "BundleError before any file is opened",
    ),
    (
        "file",
        "flipped bit, truncated, missing, 64 GiB sparse file, file swapped after loading",
        "BundleError (size checked before hashing; hash over the loaded bytes)",
    ),
    (
        "graph",
        "re-signed graphs whose inputs/outputs disagree with the manifest; not ONNX; "
        "wrong run-time shapes/dtypes",
        "BackendError naming graph and tensor, at load",
    ),
    (
        "numeric",
        "U-Net output NaN/Inf/1e30 at the first or a late step; text embedding "
        "NaN/Inf/norm 2/1e30/0",
        "NumericalError naming step, timestep, backend, precision; no image",
    ),
    (
        "external",
        "graph with external-data weights (listed and hashed, and a copy in the working directory)",
        "BackendError: bundles may not use external data",
    ),
    (
        "digest",
        "pinned digest: a flipped manifest field that changes no file hash",
        "BundleError: not the expected digest",
    ),
    (
        "api",
        "API arguments of wrong type or range (prompt=123, num='2', steps=5.5, "
        "guidance='2'/NaN, sampler=3, providers as a string, NaN/huge/mis-shaped contexts, "
        "surrogates)",
        "InputError naming the argument",
    ),
    (
        "cli",
        "CLI flags and outputs (NaN/Inf, huge --num/--scale, /proc, missing folder, "
        "existing file, bad digest, bench flags) with a bundle that does not exist",
        "one line, exit 1, before any model is loaded; nothing written",
    ),
    (
        "property",
        "hypothesis: 300 mutated manifests, 150 prompts, 60 argument sets",
        "a project error or a valid result, never anything else",
    ),
    (
        "signal",
        "SIGINT/SIGTERM during imports, loading, sampling, PNG write, export, and one whose "
        "exception native code swallowed; SIGKILL during the write",
        "one line, exit 128+n, no temp file (SIGKILL: one hidden temp, removed by the next run)",
    ),
]


RULES = [
    "## Limits that are not a test class",
    "",
    "- **A latent bundle's decoder output** must lie within +-2 (`DECODER_ABS_MAX` in",
    "  `runtime/tolerances.py`; the contract is pixels in [-1, 1], and a value a whole range",
    "  outside is no pixel): NaN, Inf, -1e30 and +1e30 end in a `NumericalError` naming the",
    "  graph and its file, and no PNG is written (+-1e30 were written as an all-black or",
    "  all-white PNG with exit 0 before; `tests/test_latent_bundle.py::",
    "  test_a_decoder_output_beyond_its_contract_is_an_error`).",
    "- **Cache entries** are read like bundle files: a regular file, opened without following",
    "  a link and without blocking on a FIFO, its size checked against the record before a",
    "  byte is read, its sha256 against the record after; the key holds the CPU kernel family",
    "  as measured (below), since a graph optimised for AVX-512's layouts fails on AVX2.",
    "- **The CPU-family rule.** ONNX Runtime picks its CPU kernels from CPUID. On x86-64",
    "  without VNNI (AVX2, AVX-512BW) the u8 x s8 dot product saturates in int16; VNNI and",
    "  ARM64 sum into int32. The shipped int8 graphs keep 7-bit weights, so every family",
    "  computes the same bytes (`tests/test_cpu_families.py` runs them natively, under the",
    "  CPUID mask `tests/cpuid/cpuid_mask.c` and under QEMU's Haswell model, and demands equal",
    "  digests). Every int8 figure a manifest records says on which family it was measured",
    "  (`cpu_family`); `ddpm-rt doctor` measures on its own CPU and says when the record is",
    "  another family's, and for a failing int8 row what to use instead. A golden or parity",
    "  test that depends on the kernels says which: the end-to-end golden is exact where the",
    "  measured kernels equal its recorded ones, within its derived tolerance elsewhere.",
    "  `.ci/run` runs the whole suite a second time on AVX2 kernels on a VNNI machine.",
]


def classify(name: str) -> str:
    param = name.split("[", 1)[1].rstrip("]") if "[" in name else ""
    for key, *_ in CLASSES:
        if param.startswith(key + "-"):
            return key
    base = name.split("[", 1)[0]
    for key, words in (
        ("cache", ("cache",)),
        ("serve", ("surrogate", "openai", "blend", "abandoned")),
        ("cli", ("quantize",)),
        ("signal", ("signal", "sigkill")),
        ("property", ("property",)),
        ("external", ("external",)),
        ("digest", ("digest",)),
        ("numeric", ("non_finite", "numeric", "text_encoder_output")),
        ("graph", ("graph",)),
        ("path", ("path",)),
        ("file", ("file",)),
        ("manifest", ("manifest",)),
        ("cli", ("cli",)),
        ("api", ("api", "bundle_loading", "generate_config", "every_error")),
    ):
        if any(w in base for w in words):
            return key
    return "other"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "r.xml"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={xml}",
                *TESTS,
            ],
            cwd=ROOT,
            check=False,
        )
        cases = ET.parse(xml).getroot().iter("testcase")
        tried, handled = defaultdict(int), defaultdict(int)
        for c in cases:
            key = classify(c.get("name", ""))
            tried[key] += 1
            if not any(ch.tag in ("failure", "error") for ch in c):
                handled[key] += 1 if not any(ch.tag == "skipped" for ch in c) else 0
    lines = [
        "# Reliability: hostile inputs and how each ends",
        "",
        "Generated by `.venv/bin/python scripts/reliability_table.py`, which runs",
        f"{', '.join(f'`{t}`' for t in TESTS)} (all part of the README's test command).",
        "A case is *handled* when it ends exactly as the last column says; none may end in a",
        "traceback, a hang, an exit-0 black image, or a corrupted or silently replaced file.",
        "That each protection's tests notice when it is broken is measured by the mutation check",
        "at the end of this page.",
        "",
        "| class | what was tried | cases | handled | how it ends |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for key, what, ends in CLASSES:
        lines.append(f"| {key} | {what} | {tried[key]} | {handled[key]} | {ends} |")
    if tried.get("other"):
        lines.append(f"| other | supporting checks | {tried['other']} | {handled['other']} | |")
    total_t, total_h = sum(tried.values()), sum(handled.values())
    lines += ["", f"**{total_h} of {total_t} cases handled.**", "", *RULES, ""]
    out = ROOT / "docs" / "reliability.md"
    out.parent.mkdir(exist_ok=True)
    # the mutation check's section (scripts/mutation_check.py --docs) is kept as it is
    old = out.read_text() if out.exists() else ""
    marker = "<!-- mutation-table:start -->"
    kept = marker + old.split(marker, 1)[1] if marker in old else ""
    out.write_text("\n".join(lines) + ("\n" + kept if kept else ""))
    print(f"wrote {out}: {total_h}/{total_t} handled")
    return 0 if total_h == total_t else 1


if __name__ == "__main__":
    sys.exit(main())
