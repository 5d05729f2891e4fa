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
  math-verify's timeouts off and one SIGALRM timer of ITEM_TIMEOUT per answer.
- A C call deaf to the alarm (regex backtracking, a huge integer power) is the parent's
  job: a worker silent for HARD_TIMEOUT is killed and respawned, its current answer
  counted `timeout`, the rest of its chunk re-queued.
- Workers start on the first batch (importing this module is cheap), at most WORKERS per
  process (under torchrun, per rank), take CHUNK answers per JSON line, and are killed at
  exit. One batch at a time per process (a lock), so any thread may call score_batch.

Time bound: an answer costs at most ITEM_TIMEOUT = 1 s of worker time, never more than
HARD_TIMEOUT = 3 s, plus a worker restart (about 1 s) in the second case. A worker that
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
ITEM_TIMEOUT = 1.0      # soft limit per answer (SIGALRM inside the worker)
HARD_TIMEOUT = 3.0      # the parent kills a worker silent for this long
STARTUP_TIMEOUT = 60.0  # importing sympy on a loaded machine can be slow
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


def score(response: str, answer: str) -> float:
    return score_batch([response], [answer])[0][0]


def score_batch(responses: list[str], answers: list[str]) -> tuple[list[float], dict]:
    """Rewards (1.0 / 0.0) and counts of correct, wrong, unparsed, timeout, error."""
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
    for k, outcome in zip(where, _run(jobs)):
        outcomes[k] = outcome
    counts = {key: outcomes.count(key) for key in KEYS}
    return [float(o == "correct") for o in outcomes], counts


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


def _lost(w, todo, out, outcome):
    """Replace worker w: its current job gets `outcome`, the rest of its chunk is re-queued."""
    _kill(w)
    if not w["ready"]:
        raise RuntimeError("reward worker failed to start (is math-verify installed?)")
    if w["pending"]:
        out[w["pending"][0]] = outcome
        todo.extend(w["pending"][1:])
    _pool[_pool.index(w)] = _spawn()


def _run(jobs):
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
            _drive(jobs, todo, out, size)
        except BaseException:  # e.g. Ctrl-C: answers in flight would reach the next batch
            _shutdown()
            raise
    return out


def _drive(jobs, todo, out, size):
    """Dispatch chunks to ready workers, collect answers, replace dead or silent workers."""
    while todo or any(w["pending"] for w in _pool):
        for w in list(_pool):
            if w["ready"] and not w["pending"] and todo:
                w["pending"] = [todo.popleft() for _ in range(min(size, len(todo)))]
                w["deadline"] = time.monotonic() + HARD_TIMEOUT
                try:
                    w["proc"].stdin.write(json.dumps([jobs[i] for i in w["pending"]]).encode() + b"\n")
                    w["proc"].stdin.flush()
                except OSError:
                    _lost(w, todo, out, "error")
        waiting = [w for w in _pool if w["pending"] or not w["ready"]]
        wait_s = max(0.0, min(w["deadline"] for w in waiting) - time.monotonic())
        readable, _, _ = select.select([w["proc"].stdout for w in waiting], [], [], wait_s)
        for w in waiting:
            if w["proc"].stdout in readable:
                data = os.read(w["proc"].stdout.fileno(), 1 << 16)
                if not data:  # the worker died (segfault, out of memory)
                    _lost(w, todo, out, "error")
                    continue
                *lines, w["buf"] = (w["buf"] + data).split(b"\n")
                for line in lines:
                    if line == b"ready":
                        w["ready"] = True
                    else:
                        out[w["pending"].pop(0)] = line.decode()
                    w["deadline"] = time.monotonic() + HARD_TIMEOUT
            elif time.monotonic() > w["deadline"]:
                _lost(w, todo, out, "timeout")


# ---- worker side: `python reward.py --worker`, reads JSON lines on stdin ----

class _ItemTimeout(BaseException):  # BaseException: math-verify's `except Exception` lets it through
    pass


def _on_alarm(signum, frame):
    raise _ItemTimeout


def _judge(pred, gold, parse_gold):
    from math_verify import LatexExtractionConfig, parse, verify
    signal.setitimer(signal.ITIMER_REAL, ITEM_TIMEOUT)
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
        signal.setitimer(signal.ITIMER_REAL, 0)


def _worker_main():
    import functools
    import logging
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGALRM, _on_alarm)

    @functools.lru_cache(maxsize=4096)  # a GRPO group shares one gold
    def parse_gold(gold):
        configs = [LatexExtractionConfig(), ExprExtractionConfig()]
        # `$...$` first: bare, `10^{6}` would parse as 10 and `(1,2]` not at all
        return parse("$" + gold + "$", configs, parsing_timeout=None) or parse(gold, configs, parsing_timeout=None)

    _judge("1", "1", parse_gold)  # warm up before reporting ready
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        for pred, gold in json.loads(line):
            try:
                outcome = _judge(pred, gold, parse_gold)
            except _ItemTimeout:  # the alarm fired between the answer and its cancel
                outcome = "timeout"
            out.write(outcome.encode() + b"\n")


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
