"""Evaluate a checkpoint (or an official-format score file) on Winoground.

Not built yet: lands with the evaluation issue. This entry point says so instead of
pretending to evaluate.
"""
import sys

if __name__ == "__main__":
    sys.exit(
        "eval_winoground.py: the Winoground evaluator is not built yet (needs cacr.evaluation "
        "and conf/winoground.yaml). Available now: the UNITER model in cacr.model; see README.md."
    )
