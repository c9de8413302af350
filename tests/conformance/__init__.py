"""The conformance kit: one suite that any function implementation runs (see test_kit.py)."""
