"""Helpers around train_gpt.py runs: launch seeds, summarize, test significance, plot, pack a record.

See tools/README.md. Every tool reads logs through tools/logparse.py.
"""
