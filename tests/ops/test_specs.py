"""doe_ext.ops.specs covers every op: a sample call of each raw and public op (what the self-test, the
fake-check test and the raw-argument fuzzing read) and a benchmark shape per device kind (what
benchmarks/bench_<op>.py reads)."""
from pathlib import Path

import pytest
import torch

from doe_ext import ops
from doe_ext.ops.specs import BENCH_SHAPES, PUBLIC_OPS, RAW_OPS, bench_shape, public_call, raw_call

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def test_every_registered_op_has_a_spec():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("doe_ext::")}
    registered = {n for n in registered if not n.startswith("_")}  # the check ops and _build_config
    assert registered == set(RAW_OPS)
    assert set(PUBLIC_OPS) | {"lora_merge_", "RouterStats"} == set(ops.__all__)


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_every_public_op_has_a_call_and_a_benchmark_shape_its_benchmark_reads(op):
    getattr(ops, op)(**public_call(op))  # a valid call
    fields, _ = BENCH_SHAPES[op]
    for device in ("cpu", "cuda:0"):
        assert len(bench_shape(op, device)) == len(fields.split(", ")), (op, device)
    assert f'bench_shape("{op}", device)' in (BENCHMARKS / f"bench_{op}.py").read_text()


@pytest.mark.parametrize("op", RAW_OPS)
def test_every_raw_op_has_a_valid_call(op):
    getattr(torch.ops.doe_ext, op)(*raw_call(op).values())
