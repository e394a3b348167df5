"""Per-kernel register, shared-memory, spill and stack report of the CUDA sources.

Compiles each ``csrc/cuda/*.cu`` for each requested architecture with standalone ``nvcc``
calls (the include paths and CUDA flags of CMakeLists.txt: ``-std=c++17 -O3
--expt-relaxed-constexpr -Icsrc/include``, plus ``--ptxas-options=-v``; no full build, the
object is discarded) and parses ptxas' resource lines into one table row per kernel
instance: registers, static shared memory (bytes), spill stores and loads (bytes), stack
frame (bytes). Kernel names are demangled with ``cu++filt`` (or ``c++filt``) when one is on PATH. The table is
printed per source file; ``--csv PATH`` also writes every row as CSV, and the exit status is
1 when a compilation fails. Needs only nvcc (no GPU, no torch). ``--from-log LOG`` parses a
build log instead of compiling, for a CMake build configured with
``-DCMAKE_CUDA_FLAGS=--ptxas-options=-v`` (the same report for every architecture the build
targets, at no extra compile time).

With ``--sass`` (needs ``cuobjdump`` and ``nvdisasm`` on PATH, e.g. from the pip packages
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm) each compiled object is also disassembled and
every instance gets four more columns: its local-memory spill instructions (``STL``/``LDL``)
in all, those inside any loop (an address range closed by a backward branch), those inside
an innermost loop (a loop containing no other), and those inside a streaming loop (an
innermost loop with a global load and an ``MUFU.EX2``: the per-element loops over a row's V
logits, where a spill costs bandwidth, as opposed to loops over k kept slots or candidates).
ptxas' byte counts cannot tell a spill in the row's one-off finishing from one in the element
loop; the disassembly can.

Usage: ``python benches/cuda_resources.py [--arch 80 90 100] [--only NAME] [--spills-only]
[--from-log LOG] [--sass]``.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'include'}",
              "-DKDFAST_WITH_CUDA", '-DKDFAST_CUDA_ARCH_LIST="report"', "--ptxas-options=-v"]

_FUNCTION = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SOURCE = re.compile(r"([\w.-]+\.cu)\b")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelResources:
    """Resource usage of one compiled kernel instance, as ptxas reports it."""

    source: str
    arch: str
    kernel: str
    registers: int = 0
    shared_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    sass_spills: int | None = None  # STL/LDL instructions (--sass)
    loop_spills: int | None = None  # of them inside a loop
    inner_spills: int | None = None  # of them inside an innermost loop
    stream_spills: int | None = None  # of them inside an innermost loop that streams (LDG and MUFU.EX2)


_SASS_FUNCTION = re.compile(r"Function : (\S+)")
_SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SASS_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
_SASS_SPILL = re.compile(r"^(@!?U?P\w+\s+)?(STL|LDL)\b")
_SASS_GLOBAL_LOAD = re.compile(r"^(@!?U?P\w+\s+)?LDG\b")


def sass_spills(text: str) -> dict[str, tuple[int, int, int, int]]:
    """Per mangled kernel name in `cuobjdump -sass` output: (spill instructions, those inside a
    loop, those inside an innermost loop, those inside a streaming loop). A loop is the address
    range [target, branch] of a backward branch; an innermost loop contains no other loop's
    range; a streaming loop is an innermost loop with a global load (LDG) and an exp2
    (MUFU.EX2): the loops over a row's V elements, as opposed to the loops over k kept slots,
    candidates or teachers, which hold no exp2 of the element math."""
    functions: dict[str, list[tuple[int, str]]] = {}
    current: list[tuple[int, str]] | None = None
    for line in text.splitlines():
        if match := _SASS_FUNCTION.search(line):
            current = functions.setdefault(match.group(1), [])
        elif current is not None and (match := _SASS_INSTRUCTION.search(line)):
            current.append((int(match.group(1), 16), match.group(2).strip()))
    result = {}
    for name, code in functions.items():
        loops = []
        for address, instruction in code:
            if (match := _SASS_BRANCH.search(instruction)) and int(match.group(1), 16) <= address:
                loops.append((int(match.group(1), 16), address))
        innermost = [(a, b) for a, b in loops
                     if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
        spills = [address for address, instruction in code if _SASS_SPILL.search(instruction)]
        in_loop = sum(1 for x in spills if any(a <= x <= b for a, b in loops))
        in_inner = sum(1 for x in spills if any(a <= x <= b for a, b in innermost))
        streaming = [(a, b) for a, b in innermost
                     if any(a <= x <= b and _SASS_GLOBAL_LOAD.search(i) for x, i in code)
                     and any(a <= x <= b and "MUFU.EX2" in i for x, i in code)]
        in_stream = sum(1 for x in spills if any(a <= x <= b for a, b in streaming))
        result[name] = (len(spills), in_loop, in_inner, in_stream)
    return result


def parse_ptxas(text: str, source: str) -> list[KernelResources]:
    """Parses the ``--ptxas-options=-v`` output of one compilation into kernel rows."""
    rows: list[KernelResources] = []
    current: KernelResources | None = None
    for line in text.splitlines():
        if match := _FUNCTION.search(line):
            current = KernelResources(source, match.group(2), match.group(1))
            rows.append(current)
            continue
        if current is None:
            continue
        if match := _FRAME.search(line):
            current.stack_frame, current.spill_stores, current.spill_loads = map(int, match.groups())
        if match := _USED.search(line):
            current.registers = int(match.group(1))
            if smem := _SMEM.search(line):
                current.shared_bytes = int(smem.group(1))
    return [row for row in rows if row.kernel]


def parse_build_log(text: str, names: set[str]) -> list[KernelResources]:
    """Kernel rows of a build log: each ptxas block is credited to the last source file of
    `names` named before it (the compile command or its progress line)."""
    rows: list[KernelResources] = []
    source, block = "", []
    for line in text.splitlines():
        is_report = line.lstrip().startswith("ptxas") or _FRAME.search(line) is not None
        mentioned = [name for name in _SOURCE.findall(line) if name in names]
        if mentioned and not is_report:
            if block:
                rows.extend(parse_ptxas("\n".join(block), source))
                block = []
            source = mentioned[-1]
        elif is_report:
            block.append(line)
    if block:
        rows.extend(parse_ptxas("\n".join(block), source))
    return rows


def demangle(names: list[str]) -> dict[str, str]:
    """Maps mangled kernel names to readable ones (identity when cu++filt is missing)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {name: name for name in names}
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
    readable = result.stdout.splitlines()
    if len(readable) != len(names):
        return {name: name for name in names}
    return dict(zip(names, readable, strict=True))


