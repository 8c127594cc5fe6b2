"""parallel.grouped_gemm and parallel.router_dtype (issue 23, Speed parts 4-6), pure torch, no Ray.

GroupedExperts' grouped path (torch's grouped_mm) against its loop over experts: outputs and the gradients of the
input and of every weight, zero-token experts and uneven counts included; float64 falls back to the loop. The
router's float32 logits under bf16 autocast, for the native Router and for transformers' routers. transformers'
own grouped_mm experts implementation against its eager one, through ExpertParallelExperts."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from orchestrator.config import ModelConfig
from orchestrator.model.layers import grouped_mm_supported
from orchestrator.model.moe import GroupedExperts, Router
from tests.hf_tiny import KINDS, tiny_hf_config

COUNTS = [0, 7, 1, 0, 23, 3, 0, 14]   # zero-token experts first, middle and last; uneven


def _experts(dtype=torch.float32, limit: float = 0.0, dim: int = 16, hidden: int = 32) -> GroupedExperts:
    torch.manual_seed(0)
    e = GroupedExperts(dim, hidden, range(len(COUNTS)), swiglu_limit=limit)
    with torch.no_grad():
        for p in e.parameters():
            p.normal_(0, 0.3)
    return e.to(dtype)


def _run(e: GroupedExperts, x_MD: torch.Tensor, counts, grouped: bool, autocast: torch.dtype | None = None):
    """(output, grad of x, grads of w1, w3, w2) of sum(y * g) for a fixed g, so every gradient is non-trivial."""
    e.grouped = grouped
    e.zero_grad(set_to_none=True)
    x = x_MD.detach().clone().requires_grad_()
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        y = e(x, counts)
    g = torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)
    (y * g).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in (e.w1_EFD, e.w3_EFD, e.w2_EDF)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("limit", [0.0, 0.5])
@pytest.mark.parametrize("recompute", [False, True])
def test_grouped_equals_the_loop_in_float32(limit, recompute):
    e = _experts(limit=limit)
    e.recompute = recompute
    x = torch.randn(sum(COUNTS), 16)
    loop = _run(e, x, COUNTS, grouped=False)
    e.grouped = True
    assert e.uses_grouped_mm(x)
    for counts in (COUNTS, torch.tensor(COUNTS)):   # a list, or a counts tensor read on the device
        grouped = _run(e, x, counts, grouped=True)
        for a, b in zip(grouped, loop):
            assert a.dtype == b.dtype and _rel(a, b) < 1e-6
    assert not grouped[2][0].any() and not grouped[4][3].any()   # experts without tokens: zero gradient


@pytest.mark.parametrize("how", ["bf16 weights", "bf16 autocast"])
def test_grouped_equals_the_loop_in_bfloat16(how):
    weights = torch.bfloat16 if how == "bf16 weights" else torch.float32
    autocast = torch.bfloat16 if how == "bf16 autocast" else None
    e = _experts(weights)
    x = torch.randn(sum(COUNTS), 16).to(weights)
    loop = _run(e, x, COUNTS, grouped=False, autocast=autocast)
    grouped = _run(e, x, torch.tensor(COUNTS), grouped=True, autocast=autocast)
    assert grouped[0].dtype == loop[0].dtype == torch.bfloat16
    for a, b in zip(grouped, loop):
        assert a.dtype == b.dtype and _rel(a, b) < 2e-2


def test_float64_falls_back_to_the_loop_exactly():
    assert not grouped_mm_supported("cpu", torch.float64)   # torch's grouped_mm has no float64 kernel
    assert grouped_mm_supported("cpu", torch.float32) and grouped_mm_supported("cpu", torch.bfloat16)
    e = _experts(torch.float64)
    x = torch.randn(sum(COUNTS), 16, dtype=torch.float64)
    assert not e.uses_grouped_mm(x)
    loop = _run(e, x, COUNTS, grouped=False)
    for counts in (COUNTS, torch.tensor(COUNTS)):
        for a, b in zip(_run(e, x, counts, grouped=True), loop):
            assert torch.equal(a, b)


def test_no_rows_at_all_gives_zero_weight_gradients():
    e = _experts()
    out = _run(e, torch.zeros(0, 16), torch.zeros(len(COUNTS), dtype=torch.long), grouped=True)
    assert out[0].shape == (0, 16)
    assert all(g is not None and not g.any() for g in out[2:])


class HostSyncs(TorchDispatchMode):
    """Counts the operations that read a tensor's value on the host (aten._local_scalar_dense: .item(), int(),
    bool(); on a GPU each waits for the device) and the calls of Tensor.tolist (a copy to the host on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original, mode = torch.Tensor.tolist, self

        def tolist(t):
            mode.count += 1
            return original(t)

        self._original = original
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._original
        return super().__exit__(*exc)


def test_the_grouped_path_reads_nothing_on_the_host_when_counts_are_a_tensor():
    e = _experts()
    x, counts = torch.randn(sum(COUNTS), 16), torch.tensor(COUNTS)
    with HostSyncs() as grouped:
        e(x, counts)
    e.grouped = False
    with HostSyncs() as loop:
        e(x, counts)
    assert grouped.count == 0 and loop.count == 1   # the loop splits on the host: one tolist


def _router(score_func: str = "softmax") -> Router:
    torch.manual_seed(1)
    r = Router(32, 16, 4, score_func, norm_topk_prob=True, route_scale=1.0)
    torch.nn.init.normal_(r.gate.weight, std=0.5)
    return r


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_float32_under_bf16_autocast_routes_as_a_float32_forward(score_func):
    r = _router(score_func)
    x = torch.randn(256, 32)
    gates32, experts32, _, logits32 = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, experts, scores, logits = r(x)
    assert logits.dtype == scores.dtype == gates.dtype == torch.float32
    assert torch.equal(experts, experts32) and torch.equal(logits, logits32) and torch.equal(gates, gates32)
    r.dtype = "auto"   # as before: the gate's matmul in bf16, upcast after
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, experts_auto, _, logits_auto = r(x)
        old = r.gate(x).float()
    assert logits_auto.dtype == torch.float32 and torch.equal(logits_auto, old)
    assert not torch.equal(logits_auto, logits32)   # bf16 rounding: the point of float32


def test_router_float32_with_bf16_weights_computes_in_float32():
    r = _router().to(torch.bfloat16)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    logits = r(x)[3]
    assert logits.dtype == torch.float32
    assert torch.equal(logits, x.float() @ r.gate.weight.float().t())


def _hf(kind: str, tmp_path, grouped_gemm: bool = True, router_dtype: str = "float32", expert_ids=None):
    from orchestrator.model.build import apply_parallel_options
    from orchestrator.model.hf import build_hf_model

    path = tmp_path / f"{kind}.json"
    tiny_hf_config(kind).to_json_file(path)
    model = build_hf_model(ModelConfig(hf_config=str(path)), seed=0, expert_ids=expert_ids)
    apply_parallel_options(model, grouped_gemm, router_dtype)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_routers_in_float32_under_bf16_autocast(kind, tmp_path):
    model = _hf(kind, tmp_path)
    seen = []
    hooks = [m.__dict__["_gate"].register_forward_hook(lambda mod, args, out: seen.append((mod, args, out)))
             for m in model.moe_layers()]
    tokens = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens)
    assert seen
    for gate, args, (logits, weights, ids) in seen:
        assert logits.dtype == torch.float32
        with torch.no_grad():   # the class's own forward, float32, no autocast, on the same input
            ref_logits, _, ref_ids = type(gate).forward(gate, *[a.float() if a.is_floating_point() else a
                                                                 for a in args])
        assert torch.equal(ids, ref_ids) and torch.equal(logits, ref_logits)
    for h in hooks:
        h.remove()
    # auto: the class's forward as it is (the gate's matmul in bf16 under autocast)
    from orchestrator.model.hf import use_router_dtype

    use_router_dtype(model, "auto")
    assert all("forward" not in m.__dict__["_gate"].__dict__ for m in model.moe_layers())


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_transformers_grouped_mm_experts_equal_eager(kind, tmp_path):
    tokens = torch.randint(0, 256, (2, 16))
    runs = []
    for grouped in (True, False):
        model = _hf(kind, tmp_path, grouped_gemm=grouped)
        assert model.hf_config._experts_implementation == ("grouped_mm" if grouped else "eager")
        logits = model(tokens)
        logits.pow(2).mean().backward()
        runs.append((logits.detach(), {n: p.grad for n, p in model.expert_parameters()}))
    (a, ga), (b, gb) = runs
    assert _rel(a, b) < 1e-5
    assert ga.keys() == gb.keys() and all(_rel(ga[n], gb[n]) < 1e-5 for n in ga)


