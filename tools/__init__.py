"""Commands around training runs, each `python -m tools.X` (their library code lives in training/):
  sample        text from a checkpoint;
  hellaswag     HellaSwag accuracy of a checkpoint;
  plot          loss curves of runs;
  record_stats  a record's statistics over runs (mean, std, one-sided t-test);
  bundle        train_gpt.py with its repo modules inlined, one standalone file;
  parity        step parity against a record's own script (parity_record.py: the record's side).
Nothing outside tools/ imports from it (tests/test_imports.py).
"""
