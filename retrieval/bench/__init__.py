"""Throughput benchmarks; each topic module exposes ``run_bench(quick: bool, out_dir: Path) -> dict``."""
