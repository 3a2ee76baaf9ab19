"""kernels.pages: large weights land in memory advised into 2 MiB huge pages, with their values unchanged."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch

import dsv3
from dsv3.kernels import pages

THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
MODE = THP.read_text().split("[")[1].split("]")[0] if THP.exists() else "never"
needs_thp = pytest.mark.skipif(
    MODE == "never" or not pages.enabled(), reason="transparent huge pages are off here (or not Linux)"
)
BIG = 40 << 20  # over glibc's largest mmap threshold (32 MiB): a mapping of its own, so the probe sees only it


@needs_thp
def _gets_huge_pages(make) -> bool:
    """Whether one of up to three tensors from `make()` (all kept alive: each a range of its own) sits in huge pages.
    The kernel may back a fresh range with small pages when it has no free 2 MiB block at that moment (seen
    once in a long test process); three misses in a row mean the memory was not advised."""
    made = []
    for _ in range(3):
        made.append(make())
        if pages.huge_page_bytes(made[-1]) >= pages.HUGE_PAGE:
            return True
    return False


def test_empty_is_advised_before_it_is_touched_and_copy_of_keeps_the_values():
    assert _gets_huge_pages(lambda: pages.empty((BIG,), torch.uint8).fill_(7))
    src = torch.randn(BIG // 4)
    copy = pages.copy_of(src[::1])
    assert torch.equal(copy, src) and copy.data_ptr() != src.data_ptr()
    assert _gets_huge_pages(lambda: pages.copy_of(src))


def test_small_tensors_and_the_switch_leave_memory_alone(monkeypatch):
    small = torch.randn(1000)
    assert not pages.wanted(small) and not pages.advise(small)
    assert torch.equal(pages.copy_of(small), small) and pages.copy_of(small).data_ptr() != small.data_ptr()
    monkeypatch.setenv("DSV3_HUGE_PAGES", "0")
    big = torch.empty(BIG, dtype=torch.uint8)
    # (No probe of the pages here: in a long test process a fresh mapping can land where the kernel already
    # backs memory with huge pages, so only what `advise` does is checked.)
    assert not pages.enabled() and not pages.wanted(big) and not pages.advise(big)
    assert not pages.advise(pages.empty((BIG,), torch.uint8))


@needs_thp
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_loaded_and_derived_weights_sit_in_huge_pages(tmp_path, tiny_cfg, quantize):
    """lm_head as loaded (bf16, 40 MiB) and as quantized to int8 (20 MiB) by prepare_for_inference."""
    cfg = dataclasses.replace(tiny_cfg, vocab_size=BIG // (2 * tiny_cfg.hidden_size) + 64)
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    # Up to three loads, each kept alive: the kernel may back one range with small pages when it has no free 2 MiB
    # block at that moment (seen once in a full run); weights allocated without the advice never get huge pages.
    kept = []
    for _ in range(3):
        kept.append(dsv3.DeepSeekV3.from_pretrained(tmp_path, dtype=torch.bfloat16, quantize=quantize))
        head = kept[-1].lm_head.weight
        if pages.huge_page_bytes(head) >= pages.HUGE_PAGE:
            break
    assert pages.huge_page_bytes(head) >= pages.HUGE_PAGE
    if quantize is None:
        assert torch.equal(head, model.lm_head.weight)
    else:
        assert head.dtype == torch.int8


@needs_thp
def test_fused_projections_sit_in_huge_pages():
    from dsv3.model.linear import Linear, fuse_weights

    gate, up = Linear(2048, 5120), Linear(2048, 5120)  # 40 MiB each in fp32
    with torch.no_grad():
        gate.weight.normal_(), up.weight.normal_()  # Linear leaves its weight uninitialized (NaNs compare unequal)
    expected = torch.cat([gate.weight.detach(), up.weight.detach()])
    with torch.no_grad():
        fused = fuse_weights(gate, up)
    assert torch.equal(fused, expected) and gate.weight.data_ptr() == fused.data_ptr()
    assert pages.huge_page_bytes(fused) >= pages.HUGE_PAGE
