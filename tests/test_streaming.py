"""quant_expand.streaming.LayerStreamer: units copied into a few slots ahead of use (no ComfyUI).

What a unit's views hold when the compute stream reaches it must be exactly its sources, whatever order
units are entered in (in order, wrapping around, out of order, one unit re-entered): checked with
``torch.equal`` on every tensor, read on the compute stream right after ``enter``. On CUDA the copies run on
a side stream with events ordering them, so the check also catches a missing wait.
"""
from __future__ import annotations

import pytest
import torch

from quant_expand.streaming import PIN_IN_PLACE, LayerStreamer, StreamUnit, slot_pattern, stream_unit_name


def make_units(n=7, seed=0):
    """Small sources in every unit; in every other one, a large one between them (copied on its own)."""
    g = torch.Generator().manual_seed(seed)
    units = []
    for i in range(n):
        sources = [torch.randint(0, 255, (1000 + 37 * i,), dtype=torch.uint8, generator=g),
                   torch.randn(3, 50 + i, generator=g), torch.randn(17, generator=g).to(torch.bfloat16)]
        if i % 2:
            sources.insert(1, torch.randn(PIN_IN_PLACE // 2 + 5 * i, generator=g).to(torch.bfloat16))
        units.append(StreamUnit(f"double_blocks.{i}", sources))
    return units


ORDERS = [list(range(7)) * 3, [0, 1, 2, 1, 3, 6, 5, 4, 0, 0, 3], [5] * 3 + [2, 5, 2]]


def check(streamer, units, order, device):
    expected = [[t.clone() for t in u.sources] for u in units]
    for i in order:
        streamer.enter(i)
        for got, want in zip(streamer.views(i), expected[i]):
            assert torch.equal(got.cpu(), want), (i, order)
        if device.type == "cuda":  # work on the compute stream, so the side stream can run ahead of it
            torch.cuda._sleep(200_000)


@pytest.mark.parametrize("order", ORDERS)
def test_views_hold_their_units_sources_in_any_order_on_cpu(order):
    units = make_units()
    streamer = LayerStreamer(torch.device("cpu"), units, slots=3)
    assert streamer.slot_bytes == max(u.nbytes for u in units) and len(streamer.buffers) == 3
    check(streamer, units, order, torch.device("cpu"))
    streamer.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (side-stream copies and events)")
@pytest.mark.parametrize("order", ORDERS + [list(range(8)) * 3])
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_views_hold_their_units_sources_in_any_order_on_cuda(order, slots):
    units = make_units(8)  # 8 = 3 * 2 + 2: the slot pattern restarts once
    streamer = LayerStreamer(torch.device("cuda"), units, slots=slots, pin=lambda t: False)
    # the small sources of a unit cross in one copy from a pinned buffer; the large one (pinning refused
    # here) on its own
    assert all(len(u.srcs) == 1 + (i % 2) and u.srcs[-1].is_pinned() for i, u in enumerate(units))
    assert streamer.pageable_bytes == sum(u.sources[1].nbytes for i, u in enumerate(units) if i % 2)
    check(streamer, units, order, torch.device("cuda"))
    streamer.close()


def test_views_are_aligned_and_units_share_slots_round_robin():
    units = make_units()
    streamer = LayerStreamer(torch.device("cpu"), units, slots=3)
    assert streamer.slot_of == slot_pattern(7, 3)
    for i, u in enumerate(units):
        base = streamer.buffers[streamer.slot_of[i]].data_ptr()
        assert all((v.data_ptr() - base) % 512 == 0 for v in u.views)
        assert all(v.dtype == s.dtype and v.shape == s.shape for v, s in zip(u.views, u.sources))
        small = [o for o, t in zip(u.offsets, u.sources) if t.nbytes < PIN_IN_PLACE]
        large = [o for o, t in zip(u.offsets, u.sources) if t.nbytes >= PIN_IN_PLACE]
        assert min(small) == u.small_start and all(o < u.small_start for o in large)  # large first


def test_unit_names_are_flux_blocks_or_the_layer():
    assert stream_unit_name("diffusion_model.double_blocks.12.img_attn.qkv") == "diffusion_model.double_blocks.12"
    assert stream_unit_name("single_blocks.3.linear1") == "single_blocks.3"
    assert stream_unit_name("diffusion_model.txt_in") == "diffusion_model.txt_in"
    assert stream_unit_name("diffusion_model.my_single_blocks.3.x") == "diffusion_model.my_single_blocks.3.x"


def _windows(pattern, size):
    n = len(pattern)
    return [[pattern[(start + k) % n] for k in range(size)] for start in range(n)]


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_slot_pattern_keeps_the_step_boundary_clear(slots):
    """Any ``slots`` units in a row that contain the last unit and the first have distinct slots (the step
    boundary gets the full lookahead); elsewhere at most two restarts, and never a unit beside its own
    slot (for 3 slots or more)."""
    for n in range(1, 130):
        pattern = slot_pattern(n, slots)
        assert len(pattern) == n and set(pattern) <= set(range(min(n, slots))), (n, pattern)
        if n <= slots:
            assert pattern == list(range(n))
            continue
        windows = _windows(pattern, slots)
        crowded = [start for start, w in enumerate(windows) if len(set(w)) < slots]
        if n >= 3 * slots:
            at_boundary = [(n - k) % n for k in range(1, slots)]  # windows holding units n-1 and 0
            assert not set(crowded) & set(at_boundary), (n, pattern)
            assert len(set(pattern)) == slots
        if slots >= 3:
            assert all(a != b for a, b in _windows(pattern, 2)), (n, pattern)
            assert len(crowded) <= 2 * (slots - 1), (n, pattern, crowded)
        if n % slots == 0:
            assert pattern == [i % slots for i in range(n)]


def test_the_last_unit_copies_the_first_ones_ahead_for_the_next_step():
    for n in (9, 10, 11, 58, 47):
        streamer = LayerStreamer(torch.device("cpu"), make_units(n), slots=3)
        assert streamer.ahead_of(n - 1) == [0, 1] and streamer.ahead_of(0) == [1, 2], n
        for u in range(n):
            ahead = streamer.ahead_of(u)
            assert 1 <= len(ahead) <= 2 and ahead == [(u + k) % n for k in range(1, len(ahead) + 1)]
            slots = [streamer.slot_of[v] for v in [u, *ahead]]
            assert len(set(slots)) == len(slots), (n, u, ahead)
        streamer.close()
