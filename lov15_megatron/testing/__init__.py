"""Test utilities that ship with the package (multi-rank launcher)."""
