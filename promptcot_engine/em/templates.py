"""The text formats of the PromptCoT 2.0 loop: what each model and each teacher reads and writes.

Prompt model p(z, x | c) -- plain text, no chat template, exactly as the released prompt model reads it.
The instruction is one line ("... develop a question that integrates these concepts with appropriate
complexity."; "a programming problem" replaces "a question" for code) and the prompt ends at the level,
with no trailing newline:

    Given foundational concepts and difficulty level, identify connections and develop a question that [...]
    <blank line>
    Foundational Concepts:
    1. first concept
    2. second concept
    <blank line>
    Difficulty Level: AIME

Its completion, built by `prompt_model_segments`, starts right at the first marker; the newlines sit inside
the marker segments, so z and x are stored and tokenized stripped:

    <!-- BEGIN RATIONALE -->\\n{z}\\n<!-- END RATIONALE -->\\n\\n<!-- BEGIN PROBLEM -->\\n{x}\\n<!-- END PROBLEM -->

Rationale model q(z | c, x) -- the paper never published this format; ours is plain text too, the concept
prompt's layout followed by the problem and a cue, and the completion is z alone (stripped):

    Given foundational concepts, a difficulty level and a question developed from them, reconstruct the
    thinking process that leads from the concepts and the difficulty level to exactly this question.
    <blank line>
    Foundational Concepts:
    1. ...
    <blank line>
    Difficulty Level: AIME
    <blank line>
    Problem:
    {x}
    <blank line>
    Thinking Process:\\n

Teacher prompts (cold start) are user-message texts for an instruction-tuned chat model; the caller applies
the teacher's chat template. Their answers are read by `parse_level`, `parse_rationale` and
`promptcot_engine.em.concepts.parse_concepts`.

Concepts are written one per line, so each concept's internal whitespace (newlines included) is collapsed
to single spaces. A level or domain of code ("codeforces" / "code") selects the programming wording.
"""
from __future__ import annotations

import re

from promptcot_engine.errors import InputError

MATH_LEVELS = ("AMC12", "HMMT-Nov", "HMMT-Feb", "AIME", "USAJMO", "USAMO", "USOJMO", "USOMO")
CODE_LEVEL = "codeforces"
DOMAINS = ("math", "code")

RATIONALE_BEGIN = "<!-- BEGIN RATIONALE -->"
RATIONALE_END = "<!-- END RATIONALE -->"
PROBLEM_BEGIN = "<!-- BEGIN PROBLEM -->"
PROBLEM_END = "<!-- END PROBLEM -->"

# Positions of z and x in prompt_model_segments(): the only segments the reward and the loss count.
RATIONALE_SEGMENT = 1
PROBLEM_SEGMENT = 3

THINKING_PROCESS_CUE = "Thinking Process:"


def _is_code(level: str, domain: str) -> bool:
    return domain == "code" or level == CODE_LEVEL


def _check_inputs(concepts: list[str], level: str, domain: str) -> None:
    if domain not in DOMAINS:
        raise InputError(f"domain: expected one of {DOMAINS}, got {domain!r}")
    if not isinstance(level, str) or not level.strip():
        raise InputError(f"level: expected a non-empty string, got {level!r}")
    if not isinstance(concepts, (list, tuple)) or not concepts:
        raise InputError(f"concepts: expected a non-empty list of strings, got {concepts!r}")
    for i, concept in enumerate(concepts):
        if not isinstance(concept, str) or not concept.strip():
            raise InputError(f"concepts[{i}]: expected a non-empty string, got {concept!r}")


