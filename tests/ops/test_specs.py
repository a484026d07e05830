"""doe_ext.ops.specs covers every op: a sample call of each raw and public op (what the self-test, the
fake-check test and the raw-argument fuzzing read), each public op's table of cases (what its tests and
the self-test read), each raw op's bad inputs, and a benchmark shape per device kind (what
benchmarks/bench_<op>.py reads)."""
from pathlib import Path

import pytest
import torch

from doe_ext import ops
from doe_ext.ops.specs import (BENCH_SHAPES, CASES, PUBLIC_OPS, RAW_OPS, bad_inputs, bench_shape, make_case,
                               public_call, randn_layout, raw_call, schema_arguments)

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


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_every_case_is_a_valid_call_in_the_layout_it_names(op):
    assert set(CASES) == set(PUBLIC_OPS)
    for name, fields in CASES[op].items():
        args = make_case(op, name)
        getattr(ops, op)(**args)  # a valid call
        tensors = [v for v in args.values() if isinstance(v, torch.Tensor)]
        layouts = {f for f in fields if f in ("contiguous", "row-slice", "strided", "transposed", "strided-x")}
        assert len(layouts) == 1, (op, name, fields)
        # a case that names a layout hands the op a tensor that is not contiguous
        assert any(not t.is_contiguous() for t in tensors) == (layouts != {"contiguous"}), (op, name)


@pytest.mark.parametrize("layout", ["row-slice", "strided", "transposed"])
def test_randn_layout_gives_the_layout_it_names(layout):
    t = randn_layout((3, 4, 5), layout, scale=3.0)
    assert t.shape == (3, 4, 5) and not t.is_contiguous()
    assert (t.stride(-1) == 1) == (layout == "row-slice")
    assert t.std() > 1.5  # scaled before the view: a scale after it would copy into a contiguous tensor


def test_make_case_names_what_it_does_not_know():
    with pytest.raises(KeyError, match="no public op 'lora'; expected one of knowledge_attention"):
        make_case("lora", "E1-r1")
    with pytest.raises(KeyError, match="lora_merge has no case 'E9'; expected one of E1-r1"):
        make_case("lora_merge", "E9")
    with pytest.raises(ValueError, match="unknown `layout` 'diagonal'"):
        randn_layout((2, 3), "diagonal")


@pytest.mark.parametrize("op", RAW_OPS)
def test_every_raw_op_has_bad_inputs_that_name_a_tensor_argument(op):
    cases = list(bad_inputs(op))
    tensors = {name for name, ty in schema_arguments(op) if ty.startswith("Tensor")}
    assert cases and {name for _, _, name in cases} <= tensors, op
