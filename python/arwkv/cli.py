"""The ``arwkv`` command."""

from __future__ import annotations

import argparse
import json
import sys


def _info(_: argparse.Namespace) -> int:
    """Prints what this installation was built for, which CPU code path it uses, and the GPU."""
    import torch

    import arwkv
    import arwkv_ext

    print(json.dumps({
        "arwkv": arwkv.__version__,
        "torch": torch.__version__,
        "build": arwkv_ext.build_info,
        "cpu_isa": arwkv_ext.cpu_isa(),
        "cpu_isas_supported": arwkv_ext.cpu_isas_supported(),
        "threads": torch.get_num_threads(),
        "gpu_kernels": [k for k in arwkv_ext.build_info["kernels"] if k != "cpu"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arwkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="show the build, the CPU code path and the GPU").set_defaults(run=_info)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ImportError, RuntimeError, ValueError) as err:
        print(f"arwkv {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
