"""The FineWeb download command, against a local stand-in for the Hub."""

import os
import subprocess
import sys

import numpy as np
import pytest

from data import fineweb
from data.fineweb import DownloadError, download_shards, shard_names
from data.shards import ShardError, read_shard, write_shard


class FakeHub:
    """Records requests and writes a small valid shard (or a broken file) where the Hub client would.

    Like huggingface_hub with local_dir, it keeps a file already in place rather than fetching it again.
    """

    def __init__(self, broken=False):
        self.calls = []
        self.broken = broken

    def __call__(self, repo_id, filename, directory):
        self.calls.append((repo_id, filename))
        path = directory / filename
        if path.exists():
            return str(path)
        if self.broken:
            path.write_bytes(b"<html>rate limited</html>")
        else:
            write_shard(path, np.full(len(self.calls), len(self.calls)))
        return str(path)


def quiet(line):
    pass


def test_default_fetches_val_and_nine_train_shards_of_fineweb10b(tmp_path, monkeypatch):
    monkeypatch.setattr(fineweb, "DATA_DIR", tmp_path)
    hub = FakeHub()
    paths = download_shards(download=hub, log=quiet)
    expected = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, 10)]
    assert hub.calls == [("kjj0/fineweb10B-gpt2", name) for name in expected]
    assert paths == [tmp_path / "fineweb10B" / name for name in expected]
    assert [read_shard(p).tolist() for p in paths[:2]] == [[1], [2, 2]]


def test_edu_dataset_uses_its_repository_and_file_prefix(tmp_path):
    hub = FakeHub()
    download_shards("finewebedu10B", 2, tmp_path, download=hub, log=quiet)
    assert hub.calls == [
        ("kjj0/finewebedu10B-gpt2", "finewebedu_val_000000.bin"),
        ("kjj0/finewebedu10B-gpt2", "finewebedu_train_000001.bin"),
        ("kjj0/finewebedu10B-gpt2", "finewebedu_train_000002.bin"),
    ]
    assert shard_names("fineweb100B", 1) == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]


def test_complete_files_are_skipped_and_broken_ones_fetched_again(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [7, 7, 7])
    broken = write_shard(tmp_path / "fineweb_train_000002.bin", [1, 2, 3])
    broken.write_bytes(broken.read_bytes()[:-1])
    hub, lines = FakeHub(), []
    download_shards("fineweb10B", 3, tmp_path, download=hub, log=lines.append)
    assert hub.calls == [
        ("kjj0/fineweb10B-gpt2", "fineweb_train_000001.bin"),
        ("kjj0/fineweb10B-gpt2", "fineweb_train_000002.bin"),
        ("kjj0/fineweb10B-gpt2", "fineweb_train_000003.bin"),
    ]
    assert read_shard(tmp_path / "fineweb_val_000000.bin").tolist() == [7, 7, 7]
    assert read_shard(broken).tolist() == [2, 2]
    assert lines[0] == f"[1/4] {tmp_path}/fineweb_val_000000.bin: complete, skipped"
    assert lines[1] == f"[2/4] {tmp_path}/fineweb_train_000001.bin: downloading from kjj0/fineweb10B-gpt2"


def test_downloaded_file_is_verified(tmp_path):
    with pytest.raises(
        ShardError, match=f"^{tmp_path}/fineweb_val_000000.bin: truncated: expected a 1024-byte header"
    ):
        download_shards("fineweb10B", 1, tmp_path, download=FakeHub(broken=True), log=quiet)


def test_too_many_train_shards_names_the_flag(tmp_path):
    with pytest.raises(DownloadError, match="--train-shards 104: fineweb10B has 103 train shards"):
        download_shards("fineweb10B", 104, tmp_path, download=FakeHub())


def test_network_error_is_one_line_and_exit_status_1(tmp_path, monkeypatch):
    def offline(repo_id, filename, directory):
        raise ConnectionError("Failed to resolve 'huggingface.co'. Retried 5 times\nMax retries exceeded")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(fineweb, "hf_download", offline)
    with pytest.raises(SystemExit) as exited:
        fineweb.main(["--train-shards", "1", "--dir", str(tmp_path)])
    # SystemExit with a message: Python prints it on stderr and exits with status 1.
    assert exited.value.code == (
        "error: could not download fineweb_val_000000.bin from the Hugging Face dataset kjj0/fineweb10B-gpt2 "
        "(ConnectionError: Failed to resolve 'huggingface.co'); check the internet connection "
        "(and HF_ENDPOINT / HF_TOKEN if set) and re-run (complete files are kept)"
    )


def test_real_hub_client_offline_gives_one_line_without_traceback(tmp_path):
    # HF_HUB_OFFLINE makes huggingface_hub fail at once without touching the network.
    result = subprocess.run(
        [sys.executable, "-m", "data.fineweb", "--train-shards", "1", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: could not download fineweb_val_000000.bin from the Hugging Face dataset kjj0/fineweb10B-gpt2 "
        "(LocalEntryNotFoundError: An error happened while trying to locate the file on the Hub and we "
        "cannot find the requested files in the local cache); unset HF_HUB_OFFLINE (it forbids downloads) "
        "and re-run (complete files are kept)"
    ]


def test_command_reports_each_file_and_the_total(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fineweb, "hf_download", FakeHub())
    fineweb.main(["--train-shards", "2", "--dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"[1/3] {tmp_path}/fineweb_val_000000.bin: downloading from kjj0/fineweb10B-gpt2"
    assert lines[-1] == f"3 shards (6 tokens) in {tmp_path}"  # the stand-in writes 1, 2 and 3 tokens
