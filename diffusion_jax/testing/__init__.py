"""Helpers that tests, benchmarks and users check the library against."""
