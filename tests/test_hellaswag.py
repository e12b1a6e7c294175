"""tools.hellaswag: ending scores, acc vs acc_norm on examples whose answers are known, file handling."""

import json
import math
import urllib.error
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from data.tokenizer import EOT, gpt2_encoding
from tools import hellaswag
from tools.hellaswag import evaluate_hellaswag, score_endings

VOCAB = 50304
BOOST = 10.0


class Unigram(torch.nn.Module):
    """Predicts the same next-token distribution everywhere: logit BOOST for `favoured` ids, 0 elsewhere."""

    def __init__(self, favoured: list[int]):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=64)
        logits = torch.zeros(VOCAB)
        logits[favoured] = BOOST
        self.register_buffer("logits", logits)

    def forward(self, idx):
        return self.logits.expand(*idx.shape, VOCAB)


def word_ids(*words: str) -> list[int]:
    ids = [gpt2_encoding().encode_ordinary(word) for word in words]
    assert all(len(i) == 1 for i in ids), ids  # the examples below rely on one token per word
    return [i[0] for i in ids]


@pytest.fixture(scope="module")
def unigram():
    cat, sat = word_ids(" cat", " sat")
    return Unigram([cat, sat])


def test_scores_are_sums_of_unigram_log_probabilities(unigram):
    # with 2 favoured ids: log p(favoured) = BOOST - log Z, log p(other) = -log Z
    log_z = math.log(VOCAB - 2 + 2 * math.exp(BOOST))
    good, bad = BOOST - log_z, -log_z
    example = {"ctx": "A cat", "endings": ["cat sat", "dog", "cat dog", "dog dog"]}
    context, endings = hellaswag.tokenize(example)
    sums, counts = score_endings(unigram, context, endings, "cpu")
    assert counts.tolist() == [2, 1, 2, 2]
    expected = [2 * good, bad, good + bad, 2 * bad]
    assert sums.tolist() == pytest.approx(expected, abs=1e-4)  # float32 log-softmax over 50304 ids


def test_acc_takes_the_largest_sum_and_acc_norm_the_largest_mean(unigram):
    # log p: " cat"/" sat" -1.46, anything else -11.46 (see above). Sums favour few tokens, means good
    # ones: (sum, mean) "cat sat cat dog" (-15.8, -3.96), "dog" (-11.5, -11.5), "cat dog" (-12.9, -6.5),
    # "dog dog" (-22.9, -11.5)
    long_good, short_bad, mixed, bad_bad = "cat sat cat dog", "dog", "cat dog", "dog dog"
    examples = [
        {"ctx": "One", "endings": [long_good, short_bad, mixed, bad_bad], "label": 0},  # acc no, norm yes
        {"ctx": "Two", "endings": [mixed, long_good, bad_bad, short_bad], "label": 1},  # acc no, norm yes
        {"ctx": "Three", "endings": [long_good, mixed, short_bad, bad_bad], "label": 2},  # acc yes, norm no
        {"ctx": "Four", "endings": [short_bad, "cat sat", bad_bad, "sat dog"], "label": 1},  # both yes
        {"ctx": "Five", "endings": [short_bad, "cat sat", bad_bad, "sat dog"], "label": 3},  # both no
    ]
    result = evaluate_hellaswag(unigram, examples, "cpu")
    assert result == {"n": 5, "acc": 2 / 5, "acc_norm": 3 / 5}


@pytest.mark.parametrize("context_words", [3, 80])  # 80: longer than max_seq_len 64, cropped from the left
def test_batched_scores_equal_scoring_each_ending_alone(tiny_checkpoint, context_words):
    _, model = tiny_checkpoint
    context = [EOT, *gpt2_encoding().encode_ordinary(" word" * context_words)]
    endings = [gpt2_encoding().encode_ordinary(text) for text in (" a", " the end of it", " so")]
    sums, counts = score_endings(model, context, endings, "cpu")
    for i, ending in enumerate(endings):
        row = torch.tensor([(context + ending)[-64:]])
        logprobs = F.log_softmax(model(row)[0, -len(ending) - 1:-1].float(), dim=-1)
        alone = logprobs.gather(-1, torch.tensor(ending)[:, None]).sum()
        assert counts[i] == len(ending)
        assert sums[i].item() == pytest.approx(alone.item(), abs=1e-4)  # float32; padding changes nothing


def test_command_reports_accuracy_of_the_first_n_examples(tiny_checkpoint, tmp_path, capsys):
    directory, model = tiny_checkpoint
    examples = [{"ctx": f"Example {i} is", "endings": ["good", "bad", "fine", "odd"], "label": i % 4,
                 "activity_label": "extra fields are ignored"} for i in range(3)]
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    hellaswag.main([str(directory), "--file", str(path), "--limit", "2", "--device", "cpu"])
    expected = evaluate_hellaswag(model, list(hellaswag.read_examples(path))[:2], "cpu")
    assert capsys.readouterr().out == (f"hellaswag {path}: 2 examples, acc {expected['acc']:.4f}, "
                                       f"acc_norm {expected['acc_norm']:.4f}\n")


def test_garbage_checkpoint_is_a_one_line_error(tmp_path):
    step = tmp_path / "step_000001"
    step.mkdir()
    (step / "shared.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as error:
        hellaswag.main([str(step), "--device", "cpu"])
    message = str(error.value)
    assert message.startswith(f"error: {step / 'shared.pt'}: cannot be read (") and "\n" not in message


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ctx": "a", "endings": ["b"] * 4, "label": 0}) + "\n{\"ctx\": 1}\n")
    with pytest.raises(ValueError, match=f"{path}:2: not a HellaSwag example"):
        list(hellaswag.read_examples(path))


def test_offline_download_is_a_one_line_error(tmp_path, monkeypatch):
    def offline(url, filename):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(hellaswag.urllib.request, "urlretrieve", offline)
    with pytest.raises(SystemExit) as error:
        hellaswag.validation_file(tmp_path / "cache")
    message = str(error.value)
    assert message == (f"error: could not download {hellaswag.URL} (no route to host); pass --file PATH to a "
                       f"local hellaswag_val.jsonl")
    assert not list((tmp_path / "cache").iterdir())  # nothing partial left behind


def test_download_happens_once(tmp_path, monkeypatch):
    calls = []

    def fake(url, filename):
        calls.append(url)
        with open(filename, "w") as f:
            f.write("{}\n")

    monkeypatch.setattr(hellaswag.urllib.request, "urlretrieve", fake)
    first = hellaswag.validation_file(tmp_path)
    assert hellaswag.validation_file(tmp_path) == first == tmp_path / "hellaswag_val.jsonl"
    assert calls == [hellaswag.URL] and first.read_text() == "{}\n"
