"""Every method, on a Llama, a GPT-2 and a BERT directory: from_pretrained reads exactly what
sl.load reads (the matrix of ``benchmarks/hf_loading.py``, whose table is in BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch
from benchmarks.hf_loading import (
    ARCHITECTURES,
    RECIPES,
    auto_class,
    compressed_dir,
    outputs,
    padded_batches,
    steps_for,
)

import slimline as sl

# Refusals the table records: structured pruning does not handle GPT-2's blocks yet (fused
# Conv1D attention; torch.fx cannot trace the model), and an encoder has no KV cache. Anything else must load.
REFUSED = {("structured 25% (heads + neurons)", "gpt2"): "GPT2LMHeadModel has no Llama",
           ("structured 25% (neurons)", "gpt2"): "cannot trace GPT2LMHeadModel",
           ("kv_cache int4", "bert"): "cannot generate"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("label", [label for label, _ in RECIPES])
def test_from_pretrained_equals_sl_load(tmp_path, label, arch):
    if (label, arch) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[label, arch]):
            compressed_dir(arch, steps_for(label, arch), tmp_path)
        return
    out = compressed_dir(arch, steps_for(label, arch), tmp_path)
    reference = sl.load(out)
    loaded = auto_class(arch).from_pretrained(out)
    assert {n: type(m).__name__ for n, m in loaded.named_modules()} == \
        {n: type(m).__name__ for n, m in reference.named_modules()}
    for batch in padded_batches(2, seed=7):
        torch.testing.assert_close(outputs(loaded, batch), outputs(reference, batch),
                                   rtol=0, atol=0)
