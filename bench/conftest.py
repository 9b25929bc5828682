import pytest

from promptcot_engine.benchmarks.common import report


@pytest.fixture
def record_result(benchmark, capsys):
    """Prints a benchmark's result dict as `promptcot bench` does (past pytest's capture) and keeps it in the
    benchmark's extra_info."""
    def record(result: dict) -> None:
        benchmark.extra_info.update(result)
        with capsys.disabled():
            print("\n" + report(benchmark.name, result))
    return record
