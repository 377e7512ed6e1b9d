"""Strict OpenMetrics parse of the exposition on stdin.

Exits 0 and prints the number of families and samples when
prometheus_client's OpenMetrics parser accepts the whole text (including the
closing `# EOF`); exits 1 with the parser's message on stderr otherwise.
Used by the fdtrace-tests harness (tests/src/prometheus.rs), which runs it
with the interpreter of a venv that has prometheus_client installed.
"""

import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    try:
        # The parser is lazy: only consuming every family parses every line.
        families = list(text_string_to_metric_families(text))
    except ValueError as err:
        print(f"not valid OpenMetrics: {err}", file=sys.stderr)
        return 1
    samples = sum(len(family.samples) for family in families)
    print(f"{len(families)} families, {samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
