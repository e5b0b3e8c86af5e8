"""tiny-shakespeare by name: a cached copy is used, a missing one downloaded once and checked; never the network here.

The tests use the local copy in ../shared/data (char-rnn's input.txt) through RNNLM_EXT_DATA; the
download path is served those bytes by a fake urlopen.
"""

import hashlib
import io
import os
import shutil
import urllib.error
import urllib.request

import pytest
from helpers import ROOT

from rnnlm_ext.lm import data
from rnnlm_ext.lm.cli import main
from rnnlm_ext.lm.errors import SettingError

SHARED = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
needs_copy = pytest.mark.skipif(
    not os.path.isfile(SHARED), reason="no local copy of tiny-shakespeare in ../shared/data"
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("a test used the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty data folder, named by RNNLM_EXT_DATA."""
    monkeypatch.setenv("RNNLM_EXT_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def serve(monkeypatch, body: bytes) -> list:
    """urlopen answers every request with body; returns the list of the URLs asked for."""
    asked = []

    def urlopen(url, timeout=None):
        asked.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


@needs_copy
def test_the_local_copy_is_char_rnns_file_and_the_expected_digest_is_its():
    raw = open(SHARED, "rb").read()
    assert len(raw) == 1115394  # char-rnn's input.txt
    assert raw.startswith(b"First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n")
    assert hashlib.sha256(raw).hexdigest() == data.TINY_SHAKESPEARE_SHA256


@needs_copy
def test_a_cached_copy_is_used_without_the_network(cache):
    cache.mkdir()
    shutil.copy(SHARED, cache / data.TINY_SHAKESPEARE_FILE)
    corpus = data.load_corpus("tiny-shakespeare", "char")
    assert len(corpus.train) + len(corpus.valid) == 1115394
    assert "".join(corpus.vocab.decode(corpus.train[:13])) == "First Citizen"


@needs_copy
def test_a_missing_copy_is_downloaded_once_from_char_rnn_checked_and_kept(cache, monkeypatch):
    raw = open(SHARED, "rb").read()
    asked = serve(monkeypatch, raw)
    path = data.tiny_shakespeare()
    assert asked == ["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"]
    assert path == str(cache / data.TINY_SHAKESPEARE_FILE) and open(path, "rb").read() == raw
    assert os.listdir(cache) == [data.TINY_SHAKESPEARE_FILE]  # no temporary left beside it
    data.load_corpus("tiny-shakespeare", "char")
    assert len(asked) == 1  # the second time from the cache


def test_a_download_that_is_not_the_file_is_refused_and_not_kept(cache, monkeypatch):
    serve(monkeypatch, b"<html>429 Too Many Requests</html>")
    with pytest.raises(
        SettingError,
        match=r"^dataset: the file downloaded from https://raw\.githubusercontent\.com/"
        r"karpathy/char-rnn/.* is not char-rnn's tiny-shakespeare \(SHA-256 [0-9a-f]{64}, expected ",
    ):
        data.load_corpus("tiny-shakespeare", "char")
    assert not (cache / data.TINY_SHAKESPEARE_FILE).exists()


def test_a_cached_copy_that_is_not_the_file_is_refused(cache):
    cache.mkdir()
    (cache / data.TINY_SHAKESPEARE_FILE).write_text("First Citizen:\nshortened\n")
    with pytest.raises(
        SettingError,
        match=r"^dataset: '.*tinyshakespeare.txt' is not char-rnn's tiny-shakespeare "
        r"\(SHA-256 .*\): delete it",
    ):
        data.load_corpus("tiny-shakespeare", "char")


def test_a_failed_download_says_where_a_copy_goes(cache, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(
        SettingError,
        match=r"^dataset: tiny-shakespeare is not in '.*cache' and could not be "
        r"downloaded .*no network.*RNNLM_EXT_DATA",
    ):
        data.load_corpus("tiny-shakespeare", "char")


def test_the_data_folder_is_rnnlm_ext_data_else_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("RNNLM_EXT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.data_folder() == os.path.join(str(tmp_path), ".cache", "rnnlm_ext")
    monkeypatch.setenv("RNNLM_EXT_DATA", str(tmp_path / "mine"))
    assert data.data_folder() == str(tmp_path / "mine")


@needs_copy
def test_rnnlm_train_takes_it_by_name(cache, capsys):
    cache.mkdir()
    shutil.copy(SHARED, cache / data.TINY_SHAKESPEARE_FILE)
    args = ["--level", "char", "--hidden", "8", "--layers", "1", "--stop-after", "1", "--no-progress"]
    assert main(["train", "--dataset", "tiny-shakespeare", *args]) == 0
    assert "892,315 train / 223,079 valid tokens" in capsys.readouterr().out
