"""Check every op of this install on your device: ``python -m doe_ext.selftest [--device cuda] [--dtype ...]``.

For each public op, against its plain-PyTorch twin (:mod:`doe_ext.reference`) on that device and
dtype: the values and the gradients, on its sample call and on every case of its table (odd and
empty sizes; sliced, strided and transposed layouts); then ``gradcheck`` in float64 on the CPU (the
contract has no float64 on CUDA); then ``torch.library.opcheck`` of every raw op (``torch.ops.doe_ext.*``, forwards and
backwards) and bad inputs of each kind (None, a meta tensor, another dtype, an id out of range),
each of which must raise an error that names the argument. Prints one row per check and exits 1 on
any failure. The inputs, cases and bad inputs are the specs of :mod:`doe_ext.ops.specs`.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from collections.abc import Callable

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def close_to_reference(actual: torch.Tensor, ref_same_dtype: torch.Tensor, ref_f64: torch.Tensor,
                       name: str = "") -> None:
    """float32/float64: ``torch.testing.assert_close`` against the twin in the same dtype.
    float16/bfloat16 (flash-attention's rule): the op's error against the float64 twin is at most
    2x the twin's own error in that dtype, plus a small floor for outputs the twin gets exactly."""
    if actual.dtype in LOW_PRECISION:
        assert actual.shape == ref_f64.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(ref_f64.shape)}"
        if actual.numel() == 0:
            return
        err = (actual.double() - ref_f64.double()).abs().max().item()
        ref_err = (ref_same_dtype.double() - ref_f64.double()).abs().max().item()
        floor = 1e-3 * max(ref_f64.abs().max().item(), 1.0)
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x reference's {ref_err:.3g} (+{floor:.1g})"
    else:
        torch.testing.assert_close(actual, ref_same_dtype, msg=lambda m: f"{name}: {m}")


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in (x if isinstance(x, (tuple, list)) else (x,)) if isinstance(t, torch.Tensor)]


# Floating arguments the ops take no gradient for: the router's eps, expert_loss's soft target.
NO_GRAD = ("noise", "target")


def _leaves(args: dict, dtype: torch.dtype | None = None) -> dict:
    """Fresh copies of ``args``: floating tensors (in ``dtype`` when given) become leaves needing grad,
    except those of :data:`NO_GRAD`."""
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype or v.dtype, copy=True).requires_grad_(k not in NO_GRAD)
        out[k] = v
    return out


def _run(fn: Callable, args: dict):
    """Outputs of ``fn(**args)``, and the gradients w.r.t. the leaves of sum_i <out_i, w_i>, with
    weights w_i drawn from a fixed seed for the outputs' shapes (the same for every dtype)."""
    outs = _tensors(fn(**args))
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights) if o.is_floating_point())
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return outs, torch.autograd.grad(loss, leaves, allow_unused=True)


def check_values_and_gradients(op: str, device: str, dtype: torch.dtype, args: dict | None = None) -> str:
    """The op's outputs and its inputs' gradients against the twin's, in ``dtype`` and in float64, on
    ``args`` (default: the op's sample call)."""
    from doe_ext import ops, reference
    from doe_ext.ops.specs import public_call

    fn, twin = getattr(ops, op), getattr(reference, f"{op}_ref")
    args = public_call(op, device, dtype) if args is None else args
    got, got_g = _run(fn, _leaves(args))
    same, same_g = _run(twin, _leaves(args))
    f64, f64_g = _run(twin, _leaves(args, torch.float64))
    for i, (a, b, c) in enumerate(zip(got, same, f64)):
        close_to_reference(a, b, c, f"{op} output {i}")
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in NO_GRAD]
    for name, a, b, c in zip(names, got_g, same_g, f64_g):
        assert (a is None) == (b is None), f"{op}: a gradient for `{name}` only in one of op / twin"
        if a is not None:
            close_to_reference(a, b, c, f"{op} grad of {name}")
    return f"{len(got)} output(s), {sum(a is not None for a in got_g)} gradient(s)"


def check_cases(op: str, device: str, dtype: torch.dtype) -> str:
    """:func:`check_values_and_gradients` on every case of the op's table (:data:`doe_ext.ops.specs.CASES`:
    odd and empty sizes, sliced, strided and transposed layouts), drawn from a fixed seed."""
    from doe_ext.ops import specs

    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        for name in specs.CASES[op]:
            try:
                check_values_and_gradients(op, device, dtype, specs.make_case(op, name, device, dtype))
            except AssertionError as e:
                raise AssertionError(f"case {name}: {e}") from e
    return f"{len(specs.CASES[op])} cases"


def check_lora_merge_inplace(device: str, dtype: torch.dtype) -> str:
    """``lora_merge_`` (in place, no autograd) against the twin."""
    from doe_ext import ops, reference
    from doe_ext.ops.specs import public_call

    a = public_call("lora_merge", device, dtype)
    w = a["weight"].clone()
    ops.lora_merge_(w, a["lora_a"], a["lora_b"], a["scales"])
    f64 = {k: v.double() for k, v in a.items()}
    close_to_reference(w, reference.lora_merge_ref(**a), reference.lora_merge_ref(**f64), "lora_merge_")
    return "in place"


