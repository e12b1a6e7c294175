"""The offline demo corpus: deterministic documents and split, shards built once, rebuilt if damaged."""

import shutil
from pydoc_data.topics import topics

import numpy as np
import pytest

from data import demo
from data.shards import read_shard
from data.tokenizer import EOT, encode_documents, gpt2_encoding


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return demo.demo_shards(tmp_path_factory.mktemp("demo"))


def test_split_is_a_fixed_few_percent_of_topics():
    documents = demo.demo_documents()
    assert len(documents["train"]) + len(documents["val"]) == len(topics)
    assert 0.05 <= len(documents["val"]) / len(topics) <= 0.10
    # crc32 of the name decides, so these never move between machines or Python versions.
    assert [demo.is_val_topic(name) for name in ["booleans", "integers", "return", "assert", "if"]] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert demo.demo_documents() == documents


def test_shards_hold_the_tokenized_documents(built):
    documents = demo.demo_documents()
    for split, name in demo.SPLIT_FILES.items():
        tokens = read_shard(built / name)
        assert np.array_equal(tokens, encode_documents(documents[split]))
        assert np.count_nonzero(tokens == EOT) == len(documents[split])
    val = read_shard(built / demo.SPLIT_FILES["val"])
    texts = gpt2_encoding().decode(val.tolist()).split("<|endoftext|>")
    assert texts == ["", *documents["val"]]


def copy_of(built, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(built, root)
    return root


def test_existing_valid_shards_are_kept(built, tmp_path):
    root = copy_of(built, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    assert demo.demo_shards(root) == root
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before


def test_damaged_shards_are_rebuilt(built, tmp_path):
    root = copy_of(built, tmp_path)
    val = root / demo.SPLIT_FILES["val"]
    val.write_bytes(val.read_bytes()[:-2])
    demo.demo_shards(root)
    assert val.read_bytes() == (built / demo.SPLIT_FILES["val"]).read_bytes()


def test_command_prints_token_counts(built, tmp_path, capsys):
    root = copy_of(built, tmp_path)
    demo.main(["--dir", str(root)])
    lines = capsys.readouterr().out.splitlines()
    counts = {split: len(read_shard(root / name)) for split, name in demo.SPLIT_FILES.items()}
    assert lines == [
        f"train: {counts['train']:,} tokens in {root / 'demo_train_000000.bin'}",
        f"val: {counts['val']:,} tokens in {root / 'demo_val_000000.bin'}",
    ]