class _NoRows:
    """A dispatcher under which this device receives no token copy (expert parallelism, all routed elsewhere)."""

    def dispatch(self, x_ND, slots_NK, num_slots):
        return x_ND[:0], [0, 0], None, None

    def combine(self, y_MD, gates_NK, meta, num_tokens):
        return y_MD.new_zeros(num_tokens, y_MD.shape[-1]) + y_MD.sum()

    def routed(self, x_ND, slots_NK, gates_NK, num_slots, experts_fn, shared_fn=None):
        from orchestrator.model.moe import Routed

        y_MD = experts_fn(x_ND[:0], [0, 0])
        return Routed(x_ND.new_zeros(x_ND.shape) + y_MD.sum(), shared_fn() if shared_fn else None, 0, 0)


def test_transformers_grouped_mm_experts_with_no_rows_get_zero_gradients(tmp_path):
    model = _hf("mixtral", tmp_path, expert_ids=[0, 1])
    assert model.hf_config._experts_implementation == "grouped_mm"
    experts = model.moe_layers()[0]
    experts.dispatcher = _NoRows()
    x = torch.randn(6, 32)
    out = experts(x, torch.zeros(6, 2, dtype=torch.long), torch.full((6, 2), 0.5))
    out.sum().backward()
    assert experts.last_received == 0
    assert all(p.grad is not None and not p.grad.any() for p in experts.parameters(recurse=False))


def test_float64_transformers_model_uses_eager(tmp_path):
    from orchestrator.model.hf import use_grouped_mm

    model = _hf("mixtral", tmp_path).to(torch.float64)
    assert use_grouped_mm(model, True) == "eager" and model.hf_config._experts_implementation == "eager"


def test_build_any_model_applies_the_parallel_keys(tmp_path):
    from orchestrator.config import ParallelConfig
    from orchestrator.model.build import build_any_model
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path)
    for grouped, router in ((True, "float32"), (False, "auto")):
        model = build_any_model(cfg.model, 0, None, cfg.balance, torch.device("cpu"), "float32",
                                parallel=ParallelConfig(grouped_gemm=grouped, router_dtype=router))
        assert all(m.experts.grouped is grouped and m.router.dtype == router for m in model.moe_layers())
