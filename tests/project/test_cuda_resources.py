"""`benches/cuda_resources.py`'s parsers, on fixed ptxas and SASS text (no compiler needed).

The SASS parser decides which spill instructions sit inside loops and inside innermost loops
and inside streaming loops (innermost loops with a global load and an exp2: the per-element
loops); these tests pin that classification on a small hand-written listing in `cuobjdump
-sass` format: one outer loop around one inner loop, spills before, in the outer loop only,
and in the inner loop; then the same inner loop with an exp2 in it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benches" / "cuda_resources.py"


def _module():
    spec = importlib.util.spec_from_file_location("cuda_resources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through it
    spec.loader.exec_module(module)
    return module


def _listing(name: str, instructions: list[str]) -> str:
    lines = [f"\t\tFunction : {name}", "\t.headerflags\t@\"EF_CUDA_SM90\""]
    for index, instruction in enumerate(instructions):
        lines.append(f"        /*{index * 16:04x}*/                   {instruction} ;   /* 0x000000000000 */")
    return "\n".join(lines)


def test_spills_are_classified_by_loop():
    code = [
        "STL [R1+0x4], R2",        # 0x00: before any loop
        "MOV R3, RZ",              # 0x10: outer loop starts
        "LDL R4, [R1+0x4]",        # 0x20: outer loop only
        "LDG.E R5, desc[UR4][R6.64]",  # 0x30: inner loop starts
        "@!P0 LDL.LU R7, [R1+0x8]",    # 0x40: inner loop
        "@P1 BRA 0x30",            # 0x50: inner loop's backward branch
        "@!P2 BRA 0x90",           # 0x60: a forward branch, no loop
        "STL.64 [R1+0x10], R8",    # 0x70: outer loop only
        "BRA 0x10",                # 0x80: outer loop's backward branch
        "EXIT",                    # 0x90
    ]
    other = ["LDL R1, [R1+0x0]", "EXIT"]
    text = _listing("_Z6kernelv", code) + "\n" + _listing("_Z5otherv", other)
    # The same kernel with an exp2 in its inner loop (0x40); the forward branch's target moves on.
    streaming = code[:4] + ["MUFU.EX2 R5, R5"] + [line.replace("0x90", "0xa0") for line in code[4:]]
    text += "\n" + _listing("_Z6streamv", streaming)
    counts = _module().sass_spills(text)
    assert counts["_Z6kernelv"] == (4, 3, 1, 0)  # the inner loop loads but computes no exp2
    assert counts["_Z5otherv"] == (1, 0, 0, 0)
    assert counts["_Z6streamv"] == (4, 3, 1, 1)


def test_ptxas_report_is_parsed():
    text = """ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90'
ptxas info    : Function properties for _Z6kernelv
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, 1280 bytes smem, 400 bytes cmem[0]"""
    (row,) = _module().parse_ptxas(text, "k.cu")
    assert (row.kernel, row.arch, row.registers, row.shared_bytes) == ("_Z6kernelv", "sm_90", 64, 1280)
    assert (row.stack_frame, row.spill_stores, row.spill_loads) == (24, 8, 12)
