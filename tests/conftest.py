"""Fixtures shared by the whole suite."""

from toys import toy_methods  # noqa: F401  (re-exported fixture)
