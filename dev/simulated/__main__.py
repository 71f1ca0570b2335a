"""Regenerates a simulated-TEE fixture directory: ``python -m strongroom.dev.simulated DIR``."""

from __future__ import annotations

import argparse
import sys

from strongroom.dev.simulated import write_fixtures


def main(argv: list[str] | None = None) -> int:
    """Writes the simulated PKI, a sample SNP report and a sample TDX quote with collateral."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--product", default="Milan", choices=["Milan", "Genoa", "Turin"])
    args = parser.parse_args(argv)
    write_fixtures(args.directory, product=args.product)
    print(f"wrote simulated TEE fixtures to {args.directory} (NOT FOR PRODUCTION)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
