"""Forward gradients against backprop on this machine: time per step, tangent sampling, memory.

    python benchmarks/bench_fast_paths.py --quick          # about a minute, a smoke test
    python benchmarks/bench_fast_paths.py --out bench      # the full benchmark

The same as ``forwardgrad bench``: prints the Markdown tables and writes ``bench.json`` and
``bench.md`` to ``--out``. The method is described in ``forwardgrad/bench/__init__.py``. CPU
timings are noisy where other work shares the cores: the table states the load average before and
after.
"""

import argparse
import sys

from forwardgrad import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    args = parser.parse_args()
    results = bench.run_benchmark(
        bench.config_from_args(args), progress=lambda line: print(line, file=sys.stderr)
    )
    json_path, md_path = bench.write_results(results, args.out)
    print(bench.to_markdown(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
