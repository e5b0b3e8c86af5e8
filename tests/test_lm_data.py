"""rnnlm_ext.lm.data: Human Numbers exactly as fastai ships it, text corpora, vocabulary, in-order batching."""

import pytest
import torch

from rnnlm_ext.lm import data


def test_human_numbers_counts_and_spot_values():
    lines = data.human_numbers()
    assert len(lines) == 9998
    assert lines[:3] == ["one", "two", "three"]
    assert lines[20] == "twenty one"
    assert lines[100] == "one hundred one"
    assert lines[7998] == "seven thousand nine hundred ninety nine"
    assert lines[7999] == "eight thousand one"  # 8000 is in neither of fastai's files
    assert lines[-1] == "nine thousand nine hundred ninety nine"
    assert not any("-" in line or " and " in line for line in lines)
    tokens = data.human_numbers_tokens()
    assert len(tokens) == 63095
    assert tokens[:7] == ["one", ".", "two", ".", "three", ".", "four"]


def test_human_numbers_vocab_in_fastbook_order():
    corpus = data.load_corpus("human-numbers")
    assert len(corpus.vocab) == 30
    assert corpus.vocab.itos[:4] == ["one", ".", "two", "three"]
    assert set(corpus.vocab.itos[-3:]) <= {"ninety", "hundred", "thousand"}
    assert len(corpus.train) == int(63095 * 0.8) and len(corpus.train) + len(corpus.valid) == 63095
    assert corpus.vocab.decode(corpus.train[:3]) == ["one", ".", "two"]


def test_vocab_min_freq_max_size_and_unk():
    tokens = "a a a b b c d d d d".split()
    v = data.Vocab.build(tokens, min_freq=2)
    assert v.itos == [data.UNK, "a", "b", "d"]
    assert v.encode(["c", "d", "zzz"]).tolist() == [0, 3, 0]
    v = data.Vocab.build(tokens, max_size=2)
    assert v.itos == [data.UNK, "a", "d"]
    # a literal <unk> in the text is the unknown token, not one of the max_size words
    assert data.Vocab.build(tokens + [data.UNK] * 5, max_size=2).itos == [data.UNK, "a", "d"]
    closed = data.Vocab.build(tokens, unk=False)
    with pytest.raises(KeyError, match="'zzz'"):
        closed.encode(["zzz"])
    assert data.Vocab.from_state_dict(v.state_dict()).itos == v.itos


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhi there\n".encode("utf-8"))
    assert data.text_tokens(str(tmp_path / "bom.txt"), "word")[0] == "hi"
    assert data.text_tokens(str(tmp_path / "bom.txt"), "char")[0] == "h"


def test_text_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("the cat\nsat\n")
    (tmp_path / "b.txt").write_text("a dog\n")
    (tmp_path / "skip.md").write_text("not read\n")
    assert data.text_tokens(str(tmp_path), "word") == ["the", "cat", data.EOS, "sat", data.EOS, "a", "dog", data.EOS]
    assert data.text_tokens(str(tmp_path / "b.txt"), "char") == list("a dog\n")
    assert data.text_tokens(str(tmp_path), "char") == list("the cat\nsat\n") + [data.EOS] + list("a dog\n")
    corpus = data.load_corpus(str(tmp_path / "a.txt"), "char")
    assert corpus.vocab.itos[0] == data.UNK and len(corpus.train) + len(corpus.valid) == len("the cat\nsat\n")


def test_folder_with_its_own_split(tmp_path):
    (tmp_path / "train.txt").write_text("x y x y\n")
    (tmp_path / "valid.txt").write_text("y z\n")
    corpus = data.load_corpus(str(tmp_path), "word")
    assert corpus.vocab.decode(corpus.train) == ["x", "y", "x", "y", data.EOS]
    assert corpus.vocab.decode(corpus.valid) == ["y", data.UNK, data.EOS]  # z is not in the train vocabulary


def test_bad_data_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="^dataset: no such file"):
        data.load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.SettingError, match="^dataset: .*empty"):
        data.load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "no_text").mkdir()
    with pytest.raises(data.SettingError, match="^dataset: .*no .txt"):
        data.load_corpus(str(tmp_path / "no_text"))
    with pytest.raises(data.SettingError, match="^bs 6 is too large"):
        data.batchify(torch.arange(10), 6)
    with pytest.raises(data.SettingError, match="^bptt must be >= 1"):
        next(data.batches(torch.zeros(2, 5, dtype=torch.long), 0))
    with pytest.raises(data.SettingError, match="^level: human-numbers is word level"):
        data.load_corpus("human-numbers", "char")


@pytest.mark.parametrize("n,bs,bptt", [(103, 4, 5), (100, 3, 7), (64, 8, 1), (50, 5, 9)])
def test_batches_read_each_row_contiguously(n, bs, bptt):
    stream = torch.arange(n)
    rows = data.batchify(stream, bs)
    L = n // bs
    assert rows.shape == (bs, L)
    got = list(data.batches(rows, bptt))
    assert len(got) == data.num_batches(rows, bptt) == -(-(L - 1) // bptt)
    for j in range(bs):
        xs = torch.cat([x[j] for x, _ in got])
        ys = torch.cat([y[j] for _, y in got])
        # row j is one contiguous slice of the stream: nothing lost or repeated but the trimmed tail
        assert torch.equal(xs, stream[j * L : (j + 1) * L - 1])
        assert torch.equal(ys, stream[j * L + 1 : (j + 1) * L])
    assert got[-1][0].shape[1] == (L - 1) - (len(got) - 1) * bptt  # the last batch is kept, shorter
    assert all(x.shape == y.shape for x, y in got)


def test_batches_drop_last_and_start():
    rows = data.batchify(torch.arange(40), 2)  # L = 20: 19 inputs per row
    assert [x.shape[1] for x, _ in data.batches(rows, 5)] == [5, 5, 5, 4]
    assert [x.shape[1] for x, _ in data.batches(rows, 5, drop_last=True)] == [5, 5, 5]
    x2, _ = next(data.batches(rows, 5, start=2))
    assert x2[0].tolist() == list(range(10, 15))
