import json

import numpy as np
import pytest

from doe_ext.lda import CorpusError, CorpusWriter, TokenCorpus


def small():
    return TokenCorpus.from_documents([[1, 2, 3], [], [4, 4, 0, 1]], vocab_size=5, tokenizer="t")


def test_write_open_round_trip(tmp_path):
    c = small().write(tmp_path / "shard")
    assert isinstance(c.tokens, np.memmap) and c.tokens.dtype == np.uint32
    assert c.offsets.tolist() == [0, 3, 3, 7]
    assert c[2].tolist() == [4, 4, 0, 1] and c[1].size == 0
    again = TokenCorpus.open(tmp_path / "shard")
    assert (again.num_docs, again.num_tokens, again.vocab_size) == (3, 7, 5)
    assert again.meta["tokenizer"] == "t"
    assert np.array_equal(np.asarray(again.tokens), [1, 2, 3, 4, 4, 0, 1])
    assert (tmp_path / "shard" / "tokens.u32").stat().st_size == 7 * 4
    assert (tmp_path / "shard" / "offsets.i64").stat().st_size == 4 * 8


def test_chunks_cover_every_document_once():
    c = TokenCorpus.from_documents([[0] * n for n in [5, 1, 7, 0, 3, 9, 2]], vocab_size=1)
    ranges = list(c.chunks(8))
    assert ranges[0][0] == 0 and ranges[-1][1] == c.num_docs
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for lo, hi in ranges:  # at most 8 tokens, unless a single document is longer
        assert c.offsets[hi] - c.offsets[lo] <= 8 or hi - lo == 1


@pytest.mark.parametrize("tokens, offsets, vocab, message", [
    ([0, 1, 9], [0, 3], 5, "token id 9 >= vocab_size 5 at token 2"),
    ([0, -1], [0, 2], 5, "negative token id -1"),
    ([0, 1, 2], [0, 2], 5, "offsets must run from 0 to the token count 3"),
    ([0, 1, 2], [0, 2, 1, 3], 5, "offsets decrease at document 1"),
])
def test_from_arrays_rejects_bad_input(tokens, offsets, vocab, message):
    with pytest.raises(CorpusError, match=message):
        TokenCorpus.from_arrays(tokens, offsets, vocab)


def test_open_names_the_missing_or_corrupt_file(tmp_path):
    shard = tmp_path / "shard"
    small().write(shard)
    (shard / "tokens.u32").write_bytes(b"\0" * 10)  # truncated
    with pytest.raises(CorpusError, match=r"tokens\.u32: corrupt or truncated: 10 bytes, expected 28"):
        TokenCorpus.open(shard)
    (shard / "meta.json").write_text("{not json")
    with pytest.raises(CorpusError, match=r"meta\.json: corrupt corpus meta"):
        TokenCorpus.open(shard)
    (shard / "meta.json").unlink()
    with pytest.raises(CorpusError, match=r"meta\.json: missing .*unfinished"):
        TokenCorpus.open(shard)
    with pytest.raises(CorpusError, match="no such corpus shard folder"):
        TokenCorpus.open(tmp_path / "nope")


def test_validate_finds_a_token_outside_the_vocabulary(tmp_path):
    shard = tmp_path / "shard"
    small().write(shard)
    meta = json.loads((shard / "meta.json").read_text())
    meta["vocab_size"] = 4  # the corpus holds id 4
    (shard / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorpusError, match=r"tokens\.u32: token id 4 >= vocab size 4 at token 3"):
        TokenCorpus.open(shard).validate()


def test_an_interrupted_write_leaves_nothing_that_looks_complete(tmp_path):
    shard = tmp_path / "shard"
    with pytest.raises(RuntimeError):
        with CorpusWriter(shard, vocab_size=10) as w:
            w.add([1, 2, 3])
            raise RuntimeError("killed")
    assert not shard.exists()
    assert not (tmp_path / "shard.partial").exists()
    with pytest.raises(CorpusError, match=r"token id 12 outside \[0, 10\) in document 1"):
        with CorpusWriter(shard, vocab_size=10) as w:
            w.add([1])
            w.add([12])
    assert not shard.exists()
