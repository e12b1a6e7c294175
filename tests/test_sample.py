"""tools.sample (training/sampling.py, training.checkpoint.load_model): seeded, reproducible text from a
checkpoint; one-line error for a missing or corrupt one."""

import shutil

import pytest

from data.tokenizer import gpt2_encoding
from tools import sample
from training.checkpoint import load_model
from training.sampling import Sampling
from training.sampling import sample as sample_text


def run(capsys, *args: str) -> str:
    sample.main([*args, "--device", "cpu"])
    return capsys.readouterr().out


def test_same_seed_gives_the_same_text_and_another_seed_other_text(tiny_checkpoint, capsys):
    directory, _ = tiny_checkpoint
    flags = [str(directory), "--prompt", "Once upon a time", "--max-tokens", "12"]
    first = run(capsys, *flags, "--seed", "1")
    assert run(capsys, *flags, "--seed", "1") == first
    assert run(capsys, *flags, "--seed", "2") != first
    assert first.startswith("Once upon a time")
    # the continuation is 12 tokens (re-encoding the decoded text can merge tokens, never add)
    continuation = gpt2_encoding().encode_ordinary(first.rstrip("\n")[len("Once upon a time"):])
    assert 1 <= len(continuation) <= 12


def test_run_dir_checkpoint_dir_and_step_dir_give_the_same_text(tiny_checkpoint, capsys):
    directory, _ = tiny_checkpoint
    flags = ["--prompt", "Hello", "--max-tokens", "6", "--seed", "3"]
    paths = (directory.parent, directory, directory / "step_000007")
    texts = {run(capsys, str(path), *flags) for path in paths}
    assert len(texts) == 1


def test_text_is_the_models_own_generate_call(tiny_checkpoint):
    directory, model = tiny_checkpoint
    loaded = load_model(directory, "cpu")
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict()[name].equal(tensor), name
    assert sample_text(loaded, "Hi", 5, Sampling(seed=4)) == sample_text(model, "Hi", 5, Sampling(seed=4))


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit) as error:
        sample.main([str(missing)])
    message = str(error.value)
    assert message.startswith(f"error: {missing}: no such file or directory; expected a step directory")
    assert "\n" not in message


def test_corrupt_checkpoint_is_a_one_line_error(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint
    copy = shutil.copytree(directory, tmp_path / "checkpoints")
    shared = copy / "step_000007" / "shared.pt"
    shared.write_bytes(shared.read_bytes()[:1000])  # truncated
    with pytest.raises(SystemExit) as error:
        sample.main([str(tmp_path)])
    message = str(error.value)
    assert message.startswith(f"error: {shared}: cannot be read (") and "\n" not in message
