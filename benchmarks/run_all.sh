#!/usr/bin/env bash
# Every CPU benchmark of the README's performance table, one after another (run on a quiet machine:
# two jobs on 2 cores slow each other 2-3x). Prints each table with the command that produced it.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/bench_forward_backward.py --threads 1
python benchmarks/bench_steps.py --threads 1
python benchmarks/bench_methods.py
python benchmarks/bench_generate.py
python benchmarks/bench_memory.py
