"""The EM text formats (checked against the SPEC's wording) and the parsers of model and teacher answers."""
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from promptcot_engine.em.concepts import parse_concepts
from promptcot_engine.em.templates import (
    CODE_LEVEL,
    MATH_LEVELS,
    PROBLEM_SEGMENT,
    RATIONALE_SEGMENT,
    concept_extraction_prompt,
    level_prompt,
    parse_level,
    parse_prompt_model_output,
    parse_rationale,
    prompt_model_prompt,
    prompt_model_segments,
    rationale_model_prompt,
    rationale_prompt,
)
from promptcot_engine.errors import InputError

CONCEPTS = ["Vieta's formulas for the roots of a quadratic", "The triangle inequality", "Modular arithmetic"]


def test_prompt_model_prompt_is_the_spec_format():
    assert prompt_model_prompt(CONCEPTS, "AIME") == (
        "Given foundational concepts and difficulty level, identify connections and develop a question that "
        "integrates these concepts with appropriate complexity.\n\n"
        "Foundational Concepts:\n"
        "1. Vieta's formulas for the roots of a quadratic\n"
        "2. The triangle inequality\n"
        "3. Modular arithmetic\n\n"
        "Difficulty Level: AIME"
    )


@pytest.mark.parametrize("level,domain", [(CODE_LEVEL, "code"), (CODE_LEVEL, "math"), ("Div. 2 C", "code")])
def test_prompt_model_prompt_programming_variant(level, domain):
    prompt = prompt_model_prompt(["Binary search on the answer", "Prefix sums"], level, domain)
    assert prompt.startswith(
        "Given foundational concepts and difficulty level, identify connections and develop a programming problem "
        "that integrates these concepts with appropriate complexity.\n\nFoundational Concepts:\n1. Binary search"
    )
    assert prompt.endswith(f"\n\nDifficulty Level: {level}")


def test_prompt_model_prompt_writes_each_concept_on_one_line():
    prompt = prompt_model_prompt(["  Law of\ncosines  ", "Angle\tbisector theorem"], "HMMT-Feb")
    assert "Foundational Concepts:\n1. Law of cosines\n2. Angle bisector theorem\n\nDifficulty Level: HMMT-Feb" in prompt


@pytest.mark.parametrize(
    "concepts,level,domain,field",
    [
        ([], "AIME", "math", "concepts"),
        ("Modular arithmetic", "AIME", "math", "concepts"),
        (["Modular arithmetic", 3], "AIME", "math", "concepts[1]"),
        (["Modular arithmetic", "  "], "AIME", "math", "concepts[1]"),
        (CONCEPTS, "", "math", "level"),
        (CONCEPTS, "AIME", "physics", "domain"),
    ],
)
def test_prompt_builders_name_the_bad_field(concepts, level, domain, field):
    with pytest.raises(InputError, match=f"^{re.escape(field)}: "):
        prompt_model_prompt(concepts, level, domain)
    with pytest.raises(InputError, match=f"^{re.escape(field)}: "):
        rationale_model_prompt(concepts, level, "Find x.", domain)


def test_segments_concatenate_to_the_documented_completion():
    segments = prompt_model_segments("  I combine Vieta with parity.\n", "\nFind all $n$ such that ...  ")
    assert "".join(segments) == (
        "<!-- BEGIN RATIONALE -->\nI combine Vieta with parity.\n<!-- END RATIONALE -->\n\n"
        "<!-- BEGIN PROBLEM -->\nFind all $n$ such that ...\n<!-- END PROBLEM -->"
    )
    assert segments[RATIONALE_SEGMENT] == "I combine Vieta with parity."
    assert segments[PROBLEM_SEGMENT] == "Find all $n$ such that ..."
    # Everything outside the z and x segments is the same fixed text for every candidate.
    other = [s for i, s in enumerate(segments) if i not in (RATIONALE_SEGMENT, PROBLEM_SEGMENT)]
    assert other == [s for i, s in enumerate(prompt_model_segments("z", "x")) if i not in (RATIONALE_SEGMENT, PROBLEM_SEGMENT)]


