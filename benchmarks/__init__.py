"""dmfast kernel benchmarks: ``python -m benchmarks.<op>`` prints a table and writes JSON; ``pytest benchmarks
--benchmark-enable`` runs the pytest-benchmark cases."""
