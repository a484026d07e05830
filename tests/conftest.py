import os
import sys

import pytest
import torch

# Tests run single-process on 2-core CI machines: keep intra-op threads at the machine's count but
# make the suite reproducible (fixed seed per test).
sys.path.insert(0, os.path.dirname(__file__))
# The CLI's commands run in this process: they keep torch's threads as they are (doe_ext.threads would
# otherwise set the cores free at that moment for the rest of the session). tests/test_threads.py
# tests that policy itself.
os.environ.setdefault("DOE_EXT_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def usage_error(capsys):
    """``usage_error(*argv)``: the ``doe-ext`` command refuses an argument while parsing (exit status 2,
    no traceback); returns argparse's one-line message."""
    from doe_ext.cli import main

    def refused(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            main(list(map(str, argv)))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        return err.strip().splitlines()[-1]
    return refused
