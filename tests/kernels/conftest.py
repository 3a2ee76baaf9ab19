import pytest
import torch

import dsv3
from dsv3 import InferenceOptions


@pytest.fixture
def native_tiny_model(tiny_cfg):
    """A builder of the tiny model as the native kernels' decode tests run it: seed 0, a random
    `e_score_correction_bias` (so the bias changes the routing), prepared for the native path with `quantize`."""

    def build(quantize: str | None = None) -> dsv3.DeepSeekV3:
        torch.manual_seed(0)
        model = dsv3.DeepSeekV3(tiny_cfg, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.normal_(0, 0.3)
        return model.prepare_for_inference(InferenceOptions(matvec="native", quantize=quantize))

    return build
