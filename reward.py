"""Math-answer reward: 1.0 when the last \\boxed{} of a response is equivalent to the gold answer.

Design
- The parent extracts the final answer (last \\boxed{...}; no fallback to the last number
  in the text) and the gold's text (after the last `####`, or inside its \\boxed{}),
  applies input caps, and sends only those short strings to worker processes.
- Equivalence comes from math-verify 0.9. Its timeouts use SIGALRM, which raises
  ValueError off the main thread (a catch-all wrapper then scores every answer 0: the
  silent all-zero reward bug); without timeouts `\\boxed{9^{9^{9^{9}}}}` never returns.
  So each worker is a fresh interpreter (`python reward.py --worker` via subprocess: no
  fork of a parent holding torch threads, no re-import of the trainer's __main__ as
  multiprocessing's spawn would do) calling parse/verify in its own main thread, with
  math-verify's timeouts off and one CPU-time timer per answer (ITIMER_PROF: the worker's
  own user + system time). CPU time, not wall time: on a node where eight ranks, their
  tokenizers and the verifiers share the cores, a wall-clock limit turns slow-but-right
  answers into zeros (a 1 s wall limit scored `(x+1)^2` against `x^2+2x+1` as a timeout in
  8 of 8 fresh workers on a loaded 2-core machine). The limit is `timeout` CPU seconds per
  answer (score_batch's argument, config key verifier_timeout), math-verify's own 5 s by
  default. Each worker runs one symbolic comparison before it reports ready, so the first
  real answer does not pay sympy's lazy imports.
- A C call deaf to the timer (regex backtracking, a huge integer power) is the parent's
  job: a worker silent for hard_timeout(timeout) seconds of wall time is killed and
  respawned; its current answer counts `timeout`, the rest of its chunk is re-queued. A
  worker that dies (segfault, out of memory) has all its unanswered items re-queued; an
  item that was in flight in two dead workers counts `error`.
- Workers start on the first batch (importing this module is cheap), at most WORKERS per
  process (under torchrun, per rank), take CHUNK answers per JSON line, and are killed at
  exit. One batch at a time per process (a lock), so any thread may call score_batch.

Time bound: an answer costs at most `timeout` seconds of worker CPU time, never more than
hard_timeout(timeout) seconds of wall time plus a worker restart (about 1 s). A worker that
cannot start (broken install) raises RuntimeError rather than scoring zeros. POSIX only.
"""
import atexit
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque

WORKERS = 2             # worker processes per calling process; set before the first batch
CHUNK = 32              # answers per message to a worker
TIMEOUT = 5.0           # CPU seconds per answer inside the worker (math-verify's own default)
HARD_FACTOR = 12.0      # the parent kills a worker silent for HARD_FACTOR x timeout wall seconds
STARTUP_TIMEOUT = 120.0  # importing sympy (and the warm-up comparison) on a loaded machine can be slow
MAX_RESPONSE_CHARS = 8000  # only the tail is searched: the final answer is at the end
MAX_ANSWER_CHARS = 1000    # longer boxed contents (or golds) never reach sympy
KEYS = ("correct", "wrong", "unparsed", "timeout", "error")

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_answer(response: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}, or `\\boxed 5`) in the response's tail."""
    text = response.replace("\x00", "")[-MAX_RESPONSE_CHARS:]
    last = None
    for last in _BOX.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    if text.startswith("{", i):
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2  # \{ \} \\ are not group delimiters
                continue
            depth += (c == "{") - (c == "}")
            if depth == 0:
                return text[i + 1:j]
            j += 1
        return None  # unterminated
    space_form = re.match(r"[ \t]+([^\s$]+)", text[i:])  # `\boxed 5`: one token
    return space_form.group(1).rstrip(".,;") if space_form else None


def _gold_text(answer: str) -> str:
    answer = answer.replace("\x00", "")
    if "####" in answer:  # GSM8K: the final answer follows the last ####
        answer = answer.rsplit("####", 1)[1]
    boxed = extract_answer(answer)
    return (boxed if boxed is not None else answer).strip()


def hard_timeout(timeout: float) -> float:
    """Wall seconds of silence after which the parent kills a worker: far above the CPU
    limit, since a loaded machine stretches CPU time into much more wall time."""
    return max(HARD_FACTOR * timeout, 10.0)


