"""The arithmetic app: grade-school word problems with exact numeric answers.

Written entirely in the public app format (app.yaml, data.jsonl from generate.py, the code
node's safe evaluator in calc.py, a numeric scorer); registered as `arithmetic` (entry point
group `fmtune.apps`) only so that experiments can name it. The core never imports it.
"""
