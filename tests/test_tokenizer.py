"""The GPT-2 tokenizer as the shards use it: real r50k_base ids, EOT before every document."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import tiktoken
import tiktoken.load
import tiktoken.registry

from data.tokenizer import EOT, VOCAB_SIZE, TokenizerUnavailable, encode_documents, gpt2_encoding


def test_encoding_is_gpt2_and_the_constants_are_its_own():
    encoding = gpt2_encoding()
    assert encoding.name == "r50k_base"
    assert encoding.n_vocab == VOCAB_SIZE == 50257
    assert encoding.eot_token == EOT == 50256


def test_the_constants_and_the_shard_format_load_without_tiktoken():
    # Machines that only train (no tokenizing) may lack tiktoken; the constants must not need it.
    code = "import sys, data.shards, data.tokenizer; print('tiktoken' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_every_document_is_preceded_by_eot():
    tokens = encode_documents(["Hello world", "a"])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [EOT, 15496, 995, EOT, 64]  # GPT-2's ids for "Hello", " world", "a"


def test_empty_documents_are_a_lone_eot():
    assert encode_documents(["", "a", ""]).tolist() == [EOT, EOT, 64, EOT]
    assert encode_documents([]).tolist() == []


def test_special_token_text_is_encoded_as_ordinary_text():
    tokens = encode_documents(["<|endoftext|>"]).tolist()
    assert tokens[0] == EOT
    assert EOT not in tokens[1:]
    assert gpt2_encoding().decode(tokens[1:]) == "<|endoftext|>"


def test_unicode_round_trips_with_exact_token_counts():
    texts = ["naïve café — 世界 🙂\n", "Ελληνικά\tтекст", "\x00 control \u200b"]
    tokens = encode_documents(texts)
    encoding = gpt2_encoding()
    assert len(tokens) == sum(len(encoding.encode_ordinary(t)) for t in texts) + len(texts)
    starts = np.flatnonzero(tokens == EOT).tolist()
    assert starts == [0, *np.cumsum([1 + len(encoding.encode_ordinary(t)) for t in texts[:-1]]).tolist()]
    ends = [*starts[1:], len(tokens)]
    assert [encoding.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, ends, strict=True)] == texts


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """tiktoken with an empty cache and no network."""

    def no_network(url):
        raise requests.ConnectionError(f"Failed to resolve host for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    gpt2_encoding.cache_clear()
    yield
    gpt2_encoding.cache_clear()


def test_missing_vocabulary_says_how_to_fix_it(offline):
    with pytest.raises(TokenizerUnavailable) as caught:
        gpt2_encoding()
    message = str(caught.value)
    assert message.startswith("could not load the GPT-2 vocabulary (tiktoken 'r50k_base': ConnectionError)")
    assert "connect to the internet once" in message
    assert "set TIKTOKEN_CACHE_DIR to a folder holding the r50k_base file" in message
    assert "\n" not in message
    assert isinstance(caught.value, RuntimeError)