def score(response: str, answer: str, timeout: float = TIMEOUT) -> float:
    return score_batch([response], [answer], timeout)[0][0]


def score_batch(responses: list[str], answers: list[str], timeout: float = TIMEOUT) -> tuple[list[float], dict]:
    """Rewards (1.0 / 0.0) and counts of correct, wrong, unparsed, timeout, error.
    timeout: CPU seconds of worker time per answer."""
    if not timeout > 0:
        raise ValueError(f"score_batch: timeout must be > 0 CPU seconds, got {timeout}")
    if len(responses) != len(answers):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(answers)} answers")
    outcomes = ["unparsed"] * len(responses)
    jobs, where = [], []
    for k, (response, answer) in enumerate(zip(responses, answers)):
        pred, gold = extract_answer(response), _gold_text(answer)
        if pred is None or not pred.strip():
            continue
        if len(gold) > MAX_ANSWER_CHARS or not gold:
            outcomes[k] = "error"  # a data problem, not the model's
        elif len(pred) > MAX_ANSWER_CHARS:
            outcomes[k] = "wrong"
        else:
            jobs.append((pred, gold))
            where.append(k)
    for k, outcome in zip(where, _run(jobs, timeout)):
        outcomes[k] = outcome
    counts = {key: outcomes.count(key) for key in KEYS}
    return [float(o == "correct") for o in outcomes], counts


PLACEHOLDERS = {"", "n/a", "na", "none", "null", "nan", "?", "-"}  # a missing answer, not an answer


def unscorable(golds: list[str], timeout: float = TIMEOUT) -> set[str]:
    """The golds no response can honestly match: a placeholder for a missing answer
    (empty, N/A, none, null; math-verify would read N/A as the fraction N over A),
    or one that a response stating exactly the gold's own answer does not match
    (text math-verify cannot parse)."""
    unique = sorted(set(golds))
    bad = {g for g in unique if _gold_text(g).lower() in PLACEHOLDERS}
    rest = [g for g in unique if g not in bad]
    rewards, _ = score_batch(["\\boxed{" + _gold_text(g) + "}" for g in rest], rest, timeout)
    return bad | {g for g, r in zip(rest, rewards) if r != 1.0}


# ---- parent side: a small pool of worker processes ----

_lock = threading.Lock()
_pool = []         # dicts: proc, buf (partial output), ready, pending (job ids), deadline
_pool_pid = None   # a forked child must not use (or kill) its parent's workers


def _spawn():
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return {"proc": proc, "buf": b"", "ready": False, "pending": [],
            "deadline": time.monotonic() + STARTUP_TIMEOUT}


def _kill(w):
    w["proc"].kill()
    w["proc"].wait()
    for pipe in (w["proc"].stdin, w["proc"].stdout):
        try:
            pipe.close()
        except OSError:
            pass


@atexit.register
def _shutdown():
    if _pool_pid == os.getpid():
        for w in _pool:
            _kill(w)
    _pool.clear()


def _lost(w, todo, out, lost, stuck):
    """Replace worker w and re-queue its unanswered items. Its current item (the one it
    was working on) counts `timeout` if w was stuck (silent past the hard limit); if w
    died, the current item is re-queued once, and counts `error` when a second worker
    dies on it (`lost` holds the items that were current in a dead worker)."""
    _kill(w)
    if not w["ready"]:
        raise RuntimeError("reward worker failed to start (is math-verify installed?)")
    if w["pending"]:
        current, rest = w["pending"][0], w["pending"][1:]
        if stuck:
            out[current] = "timeout"
        elif current in lost:
            out[current] = "error"
        else:
            lost.add(current)
            rest = [current] + rest
        todo.extend(rest)
    _pool[_pool.index(w)] = _spawn()


