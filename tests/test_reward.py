"""reward.py: equivalences through math-verify, extraction, counts, thread safety, hostile input."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import reward
from reward import extract_answer, score, score_batch

B = "The answer is \\boxed{{{}}}."  # a response whose last box holds the formatted text

CASES = [
    # fractions and decimals, both directions
    (B.format("\\frac12"), "0.5", 1.0),
    (B.format("\\frac12"), "1/2", 1.0),
    (B.format("0.5"), "\\frac{1}{2}", 1.0),
    (B.format("1/2"), "\\frac{1}{2}", 1.0),
    (B.format("\\dfrac{3}{4}"), "0.75", 1.0),
    (B.format("\\tfrac{1}{2}"), "0.5", 1.0),
    (B.format("\\frac{1}{3}"), "\\frac{2}{6}", 1.0),
    (B.format("0.33"), "\\frac13", 0.0),
    (B.format("\\frac{1}{3}"), "0.333333", 1.0),  # math-verify rounds to 6 places: a 6-digit gold means 1/3
    (B.format("\\frac{2}{3}"), "\\frac{1}{2}", 0.0),
    # integers, signs, formatting
    (B.format("72"), "72", 1.0),
    (B.format("-3"), "-3", 1.0),
    (B.format("3"), "-3", 0.0),
    (B.format("-\\frac{1}{2}"), "-0.5", 1.0),
    (B.format("72.0"), "72", 1.0),
    (B.format("1,000"), "1000", 1.0),
    (B.format("1000000"), "10^{6}", 1.0),
    (B.format("2^{10}"), "1024", 1.0),
    # symbolic
    (B.format("\\sqrt{12}"), "2\\sqrt{3}", 1.0),
    (B.format("\\frac{\\sqrt2}{2}"), "\\sqrt{2}/2", 1.0),
    (B.format("(x+1)^2"), "x^2+2x+1", 1.0),
    (B.format("x+1"), "1+x", 1.0),
    (B.format("x+2"), "x+1", 0.0),
    (B.format("3.14"), "\\pi", 0.0),
    (B.format("\\infty"), "\\infty", 1.0),
    (B.format("x=3"), "3", 1.0),  # naming the variable is fine
    # sets, tuples, intervals
    (B.format("\\{2,1\\}"), "\\{1,2\\}", 1.0),
    (B.format("1,-1"), "\\{-1, 1\\}", 1.0),
    (B.format("\\{1,3\\}"), "\\{1,2\\}", 0.0),
    (B.format("[1,2]"), "(1,2]", 0.0),  # a closed bracket where the gold is open is wrong
    (B.format("(1,2)"), "(1,2]", 0.0),
    (B.format("(1,2]"), "(1,2]", 1.0),
    (B.format("(2,1)"), "(1,2)", 0.0),  # an ordered pair is not the interval
    # units, text, percent, choices
    (B.format("5 \\text{ cm}"), "5", 1.0),
    (B.format("12"), "12 \\text{ apples}", 1.0),
    (B.format("\\$5"), "5", 1.0),
    # Bare words are read as products of symbols (5*d*o*l*l*a*r*s), so this is 0 though a
    # teacher would accept it; we keep math-verify's verdict rather than strip free text.
    (B.format("5 dollars"), "5", 0.0),
    (B.format("10\\%"), "10", 1.0),
    # math-verify accepts 10 for a gold of 10% (it compares both 10 and 0.1); we keep that:
    # datasets store "what percent" answers both ways.
    (B.format("10"), "10\\%", 1.0),
    (B.format("\\text{(A)}"), "A", 1.0),
    (B.format("B"), "A", 0.0),
    # gold formats: boxed, GSM8K, LaTeX
    (B.format("72"), "\\boxed{72}", 1.0),
    (B.format("72"), "He has 3*24=72 apples.\n#### 72", 1.0),
    (B.format("12"), "He has 3*24=72 apples.\n#### 72", 0.0),
    (B.format("1,-1"), "Roots #### 1 #### \\{-1, 1\\}", 1.0),  # the last #### counts
    # which box counts
    ("First \\boxed{3}, no wait: \\boxed{4}.", "4", 1.0),
    ("First \\boxed{4}, no wait: \\boxed{3}.", "4", 0.0),
    ("So $\\boxed 5$.", "5", 1.0),
    ("\\fbox{7}", "7", 1.0),
    ("The answer is 72.", "72", 0.0),  # no box: no fallback to the last number
    ("72", "72", 0.0),
    ("\\boxed{}", "0", 0.0),
    ("\\boxed{72", "72", 0.0),  # unterminated
]


@pytest.mark.parametrize("response,gold,expected", CASES)
def test_score_table(response, gold, expected):
    assert score(response, gold) == expected


def test_table_as_one_batch():
    rewards, counts = score_batch([c[0] for c in CASES], [c[1] for c in CASES])
    assert rewards == [c[2] for c in CASES]
    assert counts["timeout"] == counts["error"] == 0


@pytest.mark.parametrize("response,expected", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("x \\boxed{\\{1,2\\}} y", "\\{1,2\\}"),
    ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
    ("\\boxed 5", "5"),
    ("is $\\boxed 42$.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\fbox{3}", "3"),
    ("\\boxed{}", ""),
    ("no box here, 72", None),
    ("", None),
    ("\\boxed{1} and \\boxed{2", None),  # the last box is unterminated
    ("\\boxed{a}}", "a"),
    ("\\boxedx{1}", None),
    ("\\boxed{1\x00}", "1"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extract_answer_reads_only_the_tail():
    assert extract_answer("\\boxed{1}" + "x" * 100_000) is None
    assert extract_answer("x" * 100_000 + "\\boxed{1}") == "1"


def test_counts():
    responses = [B.format("1"), B.format("2"), "no box", B.format("\\frac{1}{2}"), B.format("9"), "", B.format("1")]
    golds = ["1", "3", "1", "0.5", "8", "1", "#### 1"]
    rewards, counts = score_batch(responses, golds)
    assert rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert counts == {"correct": 3, "wrong": 2, "unparsed": 2, "timeout": 0, "error": 0}
    assert score_batch([], []) == ([], {"correct": 0, "wrong": 0, "unparsed": 0, "timeout": 0, "error": 0})


def test_length_mismatch():
    with pytest.raises(ValueError, match="3 responses but 2 answers"):
        score_batch(["a", "b", "c"], ["1", "2"])


# The silent all-zero bug: math-verify's SIGALRM timeouts raise off the main thread, and a
# catch-all wrapper turns that into 0.0 for every answer. Correct answers must still score 1.

def test_thread_caller_gets_real_scores():
    out = []
    thread = threading.Thread(target=lambda: out.append(score_batch([B.format("\\frac12"), B.format("7")], ["0.5", "7"])))
    thread.start()
    thread.join(60)
    assert out == [([1.0, 1.0], {"correct": 2, "wrong": 0, "unparsed": 0, "timeout": 0, "error": 0})]


def test_thread_pool_callers_get_real_scores():
    def job(k):
        return score(B.format(f"\\frac{{{k}}}{{2}}"), str(k / 2))
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(job, range(1, 9))) == [1.0] * 8


HOSTILE = {
    "empty": "",
    "100k chars, box early": "\\boxed{7}" + "a" * 100_000,
    "100k chars of braces": "\\boxed{" + "{" * 100_000,
    "unbalanced": "\\boxed{1}}}} \\boxed{{{{1}",
    "nested frac 200 deep": "\\boxed{" + "\\frac{" * 200 + "1" + "}{2}" * 200 + "}",
    "400-term polynomial": "\\boxed{" + "+".join(f"{k}x^{{{k}}}" for k in range(400)) + "}",
    # under MAX_ANSWER_CHARS, so these do reach sympy
    "nested frac 90 deep": "\\boxed{" + "\\frac{" * 90 + "1" + "}{2}" * 90 + "}",
    "100-term polynomial": "\\boxed{" + "+".join(f"x^{{{k}}}" for k in range(100)) + "}",
    "nested powers": "\\boxed{" + "2^{" * 150 + "2" + "}" * 150 + "}",
    "short huge power tower": "\\boxed{9^{9^{9^{9}}}}",
    "nul bytes": "\\boxed{\x00\x00}\x00",
    "lone surrogate": "\\boxed{\udcff}",
    "replacement chars": "\\boxed{\ufffd\ufffd}",
    "backslashes": "\\boxed{" + "\\" * 5000 + "}",
    "deep parens": "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
}


# The hostile inputs run under a 1 s CPU limit per answer (the default is 5 s): the
# property tested, a bounded time and a 0 score, holds for any limit.
T = 1.0


def bound(n):  # what the design guarantees whatever the load: the hard limit, a restart each
    return n * (reward.hard_timeout(T) + reward.STARTUP_TIMEOUT)


def test_hostile_inputs_score_zero_and_never_hang():
    start = time.monotonic()
    rewards, counts = score_batch(list(HOSTILE.values()), ["1"] * len(HOSTILE), timeout=T)
    assert rewards == [0.0] * len(HOSTILE), dict(zip(HOSTILE, rewards))
    assert sum(counts.values()) == len(HOSTILE)
    assert time.monotonic() - start < bound(len(HOSTILE))


def test_hostile_single_calls():
    for name, response in HOSTILE.items():
        start = time.monotonic()
        assert score(response, "1", timeout=T) == 0.0, name
        assert time.monotonic() - start < bound(1), name


def test_power_tower_is_a_timeout_and_the_pool_recovers():
    rewards, counts = score_batch(["\\boxed{9^{9^{9^{9}}}}", B.format("2")], ["1", "2"], timeout=T)
    assert rewards == [0.0, 1.0] and counts["timeout"] == 1


def test_the_limit_is_cpu_time_not_wall_time():
    """The worker's judge, run here in the main thread: time spent waiting (a busy
    machine's run queue; here a sleep) does not count against the limit, CPU spent
    computing does."""
    import signal
    from math_verify import parse
    old = signal.signal(signal.SIGPROF, reward._on_timer)
    try:
        def waits(gold):  # 1.5 s of wall time, no CPU
            time.sleep(1.5)
            return parse("$" + gold + "$")

        def computes(gold):  # CPU until the timer fires
            while True:
                sum(range(1000))
        assert reward._judge("1", "1", waits, 1.0) == "correct"
        start = time.process_time()
        assert reward._judge("1", "1", computes, 0.5) == "timeout"
        assert time.process_time() - start >= 0.5
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def test_symbolic_answer_scores_one_while_every_core_is_busy():
    """(x+1)^2 against x^2+2x+1 took 2 s of math-verify cold on a loaded machine, and
    the old 1 s wall-clock limit scored it 0. Every core spinning, fresh workers, the
    default limit: it scores 1."""
    import os
    import subprocess
    import sys
    reward._shutdown()  # cold workers, as at the start of a run
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 2))]
    try:
        rewards, counts = score_batch([B.format("(x+1)^2"), B.format("x^2+2x+1")], ["x^2+2x+1", "(x+1)^2"])
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert rewards == [1.0, 1.0], counts


def test_a_killed_worker_loses_no_answer(monkeypatch):
    """A worker killed with a chunk in hand (out of memory, a stray SIGKILL): its
    unanswered items go to the next worker, none scores 0."""
    import os
    import signal
    monkeypatch.setattr(reward, "WORKERS", 1)
    score_batch([B.format("1")], ["1"])
    real, kills = reward._send, []

    def send_then_kill(w, message):  # stopped first, so that it dies holding its whole chunk
        if not kills:
            kills.append(w["proc"].pid)
            os.kill(w["proc"].pid, signal.SIGSTOP)
        real(w, message)
        if kills == [w["proc"].pid]:
            os.kill(w["proc"].pid, signal.SIGKILL)
    monkeypatch.setattr(reward, "_send", send_then_kill)
    golds = [str(k) for k in range(20)]
    rewards, counts = score_batch([B.format(g) for g in golds], golds)
    assert kills and rewards == [1.0] * 20 and counts["correct"] == 20


def test_an_answer_that_kills_two_workers_is_an_error_not_a_hang(monkeypatch):
    import os
    import signal
    monkeypatch.setattr(reward, "WORKERS", 1)
    score_batch([B.format("1")], ["1"])
    real = reward._send

    def send_then_kill(w, message):  # every worker dies on its first message, before it can answer
        os.kill(w["proc"].pid, signal.SIGSTOP)
        real(w, message)
        os.kill(w["proc"].pid, signal.SIGKILL)
    monkeypatch.setattr(reward, "_send", send_then_kill)
    rewards, counts = score_batch([B.format("1")], ["1"])
    assert rewards == [0.0] and counts["error"] == 1


def test_hard_timeout_kills_and_replaces_a_worker(monkeypatch):
    # A parent limit under the worker's own CPU limit stands in for a C call deaf to the
    # timer: the worker is killed, the item counts as timeout, the rest still score.
    monkeypatch.setattr(reward, "hard_timeout", lambda timeout: 0.5)
    monkeypatch.setattr(reward, "WORKERS", 1)
    score_batch([B.format("1")], ["1"])
    before = [w["proc"].pid for w in reward._pool]
    responses = [B.format("1"), "\\boxed{9^{9^{9^{9}}}}", B.format("3"), B.format("4")]
    rewards, counts = score_batch(responses, ["1", "1", "3", "4"], timeout=30.0)
    assert rewards == [1.0, 0.0, 1.0, 1.0]
    assert counts["timeout"] == 1 and counts["correct"] == 3
    assert [w["proc"].pid for w in reward._pool] != before


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        score_batch([B.format("1")], ["1"], timeout=0)
