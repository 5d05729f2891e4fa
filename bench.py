"""Benchmarks, one function per subcommand.

    python bench.py reward [--n 1000] [--workers 2]   # score_batch throughput (answers/s)
"""
import argparse
import os
import platform
import random
import time


def machine():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.processor() or platform.machine()}, {usable} usable cores of {os.cpu_count()}, Python {platform.python_version()}"


def reward_pairs(n, seed=0):
    """n distinct (response, gold) pairs: correct, wrong and unboxed answers in several formats."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        a, b = i + 2, rng.randint(2, 97)
        kind, right = i % 5, rng.random() < 0.6
        if kind == 0:  # GSM8K gold, integer answer
            gold, pred = f"{a} apples and {b} more.\n#### {a + b}", str(a + b if right else a + b + 1)
        elif kind == 1:  # LaTeX fraction gold, answered as a decimal or plain fraction
            gold, pred = f"\\frac{{{a}}}{{{2 * a + 1}}}", f"{a}/{2 * a + 1}" if right else f"{a / (2 * a + 1):.2f}"
        elif kind == 2:  # decimal gold, answered as a LaTeX fraction
            gold, pred = f"{a / 4}", f"\\dfrac{{{a}}}{{4}}" if right else f"\\frac{{{a + 1}}}{{4}}"
        elif kind == 3:  # set gold, answered in another order
            gold, pred = f"\\{{{a}, {b}\\}}", f"\\{{{b}, {a}\\}}" if right else f"\\{{{a}, {b + 100}\\}}"
        else:  # symbolic gold
            gold, pred = f"{a}x^2 + {b}", f"{b} + {a}x^{{2}}" if right else f"{a}x + {b}"
        reasoning = f"We compute step {i}: {a} and {b} give the result."
        if rng.random() < 0.15:
            pairs.append((f"{reasoning} The answer is {pred}.", gold))  # no box: unparsed
        else:
            pairs.append((f"{reasoning} So the answer is $\\boxed{{{pred}}}$.", gold))
    return pairs


def bench_reward(args):
    import reward
    reward.WORKERS = args.workers
    pairs = reward_pairs(args.n)
    assert len(set(pairs)) == len(pairs)
    reward.score_batch([p[0] for p in pairs[:args.workers * 4]], [p[1] for p in pairs[:args.workers * 4]])  # start workers
    start = time.perf_counter()
    _, counts = reward.score_batch([p[0] for p in pairs], [p[1] for p in pairs])
    elapsed = time.perf_counter() - start
    print(f"reward: {args.n / elapsed:,.0f} answers/s ({args.n} answers in {elapsed:.2f} s, "
          f"{args.workers} workers) on {machine()}")
    print(f"counts: {counts}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reward", help="score_batch throughput on distinct (response, gold) pairs")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=bench_reward)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
