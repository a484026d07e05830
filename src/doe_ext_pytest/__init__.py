"""The pytest plugin of doe_ext (entry point ``pytest11``): ablations written as pytest tests.

It lives outside the ``doe_ext`` package and imports it only when a test asks for one of its
fixtures: pytest loads every installed plugin in every session, and a session that uses none of
these should not pay for torch and the compiled ops (nor fail with them).

Options: ``--ablation-scale tiny|small`` (CI: seconds; ``make ablate``), ``--ablation-seeds N``
(default 3), ``--ablation-dir DIR`` (default ``reports/ablations``). Fixtures: ``ablation`` (a
factory: ``ablation("table3", control="moe", title=...)`` gives the session's recorder of that name),
``ablation_scale``, ``ablation_seeds``, ``ablation_dir`` (the output directory), ``doe_corpus`` (the Stage-1-labelled GCIDE corpus of the scale) and
``train_run`` (``train_run(config, seed)``: one cached Stage-2 run on it, :mod:`doe_ext.testing.runs`). At the end of the session every recorder with runs writes
``DIR/<name>.{json,md,png}`` and ``DIR/README.md`` gathers every table of ``DIR``; a claim or
control arm without numbers fails the session.
"""
from __future__ import annotations

import pytest

_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser):
    g = parser.getgroup("doe_ext ablations")
    g.addoption("--ablation-scale", choices=("tiny", "small"), default="tiny",
                help="size of the ablation runs: tiny (CI, seconds) or small (make ablate)")
    g.addoption("--ablation-seeds", type=int, default=3, help="seeds per ablation arm (default 3)")
    g.addoption("--ablation-dir", default=None,
                help="where the ablation tables are written (default reports/ablations at small scale, "
                     "reports/ablations/tiny at tiny scale)")


def pytest_configure(config):
    config.stash[_KEY] = {}
    if config.getoption("--ablation-seeds") < 1:
        raise pytest.UsageError(f"--ablation-seeds must be >= 1, got {config.getoption('--ablation-seeds')}")


@pytest.fixture(scope="session")
def ablation_scale(pytestconfig) -> str:
    return pytestconfig.getoption("--ablation-scale")


@pytest.fixture(scope="session")
def ablation_seeds(pytestconfig) -> list[int]:
    return list(range(pytestconfig.getoption("--ablation-seeds")))


@pytest.fixture(scope="session")
def ablation(pytestconfig):
    recorders = pytestconfig.stash[_KEY]

    from doe_ext.testing.recorder import Ablation

    def get(name: str, control: str | None = None, title: str = "") -> Ablation:
        rec = recorders.get(name)
        if rec is None:
            rec = recorders[name] = Ablation(name, control, title)
        elif control is not None and rec.control != control:
            raise ValueError(f"ablation {name!r}: control {control!r} differs from the {rec.control!r} given before")
        return rec

    return get


@pytest.fixture(scope="session", name="ablation_dir")
def ablation_dir_fixture(pytestconfig) -> str:
    return ablation_dir(pytestconfig)


@pytest.fixture(scope="session")
def doe_corpus(ablation_scale):
    from doe_ext.testing.runs import labelled_corpus

    return labelled_corpus(ablation_scale)


@pytest.fixture(scope="session")
def train_run(doe_corpus, ablation_scale):
    from doe_ext.testing import runs

    def run(config: dict | None = None, seed: int = 0, **kw) -> dict:
        return runs.train_run(doe_corpus, config, seed, ablation_scale, **kw)

    return run


def ablation_dir(config) -> str:
    scale = config.getoption("--ablation-scale")
    return config.getoption("--ablation-dir") or ("reports/ablations" if scale == "small" else f"reports/ablations/{scale}")


def pytest_sessionfinish(session, exitstatus):
    recorders = session.config.stash.get(_KEY, {})
    directory = ablation_dir(session.config)
    problems = []
    for rec in recorders.values():
        if rec.runs:
            rec.write(directory, scale=session.config.getoption("--ablation-scale"))
        problems += rec.missing()
    if any(rec.runs for rec in recorders.values()):
        from doe_ext.testing.recorder import write_index

        write_index(directory)
    if problems:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        for p in problems:
            (tr.write_line if tr else print)(f"ablation without numbers: {p}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
