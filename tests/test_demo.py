"""The main job end to end on a small slice (`python -m doe_ext.demo --quick`)."""
import json
import math

from doe_ext.demo import DOMAINS, load_gcide_domains, main


def test_gcide_definitions_are_balanced_and_labelled():
    docs = load_gcide_domains(per_domain=25)
    domains = [d for _, d in docs]
    assert sorted(set(domains)) == sorted(DOMAINS.values())
    assert all(domains.count(d) == 25 for d in set(domains))
    assert all(len(text.split()) >= 8 and "[1913 Webster]" not in text for text, _ in docs)


def test_quick_demo_writes_a_report(tmp_path):
    report = main(["--quick", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["stage2"]) == {"doe", "dense"}
    for res in metrics["stage2"].values():
        assert math.isfinite(res["heldout_ntp"]) and res["heldout_ppl"] > 1
    assert set(metrics["gate_activity_by_domain"]) == set(DOMAINS.values())
    text = report.read_text()
    for png in ("train_loss.png", "block_utilisation_cv.png", "gates_by_domain_layer0.png"):
        assert png in text and (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
