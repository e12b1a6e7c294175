"""The training library behind train_gpt.py (it imports model/, optim/ and data/, never tools/, bench/,
experiments/ or the entry script):
  recipe.py      the config (its fields, the flags), presets, batch layout, optimizer groups;
  flags.py       typed flags from a config dataclass over named presets, each value checked;
  schedule.py    the run's schedule by step (lr, momentum, window, tokens), applied to the optimizer;
  run.py         the run as one object: its set-up, training step, validation and checkpoint;
  report.py      what the run logs: opening lines, step and validation lines, throughput, the summary;
  runtime.py     the process: device, process group, signals, the clock, agreement across ranks;
  rundir.py      the run's folder: claiming it, the lock, refusing to overwrite an earlier run;
  state.py       the run's state (model, optimizer, loader, RNG, step, train time): RunState;
  checkpoint.py  a RunState saved, loaded and resolved (--resume), durably, for one process or many;
  runlog.py      the run's record: console, log.txt (source and environment first), metrics.jsonl, wandb;
  compiling.py   torch.compile with every graph counted by mode;
  fsdp.py        FSDP2 sharding of the GPT (--fsdp);
  sampling.py    text from a trained GPT (the run's final sample, tools.sample);
  plot.py        loss curves from runs' metrics.jsonl (the run's loss.png, tools.plot).
"""
