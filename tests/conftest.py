import os
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_FILE = os.path.join(ROOT, "..", "shared", "seeds", "000_ef9ea79f938a8477.txt")
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture
def tiny_cfg():
    import dsv3

    return dsv3.ModelConfig.from_pretrained("tiny")
