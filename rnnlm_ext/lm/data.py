"""Data: the Human Numbers generator, tiny-shakespeare by name, text corpora -> one token stream, vocabulary,
in-order batching.

Dimension letters: N tokens in a stream, B rows (the batch size), L tokens per row, T = bptt.
"""

from __future__ import annotations

import collections
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rnnlm_ext._files import atomic_write
from rnnlm_ext.lm.errors import SettingError

UNK = "<unk>"
EOS = "<eos>"  # separates documents (and, at word level, lines)

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 1 <= n <= 9999 as fastai's Human Numbers spells them: no hyphens, no 'and'."""
    if not 1 <= n <= 9999:
        raise ValueError(f"n must be in 1..9999, got {n}")
    words = []
    if n >= 1000:
        words += [_ONES[n // 1000], "thousand"]
        n %= 1000
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        n %= 10
    if n:
        words.append(_ONES[n])
    return " ".join(words)


def human_numbers() -> list[str]:
    """The 9,998 lines of fastai's Human Numbers (train.txt then valid.txt), stripped.

    fastai ships 1...7999 in train.txt and 8001...9999 in valid.txt (8000 is in neither).
    Fastbook joins them with ' . ' and splits on spaces: 63,095 tokens over 30 distinct words.
    """
    return [number_words(n) for n in [*range(1, 8000), *range(8001, 10000)]]


def human_numbers_tokens() -> list[str]:
    """Fastbook's token stream: the lines joined with ' . ', split on spaces."""
    return " . ".join(human_numbers()).split(" ")


# char-rnn's tiny-shakespeare (1,115,394 characters), where its author published it
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt"


def data_folder() -> str:
    """Where named data sets are kept: $RNNLM_EXT_DATA, else ~/.cache/rnnlm_ext."""
    return os.environ.get("RNNLM_EXT_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "rnnlm_ext")


def tiny_shakespeare() -> str:
    """The path of tiny-shakespeare in data_folder(), downloaded there from char-rnn once if it is
    missing. A copy whose SHA-256 is not the published file's is refused, downloaded or not."""
    folder = data_folder()
    path = os.path.join(folder, TINY_SHAKESPEARE_FILE)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != TINY_SHAKESPEARE_SHA256:
            raise SettingError(
                f"dataset: {path!r} is not char-rnn's tiny-shakespeare (SHA-256 {digest}, expected "
                f"{TINY_SHAKESPEARE_SHA256}): delete it to download it again, or point RNNLM_EXT_DATA at a folder "
                f"that holds the right {TINY_SHAKESPEARE_FILE}",
                "dataset",
            )
        return path
    import urllib.request  # only here: importing the data module stays light

    print(f"downloading tiny-shakespeare from {TINY_SHAKESPEARE_URL} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=60) as response:
            raw = response.read()
    except OSError as err:  # URLError and timeouts are OSErrors
        raise SettingError(
            f"dataset: tiny-shakespeare is not in {folder!r} and could not be downloaded from "
            f"{TINY_SHAKESPEARE_URL} ({err}); put that file there as {TINY_SHAKESPEARE_FILE}, or point "
            "RNNLM_EXT_DATA at a folder that holds it",
            "dataset",
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise SettingError(
            f"dataset: the file downloaded from {TINY_SHAKESPEARE_URL} is not char-rnn's tiny-shakespeare "
            f"(SHA-256 {digest}, expected {TINY_SHAKESPEARE_SHA256}); it was not kept",
            "dataset",
        )
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write(path, lambda f: f.write(raw))
    except OSError as err:
        raise SettingError(
            f"dataset: cannot keep tiny-shakespeare in {folder!r} ({err.strerror}); point "
            "RNNLM_EXT_DATA at a folder that can take it",
            "dataset",
        ) from None
    return path


def tokenize(text: str, level: str) -> list[str]:
    """One document -> tokens. word: whitespace-split, each line ended by EOS. char: its characters."""
    if level == "char":
        return list(text)
    if level == "word":
        tokens: list[str] = []
        for line in text.splitlines():
            tokens += line.split() + [EOS]
        return tokens
    raise ValueError(f"level must be 'word' or 'char', got {level!r}")


def _read_documents(path: str) -> list[str]:
    """A file -> one document; a folder -> its .txt files (recursively, sorted), one document each."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(".txt"))
        if not files:
            raise SettingError(f"dataset: folder {path!r} holds no .txt files", "dataset")
    else:
        raise FileNotFoundError(f"dataset: no such file or folder: {path!r}")
    docs = []
    for f in files:
        try:
            with open(f, encoding="utf-8-sig") as fh:  # -sig: a leading byte-order mark is not text
                docs.append(fh.read())
        except UnicodeDecodeError as err:
            raise SettingError(f"dataset: {f!r} is not UTF-8 text ({err})", "dataset") from None
    return docs


def text_tokens(path: str, level: str) -> list[str]:
    """A file or a folder of .txt files -> one token stream, documents separated by EOS."""
    stream: list[str] = []
    for i, doc in enumerate(_read_documents(path)):
        tokens = tokenize(doc, level)
        # word level ends every line with EOS already; char level needs the separator added
        if i and level == "char":
            stream.append(EOS)
        stream += tokens
    if not stream:
        raise SettingError(f"dataset: corpus {path!r} is empty (no tokens at {level} level)", "dataset")
    return stream


class Vocab:
    """Token <-> id. Ids follow first appearance (fastbook's order); the optional UNK is id 0.

    Tokens seen fewer than min_freq times, or beyond the max_size most frequent, map to UNK.
    Without UNK (closed vocabularies like Human Numbers) every token is kept and unknown tokens
    are an error.
    """

    def __init__(self, itos: Sequence[str], unk: bool):
        self.itos = list(itos)
        self.unk = unk
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @classmethod
    def build(cls, tokens: Sequence[str], min_freq: int = 1, max_size: int | None = None, unk: bool = True) -> Vocab:
        if min_freq < 1:
            raise SettingError(f"min_freq must be >= 1, got {min_freq}", "min_freq")
        counts = collections.Counter(tokens)
        # Counter keeps first-appearance order; a literal UNK in the text (PTB and WikiText
        # have one) is the unknown token, not a word competing for one of the max_size places
        kept = [t for t in counts if counts[t] >= min_freq and t != UNK]
        if max_size is not None:
            if max_size < 1:
                raise SettingError(f"max_size must be >= 1, got {max_size}", "max_size")
            top = set(sorted(kept, key=lambda t: -counts[t])[:max_size])  # stable: ties by appearance
            kept = [t for t in kept if t in top]
        if not unk and len(kept) < len(counts):
            raise ValueError("a vocabulary without an unknown token must keep every token")
        return cls(([UNK] if unk else []) + kept, unk)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> Tensor:
        """tokens -> ids [N] (int64)."""
        if self.unk:
            return torch.tensor([self.stoi.get(t, 0) for t in tokens], dtype=torch.long)
        missing = [t for t in tokens if t not in self.stoi]
        if missing:
            raise KeyError(f"token {missing[0]!r} is not in the vocabulary")
        return torch.tensor([self.stoi[t] for t in tokens], dtype=torch.long)

    def decode(self, ids) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def state_dict(self) -> dict:
        return {"itos": self.itos, "unk": self.unk}

    @classmethod
    def from_state_dict(cls, state: dict) -> Vocab:
        return cls(state["itos"], state["unk"])


@dataclass
class Corpus:
    """A tokenised data set: the vocabulary, the train and valid id streams and the tokenisation level."""

    vocab: Vocab
    train: Tensor  # [N_train] int64
    valid: Tensor  # [N_valid] int64
    level: str


def split_stream(ids: Tensor, valid_pct: float = 0.2) -> tuple[Tensor, Tensor]:
    """Fastbook's split: the first (1 - valid_pct) of the stream trains, the rest validates."""
    cut = int(len(ids) * (1 - valid_pct))
    return ids[:cut], ids[cut:]


def _own_split(path: str) -> tuple[str, str] | None:
    """A folder with train and valid parts (train.txt/valid.txt or train/ and valid/) has its own split."""
    if not os.path.isdir(path):
        return None
    for train, valid in (("train.txt", "valid.txt"), ("train", "valid")):
        t, v = os.path.join(path, train), os.path.join(path, valid)
        if os.path.exists(t) and os.path.exists(v):
            return t, v
    return None


def load_corpus(
    dataset: str = "human-numbers",
    level: str = "word",
    min_freq: int = 1,
    max_size: int | None = None,
    vocab: Vocab | None = None,
    valid_pct: float = 0.2,
) -> Corpus:
    """'human-numbers', 'tiny-shakespeare' (tiny_shakespeare()) or a path -> Corpus. A given vocab (from a
    checkpoint) is reused as is."""
    if dataset == "tiny-shakespeare":
        dataset = tiny_shakespeare()
    elif dataset == "human-numbers":
        if level != "word":
            raise SettingError("level: human-numbers is word level", "level")
        tokens = human_numbers_tokens()
        vocab = vocab or Vocab.build(tokens, unk=False)
        return Corpus(vocab, *split_stream(vocab.encode(tokens), valid_pct), level)
    own = _own_split(dataset)
    if own:
        train_tokens, valid_tokens = text_tokens(own[0], level), text_tokens(own[1], level)
        vocab = vocab or Vocab.build(train_tokens, min_freq, max_size)
        return Corpus(vocab, vocab.encode(train_tokens), vocab.encode(valid_tokens), level)
    tokens = text_tokens(dataset, level)
    train_tokens = tokens[: int(len(tokens) * (1 - valid_pct))]
    vocab = vocab or Vocab.build(train_tokens, min_freq, max_size)  # valid words unseen in train -> UNK
    return Corpus(vocab, *split_stream(vocab.encode(tokens), valid_pct), level)


def batchify(ids: Tensor, bs: int, name: str = "stream") -> Tensor:
    """Cut a stream [N] into bs contiguous rows [B, L], L = N // bs; the N % bs tail tokens are trimmed.

    Row j is ids[j*L:(j+1)*L], so reading a row left to right reads the stream in order.
    """
    if bs < 1:
        raise SettingError(f"bs must be >= 1, got {bs}", "bs")
    L = len(ids) // bs
    if L < 2:
        raise SettingError(
            f"bs {bs} is too large for the {name} stream of {len(ids)} tokens: each row needs at "
            f"least 2 tokens (an input and its target), so bs must be <= {len(ids) // 2}",
            "bs",
        )
    return ids[: bs * L].view(bs, L)


def num_batches(rows: Tensor, bptt: int, drop_last: bool = False) -> int:
    """How many batches batches() yields for rows [B, L]."""
    n = rows.shape[1] - 1  # the last token of a row is only ever a target
    return n // bptt if drop_last else -(-n // bptt)


def batches(rows: Tensor, bptt: int, start: int = 0, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """In-order batches (x, y), each [B, T]: batch k is columns k*bptt.. of every row, y = x shifted by one.

    Row j of batch k+1 continues row j of batch k, so a model may carry its hidden state across.
    The last batch is shorter (T < bptt) when L - 1 is not a multiple of bptt; drop_last=True
    drops it instead (for models that only take exactly bptt tokens). start skips that many batches.
    """
    if bptt < 1:
        raise SettingError(f"bptt must be >= 1, got {bptt}", "bptt")
    for k in range(start, num_batches(rows, bptt, drop_last)):
        i = k * bptt
        T = min(bptt, rows.shape[1] - 1 - i)
        yield rows[:, i : i + T], rows[:, i + 1 : i + 1 + T]
