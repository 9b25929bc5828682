import pytest

from promptcot_engine.errors import InputError
from promptcot_engine.selfplay.code import extract_code, outputs_match, run_tests
from promptcot_engine.selfplay.unit_tests import parse_unit_test


@pytest.mark.parametrize("text, expected", [
    ('{"input": "3\\n1 2 3\\n", "output": "6"}', {"input": "3\n1 2 3\n", "output": "6"}),
    ('Here is a test case:\n```json\n{"input": "5", "output": "25"}\n```\nIt checks squaring.',
     {"input": "5", "output": "25"}),
    ("Sure! {'input': '2 3', 'output': '5',} is a good one.", {"input": "2 3", "output": "5"}),
    ('{"input": ["2", "1 2", "3 4"], "output": [3, 7]}', {"input": "2\n1 2\n3 4", "output": "3\n7"}),
    ('{"input": [2, [1, 2], [3, 4]], "output": 10}', {"input": "2\n1 2\n3 4", "output": "10"}),
    ('{"Input": "1", "OUTPUT": "YES"}', {"input": "1", "output": "YES"}),
    ('{"input": "line one\nline two", "output": "2"}', {"input": "line one\nline two", "output": "2"}),
    ('{"input": "{}", "output": "}{"}', {"input": "{}", "output": "}{"}),
    ("Use a set {like this. Then: {\"input\": \"4\", \"output\": \"16\"}", {"input": "4", "output": "16"}),
    ('Draft: {"input": "1", "output": "1"}\nFinal:\n```json\n{"input": "2", "output": "4"}\n```',
     {"input": "2", "output": "4"}),
    ("```python\n{'input': '''7\n8''', 'output': '15'}\n```", {"input": "7\n8", "output": "15"}),
])
def test_parse_unit_test_from_messy_output(text, expected):
    assert parse_unit_test(text) == expected


@pytest.mark.parametrize("text", [
    "",
    "I cannot write a test for this problem.",
    '{"input": "1"}',
    '{"output": "1"}',
    '["input", "output"]',
    '{"input": null, "output": "1"}',
    '{"input": {"n": 1}, "output": "1"}',
    '{"input": "1", "output": "2"',
])
def test_parse_unit_test_rejects_what_is_not_a_test(text):
    assert parse_unit_test(text) is None


def test_extract_code_takes_the_last_python_block():
    text = ("First try:\n```python\nprint(1)\n```\nA shell aside:\n```bash\nls\n```\n"
            "Fixed:\n```Python3\nn = int(input())\nprint(n * n)\n```\nDone.")
    assert extract_code(text) == "n = int(input())\nprint(n * n)\n"
    assert extract_code("```py\nprint(2)\n```") == "print(2)\n"
    assert extract_code("no code at all") is None
    assert extract_code("```bash\nls\n```") is None
    assert extract_code("```python\n\n```") is None


@pytest.mark.parametrize("actual, expected, match", [
    ("6\n", "6", True),
    ("1 2  \n3\t\n\n\n", "1 2\n3", True),
    ("1\r\n2\r\n", "1\n2\n", True),
    ("6", "7", False),
    ("1 2", "1  2", False),
    ("\n6", "6", False),
    ("1\n\n2", "1\n2", False),
])
def test_outputs_match_modulo_trailing_whitespace(actual, expected, match):
    assert outputs_match(actual, expected) is match


SUM_TESTS = [{"input": "3\n1 2 3\n", "output": "6\n"}, {"input": "1\n-5", "output": "-5"},
             {"input": "4\n10 20 30 40", "output": "100"}]


def test_correct_program_passes_and_wrong_one_fails():
    correct = "n = int(input())\nprint(sum(map(int, input().split())))\n"
    assert [r.status for r in run_tests(correct, SUM_TESTS, timeout=5)] == ["ok"] * 3
    assert all(r.passed for r in run_tests(correct, SUM_TESTS, timeout=5))

    off_by_one = "n = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs[1:]))\n"
    results = run_tests(off_by_one, SUM_TESTS, timeout=5)
    assert [r.status for r in results] == ["wrong_answer"] * 3
    assert not any(r.passed for r in results)
    assert results[0].stdout == "5\n"


def test_failures_are_classified():
    crash = "n = int(input())\nprint(1 // (n - n))\n"
    [result] = run_tests(crash, SUM_TESTS[:1], timeout=5)
    assert (result.passed, result.status) == (False, "runtime_error")
    assert "ZeroDivisionError" in result.stderr

    [result] = run_tests("while True:\n    pass\n", SUM_TESTS[:1], timeout=1)
    assert (result.passed, result.status) == (False, "timeout")

    [result] = run_tests("import os\nos.system('echo hi')\n", SUM_TESTS[:1], timeout=5)
    assert (result.passed, result.status) == (False, "blocked")


def test_solution_from_model_output_end_to_end():
    solution = ("We sum the numbers.\n```python\nimport sys\ndata = sys.stdin.read().split()\n"
                "print(sum(map(int, data[1:])))\n```\n")
    tests = [parse_unit_test('```json\n{"input": ["3", "1 2 3"], "output": 6}\n```'),
             parse_unit_test("{'input': '2\\n5 5', 'output': '10'}")]
    results = run_tests(extract_code(solution), tests, timeout=5)
    assert [r.passed for r in results] == [True, True]


@pytest.mark.parametrize("tests, message", [
    ([{"input": "1"}], r"tests\[0\]: field 'output'"),
    ([{"input": "1", "output": "1"}, {"input": 2, "output": "1"}], r"tests\[1\]: field 'input'"),
    (["not a dict"], r"tests\[0\]"),
])
def test_malformed_tests_are_input_errors(tests, message):
    with pytest.raises(InputError, match=message):
        run_tests("print(1)", tests)
