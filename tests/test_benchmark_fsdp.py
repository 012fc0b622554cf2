"""The FSDP simulation's reading of compiled HLO: collective kinds, counts and bytes."""

from __future__ import annotations

from benchmarks.fsdp_memory import collective_bytes, shape_bytes

# Lines of the per-device program XLA:CPU compiled for the digits train step on 8 devices with
# parallel.fsdp=8 (abridged), plus an async pair as TPU and GPU programs write collectives.
HLO = """
%all-gather.43 = f32[128,128]{0,1} all-gather(%wrapped_copy.34), channel_id=202, dimensions={1}
%all-gather.1 = f32[3,3,32,64]{2,1,0,3} all-gather(%wrapped_copy), channel_id=4, dimensions={3}
%all-reduce.278 = (f32[], f32[64]{0}, bf16[2,8]{1,0}) all-reduce(%a, %b, %c), channel_id=9
%gte.1 = f32[] get-tuple-element(%all-reduce.278), index=0
%ags = (f32[3,3,32,8]{3,2,1,0}, f32[3,3,32,64]{3,2,1,0}) all-gather-start(%p), dimensions={3}
%agd = f32[3,3,32,64]{3,2,1,0} all-gather-done(%ags)
%reduce-scatter.2 = f32[3,3,32,8]{3,2,1,0} reduce-scatter(%g), dimensions={3}
"""


def test_shape_bytes_sums_every_array_shape():
    assert shape_bytes("(f32[], f32[64]{0}, bf16[2,8]{1,0})") == 4 + 64 * 4 + 16 * 2
    assert shape_bytes("s32[3,3,32,64]") == 3 * 3 * 32 * 64 * 4


def test_collectives_are_counted_once_each_with_their_result_bytes():
    found = collective_bytes(HLO)
    assert found == {
        "all-gather": {"count": 3, "bytes": 128 * 128 * 4 + 2 * 3 * 3 * 32 * 64 * 4},
        "all-reduce": {"count": 1, "bytes": 4 + 64 * 4 + 16 * 2},
        "reduce-scatter": {"count": 1, "bytes": 3 * 3 * 32 * 8 * 4},
    }