@pytest.mark.parametrize("rationale,problem,field", [("", "x", "rationale"), ("z", " \n ", "problem"), (None, "x", "rationale")])
def test_segments_refuse_empty_rationale_or_problem(rationale, problem, field):
    with pytest.raises(InputError, match=f"^{field}: "):
        prompt_model_segments(rationale, problem)


marker_free_text = st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1).filter(str.strip)


@given(marker_free_text, marker_free_text)
def test_parse_inverts_segments(rationale, problem):
    assert parse_prompt_model_output("".join(prompt_model_segments(rationale, problem))) == (rationale.strip(), problem.strip())


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<!--BEGIN RATIONALE-->idea<!--END RATIONALE--><!--BEGIN PROBLEM-->task<!--END PROBLEM-->", ("idea", "task")),
        ("Sure!\n<!-- begin  rationale -->\n\n idea \n<!-- End Rationale -->\ntext between\n"
         "<!--  BEGIN PROBLEM  -->\r\n task \r\n<!-- END PROBLEM -->\ntrailing chatter", ("idea", "task")),
        ("<!-- BEGIN RATIONALE -->a\nb<!-- END RATIONALE --><!-- BEGIN PROBLEM -->c\n\nd<!-- END PROBLEM -->"
         "<!-- BEGIN PROBLEM -->second<!-- END PROBLEM -->", ("a\nb", "c\n\nd")),
        ("<!-- BEGIN RATIONALE -->idea<!-- END RATIONALE --><!-- BEGIN PROBLEM -->cut off by max_tokens", None),
        ("<!-- BEGIN RATIONALE -->idea<!-- BEGIN PROBLEM -->task<!-- END PROBLEM -->", None),
        ("<!-- BEGIN RATIONALE -->   <!-- END RATIONALE --><!-- BEGIN PROBLEM -->task<!-- END PROBLEM -->", None),
        ("<!-- BEGIN RATIONALE -->idea<!-- END RATIONALE --><!-- BEGIN PROBLEM -->\n<!-- END PROBLEM -->", None),
        ("<!-- BEGIN PROBLEM -->task<!-- END PROBLEM --><!-- BEGIN RATIONALE -->idea<!-- END RATIONALE -->", None),
        ("no markers at all", None),
    ],
)
def test_parse_prompt_model_output(text, expected):
    assert parse_prompt_model_output(text) == expected


def test_rationale_model_prompt_format():
    prompt = rationale_model_prompt(CONCEPTS, "USAMO", "  Prove that $n^2+1$ is never divisible by 3.  ")
    assert prompt == (
        "Given foundational concepts, a difficulty level and a question developed from them, reconstruct the "
        "thinking process that leads from the concepts and the difficulty level to exactly this question.\n\n"
        "Foundational Concepts:\n1. Vieta's formulas for the roots of a quadratic\n2. The triangle inequality\n"
        "3. Modular arithmetic\n\nDifficulty Level: USAMO\n\n"
        "Problem:\nProve that $n^2+1$ is never divisible by 3.\n\nThinking Process:\n"
    )
    code = rationale_model_prompt(["Prefix sums"], CODE_LEVEL, "Given an array ...", domain="code")
    assert "a programming problem developed from them" in code and "exactly this programming problem" in code


def test_teacher_prompts_carry_the_inputs():
    extraction = concept_extraction_prompt("Find the largest prime factor of 1001.", num_concepts=7)
    assert "educational assessment" in extraction and "Problem:\nFind the largest prime factor of 1001." in extraction
    assert "Python list of exactly 7" in extraction and "math competition problem" in extraction
    assert "programming problem" in concept_extraction_prompt("Sort the array.", domain="code")

    levels = level_prompt("Find the largest prime factor of 1001.")
    assert all(level in levels for level in MATH_LEVELS) and "Difficulty Level:" in levels

    rationale = rationale_prompt(CONCEPTS, "AIME", "Find x.")
    assert "problem design expert" in rationale and "identical problem" in rationale
    assert "1. Vieta's formulas for the roots of a quadratic\n" in rationale and "Difficulty Level: AIME" in rationale
    assert "Problem:\nFind x." in rationale and '"Thinking Process:"' in rationale


