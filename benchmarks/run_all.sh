#!/usr/bin/env bash
# Every CPU benchmark of the README's performance table, one after another. Step rows pin torch and
# XLA to one thread each and interleave all implementations in one process (medians, wall and CPU
# time, load average printed); still, run on a quiet machine: wall times on a loaded host mean little.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/bench_forward_backward.py --threads 1
python benchmarks/bench_steps.py --threads 1 --eager-row
python benchmarks/bench_steps.py --threads 1 --shape smollm2 --steps 5
python benchmarks/bench_methods.py
python benchmarks/bench_generate.py
python benchmarks/bench_memory.py
