"""Timing and reporting shared by the benchmark scripts: torch.utils.benchmark timers at an explicit thread count,
each implementation measured in interleaved rounds and reported at its best, JSON results with versions."""

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as tb
from rich.console import Console
from rich.table import Table

import dmfast
from dmfast.io import atomic_write_json


def parser(doc: str, rounds: int = 3) -> argparse.ArgumentParser:
    """The options every benchmark script takes; scripts add their own sizes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's current count)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds; each implementation's best is kept")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<benchmark>-<device>.json)")
    return p


def parse(p: argparse.ArgumentParser, name: str, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"benchmarks/results/{name}-{args.device}.json"
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    return args


def cpu_facts() -> tuple:
    """(model name, the vector instruction sets the CPU has among sse4.2/avx2/avx512f and the native bf16 ones,
    which decide bf16's speed) from /proc/cpuinfo."""
    cpu, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    return cpu, [isa for isa in ("sse4_2", "avx2", "avx512f", *sorted(dmfast.cpu_variants.BF16_FLAGS)) if isa in flags]


def environment(device: str, threads: int) -> dict:
    cpu, cpu_flags = cpu_facts()
    env = {
        "dmfast": dmfast.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_flags": cpu_flags,
        "cpu_variant": dmfast.cpu_variants.loaded(),  # the CPU kernels' instruction set (DMFAST_CPU_VARIANT)
        "threads": threads,
        "device": device,
        "built_with_cuda": dmfast._C.built_with_cuda(),
        "built_with_openmp": dmfast._C.built_with_openmp(),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def best_median_ms(statements: dict, threads: int, min_run_time: float, rounds: int) -> dict:
    """Median time (ms) of each zero-argument callable (keyed by a name or a tuple of names), the best over
    ``rounds`` interleaved rounds so that every implementation is measured at its best under the same
    conditions."""
    best = {name: float("inf") for name in statements}
    for _ in range(rounds):
        for name, fn in statements.items():
            label = name if isinstance(name, str) else " / ".join(name)
            timer = tb.Timer("fn()", globals={"fn": fn}, num_threads=threads, label=label)
            best[name] = min(best[name], timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return best


def report(title: str, cases: dict, reference_name: str, env: dict, config: dict, out: str | None,
           console: Console | None = None) -> dict:
    """Print a table of ``cases = {case: {impl: ms}}`` with speed-ups of ``reference_name`` over each
    implementation, and write the JSON to ``out``."""
    console = console or Console()
    where = env["gpu"] if env["device"] == "cuda" else f"{env['cpu']}, {env['cpu_variant']} kernels"
    table = Table(title=f"{title}  ({env['device']}: {where}, {env['threads']} threads)")
    for column in ("case", "implementation", "median ms", f"{reference_name} speed-up"):
        table.add_column(column, justify="left" if column in ("case", "implementation") else "right")
    results = []
    for case, times in cases.items():
        for impl, ms in times.items():
            ratio = ms / times[reference_name]
            table.add_row(case, impl, f"{ms:.3f}", "-" if impl == reference_name else f"{ratio:.2f}x")
            results.append({"case": case, "implementation": impl, "median_ms": ms,
                            f"{reference_name}_speedup": ratio})
    console.print(table)
    payload = {"benchmark": title, "environment": env, "config": config, "results": results}
    if out:
        atomic_write_json(out, payload, indent=2)
        console.print(f"results written to {Path(out)}")
    return payload