def check_gradcheck(op: str) -> str:
    """``torch.autograd.gradcheck`` in float64 on the CPU (no padding row: it gets no gradient by design)."""
    from doe_ext import ops
    from doe_ext.ops.specs import public_call

    args = public_call(op, "cpu", torch.float64)
    args = _leaves({**args, "padding_idx": None} if "padding_idx" in args else args)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def f(*xs):
        return tuple(_tensors(getattr(ops, op)(**{**args, **dict(zip(names, xs))})))

    torch.autograd.gradcheck(f, [args[k] for k in names], eps=1e-6, atol=1e-5)
    return f"{len(names)} input(s)"


def check_opcheck(raw_op: str, device: str, dtype: torch.dtype) -> str:
    """``torch.library.opcheck`` of a raw op: schema, fake kernel, autograd registration, AOT dispatch."""
    from doe_ext.ops.specs import raw_call

    torch.library.opcheck(getattr(torch.ops.doe_ext, raw_op).default, tuple(raw_call(raw_op, device, dtype).values()))
    return "ok"


def check_bad_inputs(raw_op: str, device: str, dtype: torch.dtype) -> str:
    """Each bad input of the raw op (:func:`doe_ext.ops.specs.bad_inputs`) must raise an error naming its argument."""
    from doe_ext.ops import specs

    n = 0
    for what, call, name in specs.bad_inputs(raw_op, device, dtype):
        try:
            call()
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            assert re.search(rf"`{re.escape(name)}`", str(e)), f"{what}: the error does not name `{name}`: {e}"
            n += 1
            continue
        raise AssertionError(f"{what}: accepted")
    return f"{n} refused by name"


def checks(device: str, dtype: torch.dtype) -> list[tuple[str, str, Callable[[], str]]]:
    """``(op, check, run)`` for every check of this device and dtype."""
    from doe_ext.ops.specs import CPU_ONLY_OPS, PUBLIC_OPS, RAW_OPS

    raw_ops = [op for op in RAW_OPS if torch.device(device).type == "cpu" or op not in CPU_ONLY_OPS]
    out = [(op, "values + gradients", lambda op=op: check_values_and_gradients(op, device, dtype)) for op in PUBLIC_OPS]
    out += [(op, "cases + layouts", lambda op=op: check_cases(op, device, dtype)) for op in PUBLIC_OPS]
    out.append(("lora_merge_", "values", lambda: check_lora_merge_inplace(device, dtype)))
    out += [(op, "opcheck", lambda op=op: check_opcheck(op, device, dtype)) for op in raw_ops]
    out += [(op, "bad inputs", lambda op=op: check_bad_inputs(op, device, dtype)) for op in raw_ops]
    return out


def run(device: str = "cpu", dtypes: tuple[torch.dtype, ...] = (torch.float32,), verbose: bool = False,
        stream=None) -> list[dict]:
    """Every check on ``device`` for each dtype; prints a table to ``stream`` and returns its rows
    (``ok`` False where a check failed, with the error in ``detail``)."""
    import doe_ext

    stream = stream or sys.stdout

    info = doe_ext.build_info()
    print(f"doe_ext {doe_ext.__version__}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if torch.device(device).type == "cuda" else "")
          + f", build {info}", file=stream)
    from doe_ext.ops.specs import PUBLIC_OPS

    rows = []
    once = [(op, "gradcheck (cpu)", lambda op=op: check_gradcheck(op)) for op in PUBLIC_OPS]
    for dtype, todo in [(d, checks(device, d)) for d in dtypes] + [(torch.float64, once)]:
        for op, what, fn in todo:
            t0 = time.perf_counter()
            try:
                detail, ok = fn(), True
            except Exception as e:  # noqa: BLE001 - a failed check is a row of the table, not a crash
                detail, ok = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", False
                if verbose:
                    traceback.print_exc(file=stream)
            rows.append(dict(op=op, check=what, dtype=str(dtype).removeprefix("torch."), ok=ok, detail=detail,
                             seconds=round(time.perf_counter() - t0, 3)))
    width = max(len(r["op"]) for r in rows)
    print(f"{'op':{width}}  {'dtype':8}  {'check':18}  result", file=stream)
    for r in rows:
        print(f"{r['op']:{width}}  {r['dtype']:8}  {r['check']:18}  {'ok  ' if r['ok'] else 'FAIL'}  {r['detail']}",
              file=stream)
    bad = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - bad} of {len(rows)} checks passed" + (f"; {bad} FAILED" if bad else ""), file=stream)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m doe_ext.selftest", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", action="append", choices=list(DTYPES),
                   help="repeat for several (default: float32; the CPU also takes float64)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of each failure")
    a = p.parse_args(argv)
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: this torch sees no CUDA device")
    dtypes = tuple(DTYPES[d] for d in (a.dtype or ["float32"]))
    rows = run(a.device, dtypes, verbose=a.verbose)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
