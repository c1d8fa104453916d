"""The CUDA-graph emulation on CPU tensors (runtime/graph_emulation.py) and CudaGraphs over it.

Every replay is checked against the same work run eagerly on the same inputs (bit for bit: the same
kernels on the same values), after the inputs changed since the capture, so a replay that merely kept the
capture's values fails. The refusals are checked by the operator their error names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch

from sdxl_trt.runtime.graph_emulation import EmulatedGraph, GraphCaptureError, graph
from sdxl_trt.runtime.graphs import WARMUP_RUNS, CudaGraphs, graph_mode


def _captured(work: Callable[[], None], generators: tuple[torch.Generator, ...] = ()) -> EmulatedGraph:
    g = EmulatedGraph()
    for gen in generators:
        g.register_generator_state(gen)
    with graph(g):
        work()
    return g


def _same_as_eager(work: Callable[[], None], inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                   change: Callable[[], None]) -> None:
    """Capture ``work``, change the inputs, then: a replay writes what eager ``work`` writes (twice over, so
    state carried from one replay to the next counts too)."""
    g = _captured(work)
    for _ in range(2):
        change()
        start = [t.clone() for t in inputs + outputs]
        for _ in range(2):
            work()
        eager = [t.clone() for t in outputs]
        for t, s in zip(inputs + outputs, start, strict=True):
            t.copy_(s)
        for _ in range(2):
            g.replay()
        for got, want in zip(outputs, eager, strict=True):
            assert torch.equal(got, want), (got, want)


def test_views_stay_views_of_their_bases() -> None:
    """Slices, expand, unbind, view and .float() on float32 (which returns the tensor itself) read and write the
    base's memory on replay, including views of tensors the capture itself made."""
    x = torch.randn(4, 6)
    scale = torch.randn(6)
    out = torch.zeros(4, 6)
    acc = torch.zeros(2, 6)

    def work() -> None:
        y = x * 2  # made by the capture
        top, bottom = y[:2], y[2:]  # views of it
        first, *_ = scale.view(2, 3).unbind(1)  # views of an input
        out[:2].copy_(top * scale.expand(2, 6))
        out[2:].copy_(bottom.float() + first.sum())  # .float() of float32: no operator at all
        acc.add_(out.view(2, 12)[:, :6])  # in place through a view

    _same_as_eager(work, [x, scale], [out, acc], lambda: (x.normal_(), scale.normal_()))


def test_in_place_out_and_tuple_results() -> None:
    x = torch.randn(3, 5)
    buf = torch.empty(3, 5)
    values = torch.zeros(5)
    stats = torch.zeros(3, 2)

    def work() -> None:
        torch.mul(x, 3.0, out=buf)  # out=: writes buf
        buf.sub_(1.0).abs_()
        v, i = torch.max(buf, dim=0)  # a tuple of new tensors
        values.copy_(v + i.float())
        _, mean, rstd = torch.ops.aten.native_layer_norm(buf, [5], None, None, 1e-5)
        stats[:, 0].copy_(mean.squeeze(1))
        stats[:, 1].copy_(rstd.squeeze(1))
        for k, part in enumerate(torch.split(buf, 2, dim=1)):  # a list of views
            stats[:, k % 2].add_(part.sum(1))

    _same_as_eager(work, [x], [buf, values, stats], lambda: x.normal_())


def test_a_device_step_index_advances_and_index_select_reads_it() -> None:
    """The runtime's pattern: per-step rows gathered with index_select on a device index incremented in place."""
    table = torch.randn(8, 3)
    step = torch.zeros((), dtype=torch.int64)
    x = torch.randn(3)

    def work() -> None:
        a, b, c = table.index_select(0, step.reshape(1)).squeeze(0).unbind()
        x.copy_(x * a + b - c)
        step.add_(1)

    g = _captured(work)
    for steps in (3, 5):
        step.zero_()
        x0 = x.clone()
        for _ in range(steps):
            work()
        eager = x.clone()
        x.copy_(x0)
        step.zero_()
        for _ in range(steps):
            g.replay()
        assert torch.equal(x, eager) and int(step) == steps


def test_host_values_are_frozen_at_capture() -> None:
    """A Python counter, a float and a shape read at capture stay as they were: replays differ from eager."""
    table = torch.arange(10, dtype=torch.float32)
    out = torch.zeros(())
    host = {"i": 0, "gain": 1.0}

    def work() -> None:
        out.copy_(table[host["i"]] * host["gain"])  # select with a Python int, mul by a Python float
        host["i"] += 1  # Python arithmetic: not in the graph

    g = _captured(work)
    host.update(i=4, gain=2.0)
    work()
    assert float(out) == 8.0 and host["i"] == 5  # eager reads the host values of now
    g.replay()
    g.replay()
    assert float(out) == 0.0 and host["i"] == 5  # the replay: row 0, gain 1, and no counting


