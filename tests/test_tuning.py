"""quant_expand.tuning: the benchmark switches change what the product does only inside ``tuned`` and
are restored after it, even when the block fails (CPU)."""
import pytest
import torch

from quant_expand import LazyLoraDelta, LoraTerm
from quant_expand.tuning import TUNING, Tuning, tuned


def test_defaults_are_what_users_run():
    assert TUNING == Tuning()
    assert (TUNING.four_bit_path, TUNING.int8_dequant, TUNING.lora_strategy) == ("triton", "triton", "auto")


def test_tuned_sets_and_restores_even_on_error():
    with pytest.raises(RuntimeError):
        with tuned(lora_strategy="merged", int8_dequant="cast") as t:
            assert (t.lora_strategy, TUNING.int8_dequant) == ("merged", "cast")
            raise RuntimeError("inside")
    assert TUNING == Tuning()


def test_an_unknown_switch_is_refused_and_nothing_changes():
    with pytest.raises(AttributeError, match="no tuning switch 'fast'"):
        with tuned(lora_strategy="merged", fast=True):
            pass
    assert TUNING == Tuning()


def test_lora_strategy_decides_where_a_delta_meets_the_weight():
    g = torch.Generator().manual_seed(0)
    term = LoraTerm(down=torch.randn(4, 256, generator=g), up=torch.randn(128, 4, generator=g), scale=0.5)
    delta = LazyLoraDelta(128, 256, [term])
    # auto: the FLOP count (one token unmerged, many tokens merged)
    assert (delta.prefer_merged(1), delta.prefer_merged(4096)) == (False, True)
    with tuned(lora_strategy="unmerged"):
        assert not delta.prefer_merged(4096)
    with tuned(lora_strategy="merged"):
        assert delta.prefer_merged(1)


def test_device_tensors_are_what_the_delta_holds_for_the_forward():
    """bench's memory breakdown reads this instead of the delta's caches."""
    g = torch.Generator().manual_seed(1)
    term = LoraTerm(down=torch.randn(4, 256, generator=g), up=torch.randn(128, 4, generator=g), scale=0.5)
    bias_term = torch.randn(128, generator=g)
    delta = LazyLoraDelta(128, 256, [term], bias_terms=[(bias_term, 0.25)])
    assert delta.device_tensors() == []
    down, up, _ = delta.stacked(torch.device("cpu"), torch.float32)
    summed = delta.bias_with(torch.zeros(128), torch.device("cpu"), torch.float32)
    held = {t.data_ptr() for t in delta.device_tensors()}
    assert {down.data_ptr(), up.data_ptr()} <= held
    if isinstance(summed, torch.Tensor):
        assert summed.data_ptr() in held
