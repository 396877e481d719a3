"""The progress bar's rates: every step of the call so far, not the last step alone."""

import pytest

from nanovllm.engine.progress import StepRates


def test_rates_average_over_the_steps_so_far():
    rates = StepRates()
    assert rates.postfix() == {"prefill": "0tok/s", "decode": "0tok/s"}
    rates.add(300, 0.1)  # a prefill step of 300 tokens
    rates.add(-4, 0.01)
    # With async scheduling a step may only collect tokens the GPU already produced.
    rates.add(-4, 1e-6)
    rates.add(0, 0.5)  # a step that ran nothing counts nowhere
    assert rates.rate("prefill") == pytest.approx(3000)
    assert rates.rate("decode") == pytest.approx(8 / 0.010001)
    assert rates.postfix() == {"prefill": "3000tok/s", "decode": "800tok/s"}
