"""The `kdfast` command line: `kdfast demo`, `kdfast info`, `kdfast bench` and `kdfast compress`.

`main(argv=None) -> int` parses `argv` (default `sys.argv[1:]`), runs one subcommand and
returns its exit status; the console script `kdfast` is `kdfast.cli:main`, and
`python -m kdfast.cli` works too. Optional dependencies (scikit-learn, matplotlib, transformers,
Liger-Kernel) are imported only when a subcommand uses them, so `kdfast info` works without them.

- `kdfast demo [options]`: the digits distillation demo (`kdfast.demo`, needs scikit-learn
  and matplotlib); `kdfast demo --help` lists its options.
- `kdfast info [--json]`: kdfast and torch versions, `kdfast.build_info()`, devices, threads.
- `kdfast bench [args...]`: every argument after `bench` goes to `kdfast.benchmark.main`.
- `kdfast compress [options]`: run a teacher over a token stream and write its top-k soft
  labels to a `kdfast.SoftLabelStore` (`kdfast.compress_cli`; `kdfast compress --help`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from kdfast import benchmark, compress_cli, demo
from kdfast._build import build_info
from kdfast._version import __version__


def collect_info() -> Dict[str, Any]:
    """Versions, native build information, devices and thread settings as a JSON-ready dict."""
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
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    return demo.main(args=args)


def _run_bench(argv: Sequence[str]) -> int:
    status = benchmark.main(list(argv), prog="kdfast bench")
    return int(status or 0)


def build_parser() -> argparse.ArgumentParser:
    """The `kdfast` argument parser (the `bench` arguments are forwarded, not parsed here)."""
    parser = argparse.ArgumentParser(prog="kdfast", description="Fused knowledge-distillation losses for PyTorch.")
    subcommands = parser.add_subparsers(dest="command", metavar="{demo,info,bench,compress}")
    subcommands.required = True
    demo_parser = subcommands.add_parser(
        "demo", help="distil a CNN into a small student on scikit-learn's digits (no download)",
        description=demo.__doc__.split("\n\n")[0])
    demo.build_parser(demo_parser)
    info_parser = subcommands.add_parser("info", help="print versions, build information, devices and threads")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    subcommands.add_parser("bench", add_help=False,
                           help="run the benchmark table (arguments go to kdfast.benchmark; see `kdfast bench --help`)")
    compress_parser = subcommands.add_parser(
        "compress", help="store a teacher's top-k soft labels for offline distillation (resumable)",
        description="Run a teacher over a token stream and store its top-k soft labels (kdfast.SoftLabelStore).")
    compress_cli.add_compress_arguments(compress_parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `kdfast` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return _run_info(args)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "compress":
        return compress_cli.run_compress(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown ones


if __name__ == "__main__":
    sys.exit(main())
