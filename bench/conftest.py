import pytest


@pytest.fixture
def record_result(benchmark, capsys):
    """Prints a benchmark's result dict (past pytest's capture) and keeps it in the benchmark's extra_info."""
    def record(result: dict) -> None:
        benchmark.extra_info.update(result)
        with capsys.disabled():
            print()
            for key, value in result.items():
                print(f"{key:>32}: {value:,.3f}" if isinstance(value, float) else f"{key:>32}: {value}")
    return record
