"""The attack rows of benchmarks/attack.py (issue 13), one module per family."""
