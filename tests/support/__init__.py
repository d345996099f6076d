"""Test support shared by every test area (importable as ``support``)."""
