"""``python -m fst_jax.cusparselt build|info``: build the extension, or show what it would use."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fst_jax.cusparselt", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find in the cache) and load the extension")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--verbose", action="store_true", help="print the compiler command")
    sub.add_parser("info", help="print the toolchain, the cache path and available()")
    args = parser.parse_args(argv)

    from fst_jax import cusparselt
    from fst_jax.cusparselt import _build

    try:
        if args.cmd == "build":
            t0 = time.perf_counter()
            path = cusparselt.build(force=args.force, verbose=args.verbose)
            cusparselt.load(build_if_missing=False)
            print(f"built and loaded {path} ({time.perf_counter() - t0:.1f} s)")
        tc = _build.find_toolchain()
        if args.cmd == "info":
            for field, value in vars(tc).items():
                print(f"{field}: {value}")
            print(f"library: {_build.library_path(tc)} (exists: {_build.library_path(tc).exists()})")
        print("available:", cusparselt.available())
    except cusparselt.BuildError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