def shorten(name: str) -> str:
    """Drops namespaces and the parameter list so that a table row fits on one line."""
    name = re.sub(r"kdfast::(cuda::)?(\(anonymous namespace\)::)?", "", name)
    name = re.sub(r"^void ", "", name)
    depth, cut = 0, len(name)
    for index, char in enumerate(name):  # the parameter list: the first '(' outside <...>
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        elif char == "(" and depth == 0:
            cut = index
            break
    return name[:cut].replace("Storage", "").replace("std::integral_constant<bool, ", "<")


def compile_one(source: Path, arch: str, sass: bool = False) -> tuple[bool, str, str]:
    """Compiles one source for sm_<arch>; returns (success, combined output, the object's SASS
    when `sass`, else "")."""
    with tempfile.TemporaryDirectory() as tmp:
        command = ["nvcc", *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(source),
                   "-o", str(Path(tmp) / "out.o")]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        disassembly = ""
        if sass and result.returncode == 0:
            dump = subprocess.run(["cuobjdump", "-sass", str(Path(tmp) / "out.o")], capture_output=True, text=True,
                                  check=False)
            if dump.returncode != 0:
                raise RuntimeError(f"cuobjdump -sass failed: {dump.stderr.strip()}")
            disassembly = dump.stdout
    return result.returncode == 0, result.stdout + result.stderr, disassembly


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90", "100"], help="compute capabilities")
    parser.add_argument("--only", default=None, help="compile only sources whose name contains this")
    parser.add_argument("--spills-only", action="store_true", help="print only instances that spill")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows as CSV here")
    parser.add_argument("--from-log", type=Path, default=None, help="parse this build log instead of compiling")
    parser.add_argument("--sass", action="store_true",
                        help="also count spill instructions in the disassembly (needs cuobjdump and nvdisasm)")
    args = parser.parse_args(argv)
    if args.sass and (args.from_log is not None or not (shutil.which("cuobjdump") and shutil.which("nvdisasm"))):
        parser.error("--sass needs cuobjdump and nvdisasm on PATH, and compiles (not with --from-log)")

    sources = sorted(p for p in CUDA_DIR.glob("*.cu") if args.only is None or args.only in p.name)
    all_rows: list[KernelResources] = []
    failed = False
    if args.from_log is not None:
        all_rows = parse_build_log(args.from_log.read_text(errors="replace"), {p.name for p in sources})
    for source in sources if args.from_log is None else []:
        for arch in args.arch:
            ok, output, disassembly = compile_one(source, arch, args.sass)
            if not ok:
                failed = True
                print(f"== {source.name} sm_{arch}: compilation FAILED\n{output}", file=sys.stderr)
                continue
            warnings = [line for line in output.splitlines() if "warning" in line.lower()]
            for line in warnings:
                print(f"{source.name} sm_{arch}: {line}", file=sys.stderr)
            rows = parse_ptxas(output, source.name)
            if args.sass:
                counts = sass_spills(disassembly)
                for row in rows:
                    (row.sass_spills, row.loop_spills, row.inner_spills,
                     row.stream_spills) = counts.get(row.kernel, (0, 0, 0, 0))
            all_rows.extend(rows)

    names = demangle(sorted({row.kernel for row in all_rows}))
    header = f"{'arch':7} {'regs':>4} {'smem':>6} {'spill st':>8} {'spill ld':>8} {'stack':>5}"
    header += f" {'STL/LDL':>7} {'in loop':>7} {'inner':>5} {'stream':>6}  kernel" if args.sass else "  kernel"
    for source in sources:
        rows = [row for row in all_rows if row.source == source.name]
        if args.spills_only:
            rows = [row for row in rows if row.spill_stores or row.spill_loads]
        if not rows:
            continue
        print(f"\n== {source.name}\n{header}")
        for row in sorted(rows, key=lambda r: (shorten(names[r.kernel]), r.arch)):
            sass = (f" {row.sass_spills:7d} {row.loop_spills:7d} {row.inner_spills:5d} {row.stream_spills:6d}"
                    if args.sass else "")
            print(f"{row.arch:7} {row.registers:4d} {row.shared_bytes:6d} {row.spill_stores:8d} "
                  f"{row.spill_loads:8d} {row.stack_frame:5d}{sass}  {shorten(names[row.kernel])}")
    spilling = [row for row in all_rows if row.spill_stores or row.spill_loads]
    print(f"\n{len(all_rows)} kernel instances, {len(spilling)} with spills")
    if args.sass:
        inner = [row for row in all_rows if row.inner_spills]
        print(f"{len(inner)} with spill instructions inside an innermost loop")
        streaming = [row for row in all_rows if row.stream_spills]
        print(f"{len(streaming)} with spill instructions inside a streaming loop (global loads and exp2)")
    if args.csv is not None:
        with args.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source", "arch", "kernel", "registers", "shared_bytes", "spill_stores",
                             "spill_loads", "stack_frame", "sass_spills", "loop_spills", "inner_loop_spills",
                             "stream_loop_spills"])
            for row in all_rows:
                writer.writerow([row.source, row.arch, shorten(names[row.kernel]), row.registers,
                                 row.shared_bytes, row.spill_stores, row.spill_loads, row.stack_frame,
                                 row.sass_spills, row.loop_spills, row.inner_spills, row.stream_spills])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