@pytest.mark.parametrize("bad", [0, -1, 2.5, "5"])
def test_concept_extraction_prompt_rejects_a_bad_count(bad):
    with pytest.raises(InputError, match="num_concepts"):
        concept_extraction_prompt("Find x.", num_concepts=bad)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Difficulty Level: AIME", "AIME"),
        ("**Difficulty Level:** HMMT February", "HMMT-Feb"),
        ("difficulty level: hmmt-nov", "HMMT-Nov"),
        ("It resembles an AMC 12 problem.", "AMC12"),
        ("Harder than AMC12, easier than USAMO. Difficulty Level: USAJMO.", "USAJMO"),
        ("Too hard for the AIME; I'd say USAMO.", "USAMO"),
        ("Difficulty Level: <one of the levels above>\nSo the answer is USOJMO.", "USOJMO"),
        ("Difficulty Level: AIME\nOn reflection,\nDifficulty Level: USOMO", "USOMO"),
        ("Difficulty Level: Codeforces", CODE_LEVEL),
        ("The author aimed to make it hard.", None),
        ("Difficulty Level: IMO", None),
        ("", None),
    ],
)
def test_parse_level(text, expected):
    assert parse_level(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Here is my analysis.\n\nThinking Process:\nStep 1. Start from parity.\nStep 2. ...", "Step 1. Start from parity.\nStep 2. ..."),
        ("**Thinking Process:**\n\n1. Start from parity.", "1. Start from parity."),
        ("### Thinking process: Start from parity.", "Start from parity."),
        ("Start from parity, then add Vieta.", "Start from parity, then add Vieta."),
        ("Thinking Process:\n   ", None),
        ("  ", None),
    ],
)
def test_parse_rationale(text, expected):
    assert parse_rationale(text) == expected


FENCED = '''Let me analyze the problem first.
The problem uses [a, b] intervals and \\[ x^2 + y^2 = 1 \\].

```python
concepts = [
    "Pythagorean theorem",
    "Equation of a circle: $x^2 + y^2 = r^2$",
    'Half-open intervals [0, 1)',
]
```
'''


@pytest.mark.parametrize(
    "text,expected",
    [
        ('["Modular arithmetic", "Fermat\'s little theorem"]', ["Modular arithmetic", "Fermat's little theorem"]),
        (FENCED, ["Pythagorean theorem", "Equation of a circle: $x^2 + y^2 = r^2$", "Half-open intervals [0, 1)"]),
        # An example list in the prose, then the answer: the last list wins; a bracketed remark after it is no list.
        ('For example ["A", "B"]. My answer:\n["Pigeonhole principle", "Graph coloring"]\n[Note: 2 concepts]',
         ["Pigeonhole principle", "Graph coloring"]),
        ('{"concepts": ["Inclusion\\u2013exclusion", "Binomial coefficients"]}', ["Inclusion–exclusion", "Binomial coefficients"]),
        ('[["Nested one", "Nested two"]]', ["Nested one", "Nested two"]),
        # Unquotable apostrophes: literal_eval and JSON fail, the quoted items are still read.
        ("['Euler's formula', 'Vieta's formulas',]", ["Euler's formula", "Vieta's formulas"]),
        ("Concepts:\n1. **Law of sines**\n2) Law of cosines,\n\n3. `Heron's formula`", ["Law of sines", "Law of cosines", "Heron's formula"]),
        ("Steps:\n1. Read the problem\n2. Think\nThe concepts are:\n- Similar triangles\n* Power of a point\n• Ceva's theorem",
         ["Similar triangles", "Power of a point", "Ceva's theorem"]),
        ('"Generating functions",\n"Recurrence relations"\n', ["Generating functions", "Recurrence relations"]),
        ('["Parity", "parity", "  Parity ", "Invariants"]', ["Parity", "Invariants"]),
        ('<think>["Draft concept"]</think>\nThe answer: ["Final concept"]', ["Final concept"]),
        ("The interval [0, 1] and the list [1, 2, 3] hold no concepts.", []),
        ('[]', []),
        ("I cannot determine the concepts.", []),
        ("", []),
    ],
)
def test_parse_concepts(text, expected):
    assert parse_concepts(text) == expected


def test_parse_concepts_keeps_at_most_max_concepts():
    text = str([f"Concept {i}" for i in range(8)])
    assert parse_concepts(text, max_concepts=5) == [f"Concept {i}" for i in range(5)]
    assert len(parse_concepts(text)) == 8
