"""The main job end to end on a small slice (`python -m doe_ext.demo --quick`)."""
import json
import math

import numpy as np
import pytest

from doe_ext.demo import DOMAINS, load_gcide_domains, main, stage1


def test_gcide_definitions_are_balanced_and_labelled():
    docs = load_gcide_domains(per_domain=25)
    domains = [d for _, d in docs]
    assert sorted(set(domains)) == sorted(DOMAINS.values())
    assert all(domains.count(d) == 25 for d in set(domains))
    assert all(len(text.split()) >= 8 and "[1913 Webster]" not in text for text, _ in docs)


def test_quick_demo_writes_a_report(tmp_path):
    report = main(["--quick", "--dmoe-ablations", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["stage2"]) == {"doe", "dense", "dense + topics"}
    for res in metrics["stage2"].values():
        assert math.isfinite(res["heldout_ntp"]) and res["heldout_ppl"] > 1
    assert set(metrics["gate_activity_by_domain"]) == set(DOMAINS.values())
    text = report.read_text()
    for png in ("train_loss.png", "block_utilisation_cv.png", "gates_by_domain_layer0.png",
                "dmoe/threshold_sweep.png", "dmoe/uncertainty_bins.png"):
        assert png in text and (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # the DMoE half: every method and ablation group measured on the real SmolLM2-135M
    assert "not built yet" not in text.lower()
    dm = json.loads((tmp_path / "dmoe" / "metrics.json").read_text())
    assert set(dm["summary"]) == {"base", "gold", "rag", "prag", "flare", "sft", "dmoe"}
    assert all(s["n"] == dm["questions"] > 0 and 0 <= s["em"][0] <= 1 and s["latency_s"] > 0
               for s in dm["summary"].values())
    more = next((tmp_path / "dmoe").glob("ablations-*.json"))  # from --dmoe-ablations (make ablate-dmoe)
    groups = {**dm["ablations"], **json.loads(more.read_text())["groups"]}
    for group in ("Table 3", "Table 6", "Table 7", "Table 8", "Table 9", "Fig. 5", "Fig. 6"):
        rows = next(v for k, v in groups.items() if k.startswith(group))
        assert rows and all(r["n"] > 0 for r in rows.values()), group
        assert f"**{group}" in text
    assert len(dm["table5"]["dmoe"]) >= 1 and dm["example"] is not None and "trigger trace" in text


def test_normalized_mutual_info_known_values():
    from doe_ext.analysis import normalized_mutual_info as nmi

    assert nmi([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)  # the same partition, renamed
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)  # independent
    # a = [0,0,1,1], b = [0,0,0,1]: H(a) = log 2, H(b) = H(1/4), I = H(b) - H(b | a) = H(1/4) - log(2) / 2
    h_b = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx((h_b - math.log(2) / 2) / ((math.log(2) + h_b) / 2))
    assert nmi([3, 3], [1, 1]) == 1.0
    with pytest.raises(ValueError, match="`a` and `b` must label the same non-empty items, got 2 and 3"):
        nmi([0, 1], [0, 1, 2])


@pytest.fixture(scope="module")
def stage1_word(tmp_path_factory):
    docs = load_gcide_domains(per_domain=20)
    return docs, stage1(docs, tmp_path_factory.mktemp("s1"), 300, 5, 20, progress=False)


def test_word_level_stage1_gives_each_token_its_words_topic(stage1_word):
    docs, s1 = stage1_word
    tok, bos = s1.tokenizer, s1.tokenizer.token_to_id("[BOS]")
    word_topics = s1.lda.label(s1.corpus)[0]
    for d, (text, _) in enumerate(docs[:30]):  # one document at a time, from the tokenizer's own word ids
        lo = int(s1.corpus.offsets[d])
        enc = tok.encode(text)
        assert s1.ids[d].tolist() == [bos] + enc.ids
        assert s1.topics[d][0] == s1.theta[d].argmax()  # [BOS]: the dominant topic
        assert s1.topics[d][1:].tolist() == [int(word_topics[lo + w]) for w in enc.word_ids]
        words = [w.lower() for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        assert [s1.vocab.id_to_token(int(i)) for i in s1.corpus[d]] == words
    again = s1.label([t for t, _ in docs[:30]])  # new texts labelled by the fitted model: the same as in training
    assert all((a[0] == s1.ids[d]).all() and (a[1] == s1.topics[d]).all() for d, a in enumerate(again))
    unseen = s1.label(["zzzqx " * 3 + docs[0][0]])[0]  # an unseen word takes the document's topic
    assert len(unseen[1]) == len(unseen[0]) and (unseen[1] >= 0).all()
    q = s1.quality([d for _, d in docs])
    assert -1 <= q["npmi"] <= 1 and 0 <= q["nmi"] <= 1
    kept = [s1.vocab.id_to_token(i) for i in np.flatnonzero(s1.lda.keep)]
    assert kept and all(w.isalpha() and len(w) >= 3 for w in kept)  # no punctuation, numbers or "a", "of"


def test_stage1_rejects_an_unknown_unit(tmp_path):
    with pytest.raises(ValueError, match="stage1: `unit` must be 'token' or 'word', got 'char'"):
        stage1([("a b c", "x")], tmp_path, 50, 2, 1, unit="char")
