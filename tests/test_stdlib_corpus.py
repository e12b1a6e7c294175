"""data.stdlib_corpus: the offline stdlib corpus, its document rules, byte-identical rebuilds and reuse."""

import hashlib
import json
import platform

import numpy as np
import pytest

from data import stdlib_corpus
from data.shards import list_shards, read_shard
from data.stdlib_corpus import MANIFEST, stdlib_documents, stdlib_shards
from data.tokenizer import gpt2_encoding

QUICK = 12  # documents: a build of a few hundred thousand tokens, under a second


def test_documents_are_the_stdlib_sources_outside_excluded_dirs_and_the_topics_in_sha256_order(tmp_path):
    files = {"json/decoder.py": "x = 1\n", "os.py": "import sys\n", "test/test_os.py": "skip\n",
             "site-packages/pkg/mod.py": "skip\n", "idlelib/run.py": "skip\n", "notes.txt": "not python\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "latin.py").write_bytes("# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n".encode("latin-1"))
    documents, skipped = stdlib_documents(tmp_path)
    names = [d.name for d in documents]
    assert {n for n in names if n.startswith("stdlib/")} == {"stdlib/json/decoder.py", "stdlib/os.py"}
    assert {n for n in names if n.startswith("topic/")} == {f"topic/{t}" for t in stdlib_corpus.topics}
    assert names == sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert skipped == ["latin.py"]  # not UTF-8: left out, and named in the manifest
    assert next(d.text for d in documents if d.name == "stdlib/os.py") == "import sys\n"


def test_the_same_interpreter_builds_byte_identical_shards_with_a_manifest(tmp_path):
    first, second = stdlib_shards(tmp_path / "a", QUICK), stdlib_shards(tmp_path / "b", QUICK)
    for split in ("train", "val"):
        (a,), (b,) = list_shards(first, split), list_shards(second, split)
        assert a.read_bytes() == b.read_bytes()
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["python"] == platform.python_version() and manifest["documents"] == QUICK
    assert manifest["tokens"]["train"] == len(read_shard(list_shards(first, "train")[0])) > 0
    assert manifest["tokens"]["val"] > 0  # every 20th document, the first one included


def test_the_shards_hold_the_documents_in_corpus_order(tmp_path):
    root = stdlib_shards(tmp_path, QUICK)
    documents, _ = stdlib_documents()
    train = np.asarray(read_shard(list_shards(root, "train")[0]))
    decoded = gpt2_encoding().decode(train.tolist()).split("<|endoftext|>")[1:]
    assert decoded == [d.text for d in documents[1:QUICK]]  # document 0 is the val split's


def test_a_complete_build_is_reused_and_a_damaged_one_rebuilt(tmp_path, monkeypatch):
    root = stdlib_shards(tmp_path, QUICK)
    train = list_shards(root, "train")[0]
    original = train.read_bytes()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a complete build")

    with monkeypatch.context() as patch:
        patch.setattr(stdlib_corpus, "prepare", no_rebuild)
        assert stdlib_shards(root, QUICK) == root
    train.write_bytes(original[:-2] + bytes([original[-2] ^ 1, original[-1]]))  # one id changed
    stdlib_shards(root, QUICK)
    assert train.read_bytes() == original


def test_a_build_with_other_settings_is_not_reused(tmp_path):
    root = stdlib_shards(tmp_path, QUICK)
    stdlib_shards(root, QUICK + 8)
    assert json.loads((root / MANIFEST).read_text())["documents"] == QUICK + 8


def test_fewer_than_two_documents_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_documents must be >= 2"):
        stdlib_shards(tmp_path, 1)
