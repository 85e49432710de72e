"""Shared helpers of the test suite (importable as `helpers.*`: tests/ is on sys.path through conftest.py)."""
