"""Cross-framework numerics suite: one case table, one float64 reference, both halves.

``python -m tests.numerics`` prints the parity report; ``pytest tests/numerics`` runs the same
cases as tests (plus hypothesis fuzzing).
"""