def _check_text(value: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{field}: expected a non-empty string, got {value!r}")
    return value.strip()


def _concept_block(concepts: list[str], level: str) -> str:
    numbered = "\n".join(f"{i}. {' '.join(concept.split())}" for i, concept in enumerate(concepts, start=1))
    return f"Foundational Concepts:\n{numbered}\n\nDifficulty Level: {level.strip()}"


def prompt_model_prompt(concepts: list[str], level: str, domain: str = "math") -> str:
    """The prompt model's input c: the instruction, the numbered concepts and the level."""
    _check_inputs(concepts, level, domain)
    task = "a programming problem" if _is_code(level, domain) else "a question"
    return (
        "Given foundational concepts and difficulty level, identify connections and develop "
        f"{task} that integrates these concepts with appropriate complexity.\n\n"
        + _concept_block(concepts, level)
    )


def prompt_model_segments(rationale: str, problem: str) -> list[str]:
    """The prompt model's completion (z then x) as 5 segments that concatenate to the full text.

    The scorer and the trainer tokenize each segment on its own, so the z and x token spans are exact;
    only segments RATIONALE_SEGMENT and PROBLEM_SEGMENT are scored and trained on (the markers are
    fixed text, the same for every candidate). An empty z or x is refused: it would score 0.
    """
    rationale = _check_text(rationale, "rationale")
    problem = _check_text(problem, "problem")
    return [
        f"{RATIONALE_BEGIN}\n",
        rationale,
        f"\n{RATIONALE_END}\n\n{PROBLEM_BEGIN}\n",
        problem,
        f"\n{PROBLEM_END}",
    ]


def _marker_pattern(marker: str) -> str:
    # "<!-- BEGIN RATIONALE -->" -> tolerate any spacing and case: "<!--BEGIN  rationale-->".
    words = marker.removeprefix("<!--").removesuffix("-->").split()
    return r"<!--\s*" + r"\s+".join(words) + r"\s*-->"


_RATIONALE_RE = re.compile(
    _marker_pattern(RATIONALE_BEGIN) + r"(.*?)" + _marker_pattern(RATIONALE_END), re.DOTALL | re.IGNORECASE
)
_PROBLEM_RE = re.compile(
    _marker_pattern(PROBLEM_BEGIN) + r"(.*?)" + _marker_pattern(PROBLEM_END), re.DOTALL | re.IGNORECASE
)


def parse_prompt_model_output(text: str) -> tuple[str, str] | None:
    """(z, x) from a prompt model completion, both stripped; None when either marker pair is missing or
    encloses only whitespace. The problem is the first complete problem pair after the rationale pair."""
    rationale = _RATIONALE_RE.search(text)
    if rationale is None:
        return None
    problem = _PROBLEM_RE.search(text, rationale.end())
    if problem is None:
        return None
    z, x = rationale.group(1).strip(), problem.group(1).strip()
    if not z or not x:
        return None
    return z, x


def rationale_model_prompt(concepts: list[str], level: str, problem: str, domain: str = "math") -> str:
    """The rationale model's input (c, x); its completion is the rationale z."""
    _check_inputs(concepts, level, domain)
    problem = _check_text(problem, "problem")
    task = "programming problem" if _is_code(level, domain) else "question"
    return (
        f"Given foundational concepts, a difficulty level and a {task} developed from them, reconstruct the "
        f"thinking process that leads from the concepts and the difficulty level to exactly this {task}.\n\n"
        f"{_concept_block(concepts, level)}\n\nProblem:\n{problem}\n\n{THINKING_PROCESS_CUE}\n"
    )


def concept_extraction_prompt(problem: str, num_concepts: int = 5, domain: str = "math") -> str:
    """Teacher message: list `num_concepts` foundational concepts of the problem as a Python list."""
    problem = _check_text(problem, "problem")
    if domain not in DOMAINS:
        raise InputError(f"domain: expected one of {DOMAINS}, got {domain!r}")
    if not isinstance(num_concepts, int) or num_concepts < 1:
        raise InputError(f"num_concepts: expected a positive integer, got {num_concepts!r}")
    kind, knowledge = (
        ("programming problem", "algorithms, data structures, techniques or facts")
        if domain == "code"
        else ("math competition problem", "theorems, techniques, definitions or facts")
    )
    return (
        f"As an expert in educational assessment, analyze the following {kind} and identify the "
        f"{num_concepts} foundational concepts that it tests.\n\n"
        f"Problem:\n{problem}\n\n"
        f"Each concept is one self-contained sentence naming specific knowledge ({knowledge}) a solver must "
        "master, precise enough to be taught and tested on its own, not a restatement of the problem.\n"
        f"Answer with a Python list of exactly {num_concepts} double-quoted strings and write nothing after "
        "the list."
    )


def level_prompt(problem: str) -> str:
    """Teacher message: classify a math seed's difficulty as one of MATH_LEVELS (code seeds are
    CODE_LEVEL and need no classification)."""
    problem = _check_text(problem, "problem")
    return (
        "As an expert in mathematics competitions, decide which competition this problem's difficulty "
        f"matches best. Choose exactly one of: {', '.join(MATH_LEVELS)}.\n\n"
        f"Problem:\n{problem}\n\n"
        "Explain briefly, then end your answer with one line of the form\n"
        "Difficulty Level: <one of the levels above>"
    )


def _level_pattern(level: str) -> str:
    # Accept the spellings teachers write: "AMC 12", "HMMT November", "hmmt-feb".
    spelled = {
        "AMC12": r"AMC[\s-]?12",
        "HMMT-Nov": r"HMMT[\s-]*(?:Nov|November)",
        "HMMT-Feb": r"HMMT[\s-]*(?:Feb|February)",
    }
    return spelled.get(level, re.escape(level))


_ALL_LEVELS = (*MATH_LEVELS, CODE_LEVEL)
_LEVEL_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    + "|".join(f"(?P<L{i}>{_level_pattern(level)})" for i, level in enumerate(_ALL_LEVELS))
    + r")(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_LEVEL_LINE_RE = re.compile(r"difficulty\s+level\s*\**\s*:\s*\**\s*(.*)", re.IGNORECASE)


def _levels_in(text: str) -> list[str]:
    return [_ALL_LEVELS[int(m.lastgroup[1:])] for m in _LEVEL_RE.finditer(text)]


def parse_level(text: str) -> str | None:
    """The canonical level named by a teacher's answer, or None.

    The last "Difficulty Level: ..." line decides when it names a level; otherwise the last level named
    anywhere in the text (teachers conclude at the end).
    """
    for line in reversed(_LEVEL_LINE_RE.findall(text)):
        found = _levels_in(line)
        if found:
            return found[0]
    found = _levels_in(text)
    return found[-1] if found else None


def rationale_prompt(concepts: list[str], level: str, problem: str, domain: str = "math") -> str:
    """Teacher message: reverse-engineer the thinking process from (c, level) to exactly this problem."""
    _check_inputs(concepts, level, domain)
    problem = _check_text(problem, "problem")
    kind = "programming problem" if _is_code(level, domain) else "problem"
    return (
        f"As a problem design expert, you are given foundational concepts, a difficulty level and a {kind} "
        "built from them. Reverse-engineer the thinking process of the designer who started from these "
        f"concepts and this difficulty level and arrived at exactly this {kind}.\n\n"
        "The thinking process must be:\n"
        f"- precise: another expert following it step by step would recreate the identical {kind};\n"
        "- natural: every step follows logically from the concepts and the difficulty level, so that the "
        f"process could be derived from them alone, without seeing the {kind}.\n\n"
        f"{_concept_block(concepts, level)}\n\n"
        f"Problem:\n{problem}\n\n"
        f'Write "{THINKING_PROCESS_CUE}" on its own line, then the thinking process.'
    )


_CUE_RE = re.compile(r"thinking\s+process\s*(?:\*\*)?\s*:\s*(?:\*\*)?", re.IGNORECASE)


def parse_rationale(text: str) -> str | None:
    """The rationale in a teacher's answer: the text after the first "Thinking Process:" cue (markdown
    bold tolerated). Fallback when the cue is missing: the whole answer, since teachers often drop the
    header but still answer with the process. None when the result is empty."""
    cue = _CUE_RE.search(text)
    rationale = (text[cue.end():] if cue else text).strip()
    return rationale or None