def _run(jobs, timeout):
    """Outcome for each (pred, gold) pair, computed by the worker pool."""
    global _pool_pid
    out = [None] * len(jobs)
    if not jobs:
        return out
    todo = deque(range(len(jobs)))
    with _lock:
        if _pool_pid != os.getpid():
            _pool.clear()
            _pool_pid = os.getpid()
        while len(_pool) > WORKERS:
            _kill(_pool.pop())
        wanted = min(WORKERS, -(-len(jobs) // CHUNK))  # score() starts one worker, not WORKERS
        while len(_pool) < wanted:
            _pool.append(_spawn())
        size = max(1, min(CHUNK, -(-len(jobs) // len(_pool))))
        try:
            _drive(jobs, todo, out, size, timeout)
        except BaseException:  # e.g. Ctrl-C: answers in flight would reach the next batch
            _shutdown()
            raise
    return out


def _send(w, message: bytes) -> None:
    w["proc"].stdin.write(message)
    w["proc"].stdin.flush()


def _drive(jobs, todo, out, size, timeout):
    """Dispatch chunks to ready workers, collect answers, replace dead or silent workers."""
    hard, lost = hard_timeout(timeout), set()
    while todo or any(w["pending"] for w in _pool):
        for w in list(_pool):
            if w["ready"] and not w["pending"] and todo:
                w["pending"] = [todo.popleft() for _ in range(min(size, len(todo)))]
                w["deadline"] = time.monotonic() + hard
                try:
                    _send(w, json.dumps({"timeout": timeout, "jobs": [jobs[i] for i in w["pending"]]}).encode() + b"\n")
                except OSError:
                    _lost(w, todo, out, lost, stuck=False)
        waiting = [w for w in _pool if w["pending"] or not w["ready"]]
        wait_s = max(0.0, min(w["deadline"] for w in waiting) - time.monotonic())
        readable, _, _ = select.select([w["proc"].stdout for w in waiting], [], [], wait_s)
        for w in waiting:
            if w["proc"].stdout in readable:
                data = os.read(w["proc"].stdout.fileno(), 1 << 16)
                if not data:  # the worker died (segfault, out of memory, killed)
                    _lost(w, todo, out, lost, stuck=False)
                    continue
                *lines, w["buf"] = (w["buf"] + data).split(b"\n")
                for line in lines:
                    if line == b"ready":
                        w["ready"] = True
                    else:
                        out[w["pending"].pop(0)] = line.decode()
                    w["deadline"] = time.monotonic() + hard
            elif time.monotonic() > w["deadline"]:
                _lost(w, todo, out, lost, stuck=w["ready"])


# ---- worker side: `python reward.py --worker`, reads JSON lines on stdin ----

class _ItemTimeout(BaseException):  # BaseException: math-verify's `except Exception` lets it through
    pass


def _on_timer(signum, frame):
    raise _ItemTimeout


def _judge(pred, gold, parse_gold, timeout):
    from math_verify import LatexExtractionConfig, parse, verify
    signal.setitimer(signal.ITIMER_PROF, timeout)  # CPU time of this worker, not wall time
    try:
        gold_parsed = parse_gold(gold)
        if not gold_parsed:
            return "error"
        pred_parsed = parse("\\boxed{" + pred + "}", [LatexExtractionConfig()], parsing_timeout=None)
        return "correct" if pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None) else "wrong"
    except _ItemTimeout:
        return "timeout"
    except Exception:  # RecursionError, MemoryError, sympy internals
        return "error"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


def _worker_main():
    import functools
    import logging
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGPROF, _on_timer)

    @functools.lru_cache(maxsize=4096)  # a GRPO group shares one gold
    def parse_gold(gold):
        configs = [LatexExtractionConfig(), ExprExtractionConfig()]
        # `$...$` first: bare, `10^{6}` would parse as 10 and `(1,2]` not at all
        return parse("$" + gold + "$", configs, parsing_timeout=None) or parse(gold, configs, parsing_timeout=None)

    # Warm up on a symbolic comparison before reporting ready: sympy imports its
    # simplification machinery lazily, and cold it can take seconds.
    _judge("(x+1)^2", "x^2+2x+1", parse_gold, STARTUP_TIMEOUT)
    parse_gold.cache_clear()
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        message = json.loads(line)
        for pred, gold in message["jobs"]:
            try:
                outcome = _judge(pred, gold, parse_gold, message["timeout"])
            except _ItemTimeout:  # the timer fired between the answer and its cancel
                outcome = "timeout"
            out.write(outcome.encode() + b"\n")


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
