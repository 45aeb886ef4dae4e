"""Trace replay: send a timestamped trace to a frontend, or simulate it on mocker workers (virtual clock)."""
