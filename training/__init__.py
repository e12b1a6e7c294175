"""The training library behind train_gpt.py:
  recipe.py     config (flags), presets, schedules, batch layout, optimizer groups, window tensors;
  run.py        the run as one object: its set-up, training step, validation and checkpoint;
  report.py     what the run logs: opening lines, step and validation lines, throughput, the summary;
  runtime.py    the process: device, process group, signals, the clock, agreement across ranks;
  rundir.py     the run's folder: claiming it, the lock, refusing to overwrite an earlier run;
  state.py      the run's state (model, optimizer, loader, RNG, step): save, load, restore;
  compiling.py  torch.compile with every graph counted by mode;
  fsdp.py       FSDP2 sharding of the GPT (--fsdp).
"""
