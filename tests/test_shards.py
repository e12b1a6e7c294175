"""The .bin shard format: exact bytes, validation of every bad case, atomic writes, the check CLI."""

import os

import numpy as np
import pytest

from data import shards
from data.shards import HEADER_BYTES, MAGIC, ShardError, check_shard, list_shards, read_shard, write_shard


def header_ints(path):
    return np.fromfile(path, dtype="<i4", count=256)


def test_write_shard_lays_out_header_and_little_endian_body(tmp_path):
    path = write_shard(tmp_path / "a.bin", [0, 1, 50256, 65535])
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 4
    assert header_ints(path)[:3].tolist() == [20240520, 1, 4]
    assert not header_ints(path)[3:].any()
    assert raw[1024:] == bytes([0, 0, 1, 0, 0x50, 0xC4, 0xFF, 0xFF])


def test_read_shard_round_trips_tokens(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1000)
    write_shard(tmp_path / "a.bin", tokens)
    read = read_shard(tmp_path / "a.bin")
    assert read.dtype == np.uint16
    assert np.array_equal(read, tokens)


def test_empty_shard_round_trips(tmp_path):
    write_shard(tmp_path / "a.bin", np.array([], dtype=np.int64))
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES
    assert len(read_shard(tmp_path / "a.bin")) == 0


@pytest.mark.parametrize("bad", [[1, 65536], [-1, 5]])
def test_write_shard_refuses_ids_outside_uint16(tmp_path, bad):
    with pytest.raises(ShardError, match="0..65535"):
        write_shard(tmp_path / "a.bin", bad)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_old_shard_and_no_temp_file(tmp_path, monkeypatch):
    path = write_shard(tmp_path / "a.bin", [1, 2, 3])

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_shard(path, np.arange(100))
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    assert read_shard(path).tolist() == [1, 2, 3]


def test_failed_first_write_leaves_no_file(tmp_path, monkeypatch):
    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        write_shard(tmp_path / "a.bin", [1, 2, 3])
    assert list(tmp_path.iterdir()) == []


def corrupt(path, ints=None, size=None):
    """Overwrite header ints {index: value} and/or resize the file."""
    raw = bytearray(path.read_bytes())
    for index, value in (ints or {}).items():
        raw[4 * index : 4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    if size is not None:
        raw = raw[:size] + bytes(max(0, size - len(raw)))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"ints": {0: 12345}}, "bad magic: expected 20240520, found 12345"),
        ({"ints": {1: 2}}, "bad version: expected 1, found 2"),
        ({"size": 1024 + 2 * 9}, "truncated: header says 10 tokens, so expected 1044 bytes, found 1042"),
        ({"size": 1024 + 2 * 11}, "too long: header says 10 tokens, so expected 1044 bytes, found 1046"),
        ({"size": 500}, "truncated: expected a 1024-byte header, found 500 bytes"),
    ],
)
def test_read_shard_names_file_and_expected_vs_found(tmp_path, damage, message):
    path = write_shard(tmp_path / "bad.bin", np.arange(10))
    corrupt(path, **damage)
    with pytest.raises(ShardError) as caught:
        read_shard(path)
    text = str(caught.value)
    assert message in text
    assert text.startswith(str(path))
    assert "\n" not in text


def test_check_shard_flags_ids_at_or_above_vocab(tmp_path):
    path = write_shard(tmp_path / "a.bin", [5, 50256, 50257, 60000])
    with pytest.raises(ShardError) as caught:
        check_shard(path)
    assert str(caught.value) == (f"{path}: token id 60000 is outside the vocabulary of 50257 (expected ids "
                                 f"0..50256; 2 outside, the first at position 2); re-create or "
                                 f"re-download it")
    assert check_shard(path, vocab_size=60001) == 4


def test_list_shards_sorts_and_filters_by_split(tmp_path):
    for name in ["x_train_000002.bin", "x_val_000000.bin", "x_train_000001.bin", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path, "train")] == ["x_train_000001.bin", "x_train_000002.bin"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["x_val_000000.bin"]
    assert [p.name for p in list_shards(tmp_path / "x_*.bin", "train")] == [
        "x_train_000001.bin",
        "x_train_000002.bin",
    ]


def test_list_shards_names_the_directory_when_none(tmp_path):
    with pytest.raises(ShardError, match=f"^{tmp_path}: no train shards .*\\*_train_\\*.bin"):
        list_shards(tmp_path, "train")


def test_count_tokens_sums_headers(tmp_path):
    files = [write_shard(tmp_path / f"{i}.bin", np.arange(n)) for i, n in enumerate([3, 0, 7])]
    assert shards.count_tokens(files) == 10


def run_check(capsys, *paths):
    with pytest.raises(SystemExit) as exited:
        shards.main(["check", *map(str, paths)])
    return exited.value.code, capsys.readouterr().out.splitlines()


def test_check_command_lists_token_counts(tmp_path, capsys):
    write_shard(tmp_path / "a_train_000001.bin", np.arange(1234))
    write_shard(tmp_path / "a_val_000000.bin", np.arange(10))
    code, lines = run_check(capsys, tmp_path)
    assert code == 0
    assert lines == [
        f"ok  {tmp_path}/a_train_000001.bin: 1,234 tokens",
        f"ok  {tmp_path}/a_val_000000.bin: 10 tokens",
        "2 good shards (1,244 tokens), 0 bad",
    ]


def test_check_command_reports_each_bad_shard_on_one_line(tmp_path, capsys):
    good = write_shard(tmp_path / "good.bin", np.arange(10))
    magic = write_shard(tmp_path / "magic.bin", np.arange(10))
    corrupt(magic, ints={0: 7})
    short = write_shard(tmp_path / "short.bin", np.arange(10))
    corrupt(short, size=1030)
    vocab = write_shard(tmp_path / "vocab.bin", [50300])
    empty = tmp_path / "empty"
    empty.mkdir()
    code, lines = run_check(capsys, good, magic, short, vocab, empty, tmp_path / "missing.bin")
    assert code == 1
    assert lines[0] == f"ok  {good}: 10 tokens"
    assert lines[1].startswith(f"BAD {magic}: bad magic: expected {MAGIC}, found 7")
    assert lines[2].startswith(f"BAD {short}: truncated")
    assert lines[3].startswith(f"BAD {vocab}: token id 50300 is outside the vocabulary of 50257")
    assert lines[4].startswith(f"BAD {empty}: empty: expected .bin shards")
    assert lines[5].startswith(f"BAD {tmp_path}/missing.bin: cannot read shard")
    assert lines[6] == "1 good shards (10 tokens), 5 bad"
    assert len(lines) == 7
