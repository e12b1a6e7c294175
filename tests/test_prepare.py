"""Tokenizing a corpus into shards: inputs, document order, the val split, shard sizes,
byte-identical re-runs, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from data import prepare as prepare_module
from data.prepare import PrepareError, is_val, prepare
from data.shards import read_shard
from data.tokenizer import encode_documents, gpt2_encoding


def documents_in(paths):
    """Decode shards back into their documents (the text after each EOT)."""
    tokens = np.concatenate([read_shard(p) for p in paths])
    return gpt2_encoding().decode(tokens.tolist()).split("<|endoftext|>")[1:]


def names(paths):
    return [p.name for p in paths]


def test_text_files_round_trip_as_one_document_each(tmp_path):
    texts = ["naïve café\r\nsecond line 🙂\n", "", "<|endoftext|> is text here"]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_bytes(text.encode())  # bytes: keep \r\n exactly
    summary = prepare(files, tmp_path / "out", val_fraction=0, workers=1)
    (shard,) = summary.shards["train"]
    assert np.array_equal(read_shard(shard), encode_documents(texts))
    assert summary.tokens == {"train": len(encode_documents(texts)), "val": 0}
    assert summary.shards["val"] == []
    assert summary.documents == 3


def test_directories_are_searched_recursively_for_txt_in_sorted_order(tmp_path):
    corpus = tmp_path / "corpus"
    for rel, text in {"b.txt": "B", "a/z.txt": "Z", "a/c.txt": "C", "a/notes.md": "skip me"}.items():
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_text(text)
    (tmp_path / "last.txt").write_text("L")
    summary = prepare([corpus, tmp_path / "last.txt"], tmp_path / "out", val_fraction=0, workers=1)
    assert documents_in(summary.shards["train"]) == ["C", "Z", "B", "L"]


def test_jsonl_documents_come_from_the_named_field(tmp_path):
    lines = [json.dumps({"body": "first", "id": 1}), "", json.dumps({"body": "second\nline"}), "  "]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    summary = prepare([tmp_path / "a.jsonl"], tmp_path / "out", val_fraction=0, jsonl_field="body", workers=1)
    assert documents_in(summary.shards["train"]) == ["first", "second\nline"]
    assert summary.documents == 2


def test_val_split_takes_every_nth_document_starting_with_the_first(tmp_path):
    assert [i for i in range(12) if is_val(i, 0.25)] == [0, 4, 8]
    assert [i for i in range(3) if is_val(i, 0.05)] == [0]
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    summary = prepare([tmp_path / "a.jsonl"], tmp_path / "out", val_fraction=0.25, workers=1)
    assert documents_in(summary.shards["val"]) == ["doc 0", "doc 4", "doc 8"]
    assert documents_in(summary.shards["train"]) == [f"doc {i}" for i in (1, 2, 3, 5, 6, 7, 9)]


def test_shards_hold_exactly_shard_tokens_and_are_named_like_fineweb(tmp_path):
    lines = [json.dumps({"text": "hello world " * i}) for i in range(12)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    summary = prepare(
        [tmp_path / "a.jsonl"], tmp_path / "out", val_fraction=0.25, shard_tokens=7, prefix="tiny"
    )
    train, val = summary.shards["train"], summary.shards["val"]
    assert names(train)[:2] == ["tiny_train_000001.bin", "tiny_train_000002.bin"]
    assert names(val)[0] == "tiny_val_000000.bin"
    for split in (train, val):
        sizes = [len(read_shard(p)) for p in split]
        assert all(size == 7 for size in sizes[:-1]) and 1 <= sizes[-1] <= 7
    assert sum(len(read_shard(p)) for p in train) == summary.tokens["train"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names(train) + names(val))


def test_output_is_byte_identical_across_runs_and_worker_counts(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        (corpus / f"{i:02d}.txt").write_text(" ".join(f"w{n}" for n in rng.integers(0, 999, size=50)))
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 1000)  # many chunks, so order really is at stake
    outputs = []
    for run, workers in enumerate([1, 2, 2]):
        out = tmp_path / f"out{run}"
        prepare([corpus], out, val_fraction=0.1, shard_tokens=500, workers=workers)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert "corpus_val_000000.bin" in outputs[0] and "corpus_train_000003.bin" in outputs[0]
    assert outputs[0] == outputs[1] == outputs[2]


def test_existing_shards_need_overwrite_which_removes_stale_ones(tmp_path):
    (tmp_path / "a.txt").write_text("some words " * 50)
    out = tmp_path / "out"
    prepare([tmp_path / "a.txt"], out, val_fraction=0, shard_tokens=10, workers=1)
    assert len(list(out.iterdir())) > 2
    with pytest.raises(PrepareError, match="already holds .* corpus_\\* shards; pass --overwrite"):
        prepare([tmp_path / "a.txt"], out, val_fraction=0, workers=1)
    prepare([tmp_path / "a.txt"], out, val_fraction=0, workers=1, overwrite=True)
    assert names(out.iterdir()) == ["corpus_train_000001.bin"]


def test_overwrite_with_a_bad_input_keeps_the_old_shards_as_they_were(tmp_path):
    # The bad line comes after good documents: found only while tokenizing, after shards were cut.
    (tmp_path / "a.txt").write_text("some words " * 50)
    out = tmp_path / "out"
    prepare([tmp_path / "a.txt"], out, val_fraction=0, shard_tokens=10, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine words here"}\n' * 40 + '{"text": "cut\n')
    with pytest.raises(PrepareError, match="not valid JSON"):
        prepare([bad], out, val_fraction=0, shard_tokens=10, workers=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok"', "not valid JSON"),
        ('["text"]', "expected a JSON object with a string field 'text'"),
        ('{"text": 5}', "expected a JSON object with a string field 'text'"),
        ('{"other": "x"}', "expected a JSON object with a string field 'text'"),
    ],
)
def test_bad_jsonl_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"text": "fine"}}\n\n{line}\n')
    with pytest.raises(PrepareError, match=f"^{path}:3: {message}"):
        prepare([path], tmp_path / "out", workers=1)


def test_input_errors_name_the_path(tmp_path):
    with pytest.raises(PrepareError, match=f"^{tmp_path}/missing.txt: no such file or directory"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match=f"^{tmp_path}/empty: no .txt files"):
        prepare([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(PrepareError, match=f"^{tmp_path}/latin1.txt: not UTF-8 text"):
        prepare([tmp_path / "latin1.txt"], tmp_path / "out", workers=1)


def test_a_single_document_cannot_fill_both_splits(tmp_path):
    (tmp_path / "a.txt").write_text("only one document")
    with pytest.raises(PrepareError, match="no document left for the train split \\(1 documents in all\\)"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.05, workers=1)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"prefix": "a/b"}, "--prefix 'a/b': expected letters"),
        ({"val_fraction": 1.0}, "--val-fraction 1.0: expected a fraction in \\[0, 1\\)"),
        ({"shard_tokens": 0}, "--shard-tokens 0: expected a positive token count"),
        ({"workers": -1}, "--workers -1: expected at least 1"),
    ],
)
def test_bad_options_name_the_flag(tmp_path, option, message):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(PrepareError, match=message):
        prepare([tmp_path / "a.txt"], tmp_path / "out", **option)


def test_command_reports_one_line_errors_without_traceback(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    result = subprocess.run(
        [sys.executable, "-m", "data.prepare", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")]
        + ["--workers", "2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"error: {tmp_path}/bad.jsonl:3: not valid JSON")
    assert "Traceback" not in result.stderr


def test_command_prints_progress_and_summary(tmp_path, capsys):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"document number {i}")
    prepare_module.main(
        [str(tmp_path), "--out", str(tmp_path / "out"), "--val-fraction", "0.5", "--workers", "1"]
    )
    captured = capsys.readouterr()
    tokens = {"train": 2 * 4, "val": 2 * 4}  # EOT + "document number i" (3 tokens) per document
    assert captured.out.splitlines() == [
        f"train: {tokens['train']:,} tokens in 1 shards",
        f"val: {tokens['val']:,} tokens in 1 shards",
        f"wrote {tmp_path / 'out'}",
    ]
    assert "4 documents" in captured.err and f"-> {sum(tokens.values())} tokens" in captured.err
