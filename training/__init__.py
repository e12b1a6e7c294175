"""The training library behind train_gpt.py:
  recipe.py     the config (its fields, the flags), presets, batch layout, optimizer groups;
  flags.py      typed flags from a config dataclass over named presets, each value checked;
  schedule.py   the run's schedule by step (lr, momentum, window, tokens), applied to the optimizer;
  runtime.py    the process: device, process group, signals, the clock, agreement across ranks;
  rundir.py     the run's folder: claiming it, the lock, refusing to overwrite an earlier run;
  state.py      the run's state (model, optimizer, loader, RNG, step): save, load, restore;
  steps.py      the training step and the validation, the functions the compiled model runs in;
  compiling.py  torch.compile with every graph counted by mode;
  fsdp.py       FSDP2 sharding of the GPT (--fsdp).
"""
