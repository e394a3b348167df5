"""The `kdfast` command line: `kdfast demo`, `info`, `bench`, `compress` and `store`.

`main(argv=None) -> int` parses `argv` (default `sys.argv[1:]`), runs one subcommand and
returns its exit status; the console script `kdfast` is `kdfast.cli:main`, and
`python -m kdfast.cli` works too. `kdfast` alone prints the help (exit 0), `kdfast
--version` the version. Every user error is one line `kdfast ...: error: ...` on stderr
with exit status 2 (`kdfast.argparsing`). Optional dependencies (scikit-learn, matplotlib,
transformers, Liger-Kernel) are imported only when a subcommand uses them, so `kdfast info`
works without them.

- `kdfast demo [options]`: the digits distillation demo (`kdfast.demo`, needs scikit-learn
  and matplotlib); `kdfast demo --help` lists its options.
- `kdfast info [--json]`: kdfast and torch versions, `kdfast.build_info()`, which compiled
  kernels run under this torch and machine (the CPU variant selected; the CUDA kernels
  and whether this torch and the visible GPUs can run them), devices, threads.
- `kdfast bench [args...]`: every argument after `bench` goes to `kdfast.benchmark.main`.
- `kdfast compress [options]`: run a teacher over a token stream and write its top-k soft
  labels to a `kdfast.SoftLabelStore` (`kdfast.compress_cli`; `kdfast compress --help`).
- `kdfast store info|verify PATH...`, `kdfast store merge OUT PATH...`: summarise, check
  or concatenate stores (`kdfast.store_cli`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from kdfast import benchmark, compress_cli, demo, store_cli
from kdfast._build import build_info
from kdfast._version import __version__
from kdfast.argparsing import EXIT_OK, CommandParser, report_error

_COMMANDS = "COMMAND"


def _architecture_runs_on(architecture: str, major: int, minor: int) -> bool:
    """Whether code compiled for `sm_<architecture>` runs on a GPU of compute capability major.minor."""
    digits = re.match(r"\d+", str(architecture))
    if digits is None:
        return False
    number = int(digits.group())
    return number // 10 == major and number % 10 <= minor


def kernel_support(build: Dict[str, Any], devices: List[Dict[str, Any]]) -> Dict[str, str]:
    """One line each for the CPU and the CUDA kernels: what was compiled and whether it runs here."""
    if not build.get("native"):
        reason = build.get("native_error") or build.get("error") or "not built"
        fallback = "not usable: the compiled library did not load; the pure-PyTorch reference path runs"
        return {"cpu": f"{fallback} ({reason})", "cuda": fallback}
    variants = build.get("cpu_variants") or []
    cpu = f"{build.get('cpu_variant_selected') or 'baseline'} runs (compiled: {', '.join(variants) or '-'})"
    if build.get("openmp"):
        cpu += f", OpenMP up to {build.get('openmp_max_threads')} threads"
    if not build.get("cuda"):
        return {"cpu": cpu, "cuda": "not compiled; CUDA tensors take the pure-PyTorch reference path"}
    architectures = build.get("cuda_architectures") or []
    compiled = f"compiled (CUDA {build.get('cuda_version')}; {', '.join(f'sm_{a}' for a in architectures) or '-'})"
    if torch.version.cuda is None:
        return {"cpu": cpu, "cuda": f"{compiled}, not usable: this torch ({torch.__version__}) has no CUDA"}
    gpus = [device for device in devices if device["type"] == "cuda"]
    if not gpus:
        return {"cpu": cpu, "cuda": f"{compiled}, not usable: no CUDA device is visible"}
    usable, unusable = [], []
    for gpu in gpus:
        major, minor = (int(part) for part in gpu["capability"].split("."))
        label = f"cuda:{gpu['index']} (sm_{major}{minor})"
        (usable if any(_architecture_runs_on(a, major, minor) for a in architectures) else unusable).append(label)
    parts = ([f"usable on {', '.join(usable)}"] if usable else []) + \
        ([f"not usable on {', '.join(unusable)} (no matching architecture)"] if unusable else [])
    return {"cpu": cpu, "cuda": f"{compiled}, " + "; ".join(parts)}


def collect_info() -> Dict[str, Any]:
    """Versions, native build information, kernel support, devices and thread settings as a JSON-ready dict."""
    try:
        build = build_info()
    except Exception as error:  # the native library may be missing; report, don't fail
        build = {"error": f"{type(error).__name__}: {error}"}
    devices: List[Dict[str, Any]] = [{"type": "cpu", "name": platform.processor() or platform.machine()}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            devices.append({"type": "cuda", "index": index, "name": properties.name,
                            "capability": f"{properties.major}.{properties.minor}",
                            "memory_gib": round(properties.total_memory / 2**30, 1)})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"type": "mps"})
    return {
        "kdfast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "build": build,
        "kernels": kernel_support(build, devices),
        "devices": devices,
        "threads": {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
                    "cpu_count": os.cpu_count()},
    }


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value) if value else "-"
    return str(value)


def _print_info(info: Dict[str, Any]) -> None:
    print(f"kdfast {info['kdfast']}  torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})  "
          f"Python {info['python']}")
    print(f"platform: {info['platform']}")
    print(f"CPU kernels: {info['kernels']['cpu']}")
    print(f"CUDA kernels: {info['kernels']['cuda']}")
    print("build:")
    if info["build"]:
        for key, value in info["build"].items():
            print(f"  {key}: {_format_value(value)}")
    else:
        print("  (no build information reported)")
    print("devices:")
    for device in info["devices"]:
        details = ", ".join(f"{key}={value}" for key, value in device.items() if key != "type")
        print(f"  {device['type']}" + (f": {details}" if details else ""))
    threads = info["threads"]
    print(f"threads: torch intra-op {threads['torch_intra_op']}, inter-op {threads['torch_inter_op']}, "
          f"CPUs {threads['cpu_count']}")


def _run_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    try:
        return demo.main(args=args)
    except SystemExit as stop:  # the demo rejects options with SystemExit("kdfast demo: ...")
        if not isinstance(stop.code, str):
            raise
        return report_error("kdfast demo", stop.code[len("kdfast demo: "):] if stop.code.startswith("kdfast demo: ")
                            else stop.code)


def _run_bench(argv: Sequence[str]) -> int:
    status = benchmark.main(list(argv), prog="kdfast bench")
    return int(status or 0)


def build_parser() -> argparse.ArgumentParser:
    """The `kdfast` argument parser (the `bench` arguments are forwarded, not parsed here)."""
    parser = CommandParser(prog="kdfast", description="Fused knowledge-distillation losses for PyTorch.")
    parser.add_argument("--version", action="version", version=f"kdfast {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar=_COMMANDS)
    subcommands.required = True
    demo_parser = subcommands.add_parser(
        "demo", help="distil a CNN into a small student on scikit-learn's digits (no download)",
        description=demo.__doc__.split("\n\n")[0])
    demo.build_parser(demo_parser)
    info_parser = subcommands.add_parser(
        "info", help="print versions, build information, which kernels run here, devices and threads")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    subcommands.add_parser("bench", add_help=False,
                           help="run the benchmark table (arguments go to kdfast.benchmark; see `kdfast bench --help`)")
    compress_parser = subcommands.add_parser(
        "compress", help="store a teacher's top-k soft labels for offline distillation (resumable)",
        description="Run a teacher over a token stream and store its top-k soft labels (kdfast.SoftLabelStore).")
    compress_cli.add_compress_arguments(compress_parser)
    store_parser = subcommands.add_parser(
        "store", help="summarise (info), check (verify) or concatenate (merge) soft-label stores",
        description="Inspect, check and merge soft-label stores written by kdfast compress.")
    store_cli.add_store_arguments(store_parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `kdfast` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    parser = build_parser()
    if not argv:
        parser.print_help()
        return EXIT_OK
    args = parser.parse_args(argv)
    if args.command == "info":
        return _run_info(args)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "compress":
        return compress_cli.run_compress(args)
    if args.command == "store":
        return store_cli.run_store(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown ones


if __name__ == "__main__":
    sys.exit(main())
