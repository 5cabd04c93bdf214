"""mem_estimate.py: the peak memory of a run from its architecture and settings, and the changes
it suggests when a run would not fit."""

from __future__ import annotations

import pytest


def test_suggestions_carry_their_own_estimates():
    """A later run (USE_QUANT applies): every suggestion is estimated, each lowers the peak, and
    4-bit + LoRA with checkpointing makes a 1B model fit 16 GiB of RAM where full training cannot."""
    import mem_estimate
    from config import architecture, load_settings

    s = load_settings({"TARGET_PARAMETERS": "1B", "BATCH_SIZE": "16", "MAX_LENGTH": "1024"})
    p = mem_estimate.plan(s, architecture(s), "bf16", nf4=False, world=1, gpu=False, gpus=0, available=16 * 2**30)
    assert not p["fits"] and p["checkpointing"]  # auto turned it on and it still does not fit
    by = {o["change"].split(" (")[0]: o for o in p["suggestions"]}
    assert by["USE_QUANT=true"]["fits"]
    assert all(o["estimated_peak_bytes"] < p["estimate"].peak_bytes for o in p["suggestions"])
    assert any(k.startswith("BATCH_SIZE=") for k in by)


def test_estimate_scales_as_it_should():
    """The figures move the right way: ZeRO-2 splits the optimizer across GPUs, NF4 shrinks the
    weights, checkpointing shrinks the activations, the batch grows them linearly."""
    from config import architecture, load_settings
    from mem_estimate import estimate

    arch = architecture(load_settings({"TARGET_PARAMETERS": "500M"}))
    base = dict(precision="bf16", batch=8, seq=1024, checkpointing=False, nf4=False, gpu=True)
    one, two = estimate(arch, **base, world=1), estimate(arch, **base, world=2)
    assert two.per_rank["optimizer_states"] * 2 == pytest.approx(one.per_rank["optimizer_states"], rel=1e-6)
    q = estimate(arch, **{**base, "nf4": True})
    assert q.per_rank["weights"] < one.per_rank["weights"] / 3 and q.per_rank["optimizer_states"] < one.per_rank["optimizer_states"] / 20
    c = estimate(arch, **{**base, "checkpointing": True})
    assert c.per_rank["activations"] < one.per_rank["activations"] / 4
    b16 = estimate(arch, **{**base, "batch": 16})
    assert b16.per_rank["activations"] == pytest.approx(2 * one.per_rank["activations"], rel=0.01)
