"""``make bench``: run every benchmark in turn; each writes its own JSON under ``bench/results/``."""

from __future__ import annotations

from bench import dictionary_training, extraction, monitor_overhead


def main() -> None:
    extraction.main()
    dictionary_training.main([])
    monitor_overhead.main([])


if __name__ == "__main__":
    main()
