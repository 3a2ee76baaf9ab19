"""Fixtures of the training tests."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_helpers import make_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A folder of 40 small deterministic text documents."""
    return make_corpus(str(tmp_path_factory.mktemp("corpus")))