def test_work_outside_torch_is_absent_on_replay() -> None:
    """numpy writing a tensor's memory (as ONNX Runtime writes its bound outputs) ran at capture only."""
    host = np.zeros(3, dtype=np.float32)
    shared = torch.from_numpy(host)  # the same memory
    src = torch.ones(3)
    out = torch.zeros(3)

    def work() -> None:
        host[:] = 7.0  # numpy: no aten call
        out.copy_(shared + src)

    g = _captured(work)
    host[:] = 0.0
    src.fill_(2.0)
    g.replay()
    assert out.tolist() == [2.0, 2.0, 2.0]  # torch's add ran again; numpy's write did not
    work()
    assert out.tolist() == [9.0, 9.0, 9.0]


@pytest.mark.parametrize(("what", "work", "operator"), [
    ("item", lambda x: x.sum().item(), "aten._local_scalar_dense"),
    ("float", lambda x: float(x.sum()), "aten._local_scalar_dense"),
    ("bool", lambda x: bool(x.sum() > 0), "aten._local_scalar_dense"),
    ("equal", lambda x: torch.equal(x, x), "aten.equal"),
    ("tolist", lambda x: x.tolist(), ".tolist()"),
    ("numpy", lambda x: x.numpy(), ".numpy()"),
    ("asarray", lambda x: np.asarray(x), "numpy.asarray()"),
    ("cpu", lambda x: x.cpu(), ".cpu()"),
    ("nonzero", lambda x: x.nonzero(), "aten.nonzero"),
    ("masked_select", lambda x: x.masked_select(x > 0), "aten.masked_select"),
    ("unique", lambda x: torch.unique(x), "aten._unique2"),
    ("boolean_index", lambda x: x[x > 0], "aten.index.Tensor"),
    ("repeat_interleave", lambda x: torch.repeat_interleave(x, torch.tensor([1, 2, 1, 0])), "aten.repeat_interleave"),
    ("default_generator", lambda x: torch.randn(4), "aten.randn"),
    ("default_generator_in_place", lambda x: x.clone().normal_(), "aten.normal_"),
    ("foreign_generator", lambda x: torch.rand(4, generator=torch.Generator().manual_seed(1)), "aten.rand"),
    ("resize", lambda x: x.clone().resize_(2), "aten.resize_"),
    ("squeeze_in_place", lambda x: x.clone().unsqueeze_(0), "aten.unsqueeze_"),
])
def test_capture_refuses_what_a_cuda_capture_cannot_hold(what: str, work: Callable[[torch.Tensor], object],
                                                         operator: str) -> None:
    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    with pytest.raises(GraphCaptureError, match="issued at tests/test_graph_emulation.py") as err:
        with graph(EmulatedGraph()):
            work(x)
    assert operator in str(err.value), err.value


def test_integer_indexing_and_a_sized_repeat_are_captured() -> None:
    """The data-dependent refusals are not blanket refusals of the operators that can be data-dependent."""
    x = torch.randn(5)
    idx = torch.tensor([4, 0, 2])
    out = torch.zeros(3)
    out2 = torch.zeros(4)

    def work() -> None:
        out.copy_(x[idx])
        out2.copy_(torch.repeat_interleave(x[:2], torch.tensor([1, 3]), output_size=4))

    _same_as_eager(work, [x], [out, out2], lambda: x.normal_())


def test_the_error_names_the_first_frame_of_the_project() -> None:
    from sdxl_trt.runtime.images import to_uint8

    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(GraphCaptureError, match=r"\.cpu\(\).* issued at runtime/batch\.py:\d+ in _to_pil"):
        with graph(EmulatedGraph()):
            from sdxl_trt.runtime.batch import _to_pil

            _to_pil(to_uint8(x))


def test_an_owned_generator_draws_anew_on_each_replay() -> None:
    gen = torch.Generator().manual_seed(0)
    out = torch.zeros(2, 3)
    g = _captured(lambda: out.copy_(torch.randn(2, 3, generator=gen)), generators=(gen,))
    gen.manual_seed(11)
    ref = torch.Generator().manual_seed(11)
    for _ in range(2):
        g.replay()
        assert torch.equal(out, torch.randn(2, 3, generator=ref))


def test_an_escaping_allocation_is_refused() -> None:
    """A tensor the capture allocated and something still holds afterwards: a replay would overwrite it."""
    x = torch.randn(4)
    kept: list[torch.Tensor] = []

    with pytest.raises(GraphCaptureError, match=r"1 tensor\(s\) allocated during the capture are still alive.*"
                                                r"aten\.mul\.Tensor at tests/test_graph_emulation\.py"):
        with graph(EmulatedGraph()):
            kept.append(x * 2)
    kept.clear()

    class Holder:
        cache: torch.Tensor | None = None

    holder = Holder()
    with pytest.raises(GraphCaptureError, match="still alive"):
        with graph(EmulatedGraph()):
            holder.cache = (x + 1)[1:]  # a view of new memory escapes as much as the memory itself


