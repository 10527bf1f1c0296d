"""Command line: `python -m trm_fast doctor | demo` (also installed as `trm-fast`)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="trm-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="torch, CUDA, Triton, the compiled extension, live kernels")
    doctor.add_argument("--json", action="store_true", help="print the status as JSON")
    demo = commands.add_parser("demo", help="train a tiny TRM on the built-in corpus, then generate")
    demo.add_argument("--seconds", type=float, default=120.0, help="training time budget")
    demo.add_argument("--preset", default="tiny")
    args = parser.parse_args(argv)

    if args.command == "doctor":
        from .dispatch import format_kernel_status, kernel_status
        status = kernel_status()
        print(json.dumps(status, indent=2) if args.json else format_kernel_status(status))
    elif args.command == "demo":
        from .demo import run_demo
        run_demo(seconds=args.seconds, preset=args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
