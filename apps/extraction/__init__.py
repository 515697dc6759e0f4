"""The extraction app: name, email and address of a news article's contact person.

Written entirely in the public app format (app.yaml, its four architectures in variants/,
data.jsonl from generate.py, score.py, merge.py); registered as `extraction` (entry point
group `fmtune.apps`) only so that experiments can name it. The core never imports it.
"""
