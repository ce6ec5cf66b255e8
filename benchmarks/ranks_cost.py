"""What droppath's decisions cost in a process group (issue #26), against a single process.

    .venv/bin/python benchmarks/ranks_cost.py

1. Host time of one draw, interleaved: a row draw (``draw_kept``, 64 rows) and a batch-mode gate
   (``draw_gate``) without a process group, then in a gloo group of 2 ranks on this machine
   (each rank draws; rank 0's median is printed). A group adds a generator seeding per row draw
   and a second generator's draw per gate.
2. The filler rows: a rank that keeps none of its ``n`` rows of a branch that communicates runs
   the branch on 2 filler rows weighted 0 (one where ``n`` is 1). Their expected share of the
   branch's work, ``p**n * min(2, n) / (n * (1 - p))`` of the kept work, is printed for a few
   per-rank batch sizes and rates, with the share measured over 20,000 draws per setting.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

REPS, INNER = 30, 200


def _times() -> dict[str, float]:
    from droppath._engine import draws

    out: dict[str, list[float]] = {"row draw (64)": [], "gate": []}
    for _ in range(REPS):  # interleaved: one block of each in turn
        t = time.perf_counter()
        for _ in range(INNER):
            draws.draw_kept(64, 0.7)
        out["row draw (64)"].append((time.perf_counter() - t) / INNER * 1e6)
        t = time.perf_counter()
        for _ in range(INNER):
            draws.draw_gate(0.7)
        out["gate"].append((time.perf_counter() - t) / INNER * 1e6)
    return {k: statistics.median(v) for k, v in out.items()}


def _worker(rank: int, port: int, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)
    times = _times()
    if rank == 0:
        queue.put(times)
    dist.barrier()
    os._exit(0)


def _in_group() -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result: dict[str, float] = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return result


def _filler_share(n: int, p: float, draws_: int = 20_000) -> float:
    """Measured: filler rows run / kept rows run, over ``draws_`` row draws of ``n`` rows."""
    kept = torch.rand(draws_, n) < 1 - p
    counts = kept.sum(1)
    fillers = (counts == 0).sum().item() * min(2, n)
    return float(fillers) / max(1.0, float(counts.sum()))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    alone = _times()
    group = _in_group()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}")
    print("\nhost time per draw, median of 30 blocks of 200 (microseconds)")
    print(f"{'draw':<16}{'no group':>10}{'group of 2':>12}{'ratio':>8}")
    for k in alone:
        print(f"{k:<16}{alone[k]:>10.2f}{group[k]:>12.2f}{group[k] / alone[k]:>8.2f}")
    print("\nfiller rows of a branch that communicates, as a share of the kept rows run")
    print(f"{'rows per rank':<15}{'p':>6}{'expected':>12}{'measured':>12}")
    for n in (1, 2, 4, 8, 32):
        for p in (0.1, 0.3, 0.5):
            expected = p**n * min(2, n) / (n * (1 - p))
            print(f"{n:<15}{p:>6}{expected:>12.5f}{_filler_share(n, p):>12.5f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
