"""How closely two backends' module states must agree after the same session (the contract's check 5).

Owns the tolerance and why it is what it is; `tests/test_contract.py` applies it.
"""

from __future__ import annotations

import numpy as np

# Cross-backend agreement (check 5). Both backends run float32 on CPU with different kernels, so hidden
# states and gradients differ by float rounding, and the optimizer steps act on them. Measured max
# |torch - mlx| over each module's state after the 2-message SESSION (lr 1e-2, 3 steps):
#   identity: no tensors; lora_on_user: 3.3e-6 (|B| ~ 6e-2); hash_gradient: 2.1e-6 (rows ~ 3e-2; keys,
#   stamps and calibration count identical); recurrent_state: 3.3e-5 (w_q, |w_q| ~ 1); chaptered_bank:
#   1.4e-5 (an earlier version: 7.7e-4 on 1 element of 4096, its 99.9th percentile 4e-5); trace_bank
#   (format 1): 2.0e-3 on captured attention keys of size ~7, i.e. 8.2e-4 relative; format 2 keeps
#   routing states as integers (int4, formerly int8) with float scales, equal on both backends in this session.
# Outliers like chaptered_bank's were Adam's: its step divides a coordinate's gradient by that gradient's
# own running magnitude, so a coordinate whose gradient is at float-noise level moves by a
# noise-dependent fraction of lr on each backend. Captured activations carry the model's own backend
# difference, relative to their size. Hence: integer tensors (hash codes, counters, token ids) must be
# equal; in every float tensor at least 99.9% of the elements agree within rtol 3e-3 / atol 1e-4 (3.7x
# over trace_bank's relative difference, >= 3x over every trained tensor's bulk), and none differs by
# more than 5e-3 (lr / 2). A real divergence (other selected tokens, another step count or lr, a wrong
# hash code or capture) moves trained elements by ~lr and captured ones by O(1): it fails the bulk tier.
STATE_RTOL = 3e-3
STATE_ATOL = 1e-4
STATE_BULK = 0.999
STATE_MAX_ABS = 5e-3


def assert_states_agree(a: np.ndarray, b: np.ndarray, name: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    if a.dtype.kind in "iub":
        np.testing.assert_array_equal(a, b, err_msg=name)
        return
    x, y = a.astype(np.float64), b.astype(np.float64)
    assert np.isfinite(x).all() and np.isfinite(y).all(), f"{name}: non-finite values"
    off = ~np.isclose(x, y, rtol=STATE_RTOL, atol=STATE_ATOL)
    allowed = int((1 - STATE_BULK) * x.size)
    assert off.sum() <= allowed, f"{name}: {off.sum()}/{x.size} elements off (allowed {allowed})"
    if x.size:
        worst = float(np.abs(x - y).max())
        assert worst <= STATE_MAX_ABS, f"{name}: max |difference| {worst:.3g} > {STATE_MAX_ABS}"
