import pytest

from lda_testing import Planted, draw_corpus


@pytest.fixture(scope="session")
def planted() -> Planted:
    return draw_corpus()
