"""The 124M speedrun step asks the GPUs for no more than the 2025-07-12 record's step, count by count
(bench/structure.py: ours measured from the code, the record's counted from its source)."""

import pytest

from bench import structure
from data.tokenizer import EOT
from model import PRESETS
from optim.zero import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER


@pytest.fixture(scope="module")
def gemms_and_casts():
    return structure.gemms_and_casts(structure.census(), structure.meta_gpt(PRESETS["124m"], fsdp=False))


PHASES = ("forward", "backward")


@pytest.mark.parametrize("block", ["attention-free block", "head"])
def test_the_census_counts_the_mlp_block_and_the_fp8_head_as_the_record_was_counted(gemms_and_casts, block):
    # Layer 7 is the MLP alone in both codes, two F.linear of the same shapes, and on an H100 both heads
    # are the same three _scaled_mm: the census of our code and the hand count of the record's must
    # agree GEMM for GEMM (shapes, dtypes), cast for cast.
    gemms, casts = gemms_and_casts
    for phase in PHASES:
        assert gemms[block][phase] == sorted(structure.RECORD_GEMMS[block][phase])
        assert casts[block][phase] == structure.RECORD_WEIGHT_CASTS[block][phase]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", structure.RECORD_GEMMS)
def test_no_more_gemms_or_weight_casts_than_the_record(gemms_and_casts, kind, phase):
    gemms, casts = gemms_and_casts
    assert len(gemms[kind][phase]) <= len(structure.RECORD_GEMMS[kind][phase]), gemms[kind][phase]
    assert casts[kind][phase] <= structure.RECORD_WEIGHT_CASTS[kind][phase]


def test_the_attention_layout_is_the_one_the_record_was_counted_on():
    # The record's tile counts are constants counted on this sequence: 74 documents, the first at 0.
    idx = structure.attention_layout()
    assert idx.shape == (1, 48 * 1024)
    assert int((idx == EOT).sum()) == 74 and int(idx[0, 0]) == EOT


def test_no_more_attention_tiles_than_the_record_over_the_schedule():
    ours, record = structure.attention_tiles(), structure.RECORD_ATTENTION_TILES
    assert ours["computed"] <= record["computed"]
    assert ours["partial"] <= record["partial"]


def collective_counts() -> tuple[dict, dict]:
    return (structure.collective_counts(structure.collectives()),
            structure.collective_counts(structure.record_collectives()))


def test_no_more_reduce_scatters_all_gathers_or_bytes_than_the_record_every_chunk_16_byte_aligned():
    ours, record = collective_counts()
    assert record["not a multiple of 16 bytes"] == ours["not a multiple of 16 bytes"] == 0
    for op in (REDUCE_SCATTER, ALL_GATHER):
        for name in (op, f"{op} bytes"):
            assert ours[name] <= record[name], f"{name}: ours {ours[name]:,}, the record's {record[name]:,}"


def test_no_all_reduce_in_a_step_as_in_the_record():
    # The record's step reduce-scatters and all-gathers only; every all-reduce of ours (the
    # has-a-gradient flags') is a collective launch it does not pay.
    ours, record = collective_counts()
    assert ours[ALL_REDUCE] <= record[ALL_REDUCE] == 0, f"ours: {ours[ALL_REDUCE]} all-reduces a step"


def test_no_more_compiled_graphs_per_mode_than_the_record_over_the_schedule():
    ours = structure.compiled_graphs()
    assert ours == structure.RECORD_GRAPHS == dict(training=1, validation=1)


def test_no_more_allocations_per_optimizer_step_than_the_record():
    first, *later = structure.allocations(steps=3)
    assert first > later[0] and later == [later[0]] * 2  # the state and buffers, made once
    assert later[0] <= structure.RECORD_ALLOCATIONS
