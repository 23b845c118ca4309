"""Model families: adapters, and tiny random-weight checkpoints for tests (tiny.py)."""
