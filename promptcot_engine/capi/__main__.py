"""python -m promptcot_engine.capi --cflags --libs: compiler and linker flags for a client of the C API."""
import argparse
import sys

from promptcot_engine import capi


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m promptcot_engine.capi", description=__doc__)
    queries = {"cflags": capi.cflags, "libs": capi.libs, "include_dir": capi.include_dir, "lib_path": capi.library_path}
    for name in queries:
        parser.add_argument(f"--{name.replace('_', '-')}", action="store_true")
    args = parser.parse_args()
    chosen = [name for name in queries if getattr(args, name)]
    if not chosen:
        parser.error("give at least one of " + ", ".join(f"--{n.replace('_', '-')}" for n in queries))
    try:
        print(" ".join(str(queries[name]()) for name in chosen))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
