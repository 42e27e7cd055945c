"""Entry point of the `ipl-bench` console script: runs bench/ipl_bench.py of this source checkout.

bench/ stays a folder of scripts rather than an installed package: it holds the results it writes, its peers are
optional extras, and `make demo`/`make bench` run its scripts by path (which import their neighbours by name).
So the script works from an editable install (`pip install -e .`, what the Makefile does), where this file sits
in the checkout next to bench/; a wheel install, which has no bench/, says so instead of failing on an import.
"""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def main():
    if not (BENCH / "ipl_bench.py").is_file():
        sys.exit(f"ipl-bench runs from a source checkout (pip install -e .): no {BENCH / 'ipl_bench.py'}")
    sys.path.insert(0, str(BENCH))  # as `python bench/ipl_bench.py` would see its neighbours
    import ipl_bench

    return ipl_bench.main()


if __name__ == "__main__":
    sys.exit(main())
