import threading

import pytest

from promptcot_engine.selfplay.math import extract_boxed, is_equivalent, majority_vote


@pytest.mark.parametrize("text, expected", [
    (r"The answer is $\boxed{42}$.", "42"),
    (r"First \boxed{1}, then revised: \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{\sqrt{\frac{a}{b}} + {c}}", r"\sqrt{\frac{a}{b}} + {c}"),
    (r"so $\boxed 17$ apples", "17"),
    (r"\fbox{x^{2}}", "x^{2}"),
    (r"\boxed {  7 }", "7"),
    (r"\boxed{\boxed{3}}", "3"),
    (r"\boxed{2} and then \boxed{5", None),  # the last one is unclosed: a truncated answer
    (r"\boxed{}", None),
    (r"no box here: \boxedx{3} \box{4}", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


EQUIVALENT = [
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("12\\!000", "12000"),
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac{3}{4}", "0.75"),
    (r"\tfrac12", "1/2"),
    ("3/4", "0.75"),
    (r"\frac{2}{4}", r"\frac{1}{2}"),
    ("-0.5", r"-\frac{1}{2}"),
    ("1e3", "1000"),
    ("2.5e-1", r"\frac{1}{4}"),
    ("1.0", "1"),
    (r"50\%", "0.5"),
    (r"50\%", "50"),
    (r"10^\circ", "10"),
    (r"5\text{ cm}", "5"),
    (r"\$5", "5"),
    ("$7$", "7"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    (r"\sqrt{8}", r"2\sqrt{2}"),
    (r"2\pi", r"\pi \cdot 2"),
    (r"\left(1, 2\right)", "(1,2)"),
    ("(1, 2, 3)", r"\left(1,2,3\right)"),
    ("[1,3)", "[1, 3)"),
    (r"(0, \infty)", r"(0,\infty)"),
    (r"\{1,2,3\}", r"\{3,2,1\}"),
    ("x^2-1", "(x-1)(x+1)"),
    (r"\sin^2 x + \cos^2 x", "1"),
    ("x+y", "y+x"),
    ("2^{10}", "1024"),
    ("x=5", "5"),
    (r"\,3", "3"),
]

NOT_EQUIVALENT = [
    ("3", "4"),
    ("-3", "3"),
    ("50", "0.5"),
    (r"\frac{1}{3}", "0.33"),
    ("1000", "1e4"),
    ("[1,3)", "(1,3)"),
    ("(1,2,3)", "(3,2,1)"),
    ("x^2", "x^3"),
    (r"\sqrt{2}", "2"),
    ("a", "b"),
    (r"2\pi", "6.28"),
    ("not an answer", "5"),
]


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent_pairs_in_both_orders(a, b):
    assert is_equivalent(a, b)
    assert is_equivalent(b, a)


@pytest.mark.parametrize("a, b", NOT_EQUIVALENT)
def test_different_pairs_in_both_orders(a, b):
    assert not is_equivalent(a, b)
    assert not is_equivalent(b, a)


def test_runaway_comparison_times_out_and_the_next_call_still_works():
    # math-verify never finishes this one (a tower of powers evaluated exactly).
    assert not is_equivalent("9^{9^{9^{9}}}", "1000", timeout=0.5)
    assert is_equivalent(r"\frac{6}{4}", "1.5", timeout=30)


def test_equivalence_from_threads():
    pairs = [(r"\frac{1}{2}", "0.5", True), ("2", "3", False), ("9^{9^{9^{9}}}", "1", False), ("1e2", "100", True)]
    verdicts = [None] * len(pairs)

    def check(i, a, b):
        verdicts[i] = is_equivalent(a, b, timeout=0.5 if "9^" in a else 30)

    threads = [threading.Thread(target=check, args=(i, a, b)) for i, (a, b, _) in enumerate(pairs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verdicts == [expected for _, _, expected in pairs]


def test_majority_vote_counts_equivalent_spellings_together():
    answers = ["3", r"\frac{1}{2}", None, "0.5", "1/2", "3", "3.0", r"\dfrac{2}{4}"]
    assert majority_vote(answers) == r"\frac{1}{2}"  # four spellings of 1/2 beat three of 3


def test_majority_vote_breaks_ties_by_first_occurrence():
    assert majority_vote(["7", "1e1", "10", "7.0", None]) == "7"
    assert majority_vote(["1e1", "7", "10", "7.0"]) == "1e1"


def test_majority_vote_without_answers():
    assert majority_vote([]) is None
    assert majority_vote([None, None]) is None
    assert majority_vote([None, "x"]) == "x"