def test_what_is_not_an_escape() -> None:
    """Views of tensors that existed before the capture may outlive it; a reference cycle that only the
    garbage collector would free is no escape either."""
    x = torch.randn(4)
    out = torch.zeros(4)
    views: list[torch.Tensor] = []

    def work() -> None:
        views.append(out[:2])
        cycle: list[object] = [x * 3]
        cycle.append(cycle)
        out.copy_(cycle[0])  # type: ignore[arg-type]

    g = _captured(work)
    x.fill_(1.0)
    g.replay()
    assert out.tolist() == [3.0] * 4 and views[0].tolist() == [3.0, 3.0]


def test_captures_do_not_nest_and_replay_needs_a_finished_capture() -> None:
    x = torch.zeros(2)
    with pytest.raises(GraphCaptureError, match="already under way"):
        with graph(EmulatedGraph()):
            with graph(EmulatedGraph()):
                x.add_(1)
    with pytest.raises(GraphCaptureError, match="before the capture ended"):
        EmulatedGraph().replay()
    g = _captured(lambda: x.add_(1))  # a refused capture left no recorder behind
    g.replay()
    assert x.tolist() == [2.0, 2.0]


# ---------------------------------------------------------------------------------------------- CudaGraphs
def test_emulation_is_never_chosen_silently(caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    assert not CudaGraphs(cpu, enabled=True).enabled  # the default on the CPU: no graphs
    with caplog.at_level(logging.WARNING, logger="sdxl_trt.runtime.graphs"):
        graphs = CudaGraphs(cpu, enabled=True, emulate=True)
    assert graphs.enabled and graphs.emulated and "emulated" in caplog.text
    assert not CudaGraphs(cpu, enabled=False, emulate=True).enabled
    with pytest.raises(ValueError, match="emulated on the CPU only"):
        CudaGraphs(torch.device("cuda", 0), enabled=True, emulate=True)
    assert graph_mode(None, True) == "on" and graph_mode(None, False) == "off"
    assert graph_mode("emulate", True) == "emulate"
    with pytest.raises(ValueError, match="contradicts"):
        graph_mode("emulate", False)
    with pytest.raises(ValueError, match="one of on, off, emulate"):
        graph_mode("cpu", True)


def test_cuda_graphs_keys_pool_warmup_and_capture_rules_when_emulated(caplog: pytest.LogCaptureFixture) -> None:
    graphs = CudaGraphs(torch.device("cpu"), enabled=True, emulate=True)
    x = torch.zeros(3)
    runs: list[int] = []

    def work() -> None:
        runs.append(1)
        x.add_(1)

    assert graphs.get("ort", work, graph_safe=False, mutable=[x]) is None and runs == []  # graph_safe keeps it out
    first = graphs.get("step", work, graph_safe=True, mutable=[x])
    assert first is not None and len(runs) == WARMUP_RUNS + 1  # warm-up runs, then the capture
    assert x.tolist() == [0.0] * 3  # capture and warm-up left the state as it was
    assert graphs.get("step", work, graph_safe=True, mutable=[x]) is first  # one graph per key
    other = graphs.get("text", lambda: x.mul_(2), graph_safe=True, mutable=[x])
    assert other is not None and first.pool() == other.pool() == graphs.pool  # one shared pool
    first.replay()
    first.replay()
    assert x.tolist() == [2.0] * 3 and len(runs) == WARMUP_RUNS + 1  # the Python work did not run again
    graphs.forbid_capture()
    with caplog.at_level(logging.WARNING, logger="sdxl_trt.runtime.graphs"):
        assert graphs.get("late", work, graph_safe=True, mutable=[x]) is None
        assert graphs.get("late", work, graph_safe=True, mutable=[x]) is None
    assert caplog.text.count("no CUDA graph was captured") == 1
    assert graphs.stats() == {"graphs": 2, "pool_bytes": 0, "emulated": True}


def test_a_refused_capture_restores_the_state_and_keeps_no_graph() -> None:
    graphs = CudaGraphs(torch.device("cpu"), enabled=True, emulate=True)
    x = torch.zeros(2)

    def work() -> None:
        x.add_(1)
        float(x.sum())

    with pytest.raises(GraphCaptureError, match="aten._local_scalar_dense"):
        graphs.get("bad", work, graph_safe=True, mutable=[x])
    assert x.tolist() == [0.0, 0.0] and graphs.graphs == {}
