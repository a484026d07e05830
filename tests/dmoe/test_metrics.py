"""EM / F1 with SQuAD's normalisation, PRAG's answer cut, the bootstrap interval."""
import numpy as np
import pytest

from doe_ext.dmoe.metrics import bootstrap_ci, cut_answer, degenerate, exact_match, f1, hit, normalize_answer, yes_no


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower.", "eiffel tower"), ("  an  apple, A pear ", "apple pear"), ("Théâtre!", "théâtre"),
    ("theory of the case", "theory of case"), ("", ""), ("U.S.A.", "usa")])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_f1_known_cases():
    assert exact_match("The Debian Games Team", ["Debian Games Team"]) == 1.0
    assert exact_match("Debian Games", ["Debian Games Team"]) == 0.0
    assert f1("Debian Games", ["Debian Games Team"]) == pytest.approx(0.8)  # p = 1, r = 2/3
    assert f1("games team of debian", ["Debian Games Team", "x"]) == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert f1("", ["x"]) == 0.0 and f1("the", ["a"]) == 1.0  # "the" and "a" both normalise to nothing
    assert f1("paris paris", ["paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets


def test_cut_answer():
    assert cut_answer("Thinking... So the answer is producer.\nQuestion: next") == "producer."
    assert cut_answer(" Ritesh Raj Sarraf\nHe also maintains") == "Ritesh Raj Sarraf"
    assert cut_answer("The answer is: games") == "games"


def test_yes_no():
    assert yes_no("Yes, it is.") == "yes" and yes_no("no") == "no" and yes_no("Maybe yes") is None


def test_bootstrap_interval():
    mean, lo, hi = bootstrap_ci([1.0] * 30 + [0.0] * 70)
    assert mean == pytest.approx(0.3) and lo < 0.3 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 100), rel=0.15)  # the normal approximation
    assert bootstrap_ci([0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(np.isnan(v) for v in bootstrap_ci([]))


@pytest.mark.parametrize("answer, bad", [
    ("", True), ("   ", True), (".", True), ("the", True),  # nothing left after normalisation
    ("the Kesh Kesh Kesh Kesh", True), ("no, no, NO, no", True), ("Kesh Kesh Kesh", False),
    ("1745", False), ("Trinpul Gaibo", False), ("a a b a a", False), ("ha, ha, ha, ha", True),
    ("the river the river the river the river", True),
    ("Kesh Keshet Kesh Kesh", False), ("1 1 1 1", True),
    ("the town of Brakre in the town of Brakre in the town of Brakre in th", True),  # a phrase loop
    ("the river Ostra, the river Ostra", False), ("red wine, red wine, red wine", True),
    ("one two three four five six seven eight nine " * 3, False)])  # a nine-word cycle is not counted
def test_degenerate_answers(answer, bad):
    assert degenerate(answer) is bad


@pytest.mark.parametrize("prediction, answers, want", [
    ("The Vouram frame is driven by horses.", ["horses"], 1.0), ("Horses", ["horses"], 1.0),
    ("It runs on horsepower.", ["horses"], 0.0),  # whole words only
    ("played the cello", ["the cello", "cello"], 1.0), ("in 1812 or 1813", ["1812"], 1.0), ("18120", ["1812"], 0.0),
    ("goat and cheese", ["goat cheese"], 0.0),  # the answer's words in order, together
    ("", ["x"], 0.0), ("anything", [""], 0.0)])
def test_hit_is_the_answer_inside_the_prediction(prediction, answers, want):
    assert hit(prediction, answers) == want
