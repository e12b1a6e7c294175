"""The training library behind train_gpt.py: the recipe (config, presets, schedules, optimizer) in
recipe.py, the process set-up (device, process group, signals) in runtime.py."""
