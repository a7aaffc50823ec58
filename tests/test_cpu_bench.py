"""seg.cpu_bench: the A/A control's arithmetic and warning, the interleaving, and a tiny end-to-end run.

Timings themselves are not tested; fake timings with hand-computed ratios are."""

import pytest

from seg import cpu_bench
from seg.timing import interleaved
from seg.export import export_onnx


def _times(plain, copy, ca):
    return {"plain": plain, cpu_bench.AA: copy, "ca": ca}


@pytest.fixture(autouse=True)
def kernels_always(monkeypatch):
    """These tests are about the kernels themselves: no calibration may choose PyTorch's ops instead."""
    from seg.kernels import calibrate

    monkeypatch.setattr(calibrate, "MODE", "1")


def test_tiny_benchmark_prints_both_backends_with_aa_column(capsys):
    cpu_bench.main(["--size", "32", "--threads", "1", "--repeats", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| pytorch", "| onnxruntime"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7 and cells[4].endswith("x") and cells[5].endswith("x")
        assert all(len(cells[i].split(" / ")) == 3 for i in (1, 2, 3))  # min / median / max
    # only eager has the CA-without-CPU-kernels column
    assert rows[0].rstrip(" |").endswith("x") and rows[1].rstrip(" |").endswith("n/a")


def test_ratios_are_of_medians():
    # medians: plain 0.2, copy 0.202, CA 0.21 (the outliers 9.0 must not move them)
    aa, ca = cpu_bench.ratios(_times([0.2, 0.1, 9.0], [0.202, 0.2, 0.3], [0.21, 9.0, 0.2]))
    assert aa == pytest.approx(1.01)
    assert ca == pytest.approx(1.05)


def test_table_shows_spread_and_both_ratios():
    table = cpu_bench.format_table({"pytorch": _times([0.2, 0.19, 0.25], [0.2, 0.2, 0.2], [0.21, 0.21, 0.3])})
    assert ("| pytorch | 190.0 / 200.0 / 250.0 | 200.0 / 200.0 / 200.0 | 210.0 / 210.0 / 300.0 | 1.000x | 1.050x "
            "| n/a |") in table
    with_torch_ops = {**_times([0.2], [0.2], [0.21]), cpu_bench.CA_TORCH: [0.23]}
    assert "| 1.050x | 1.150x |" in cpu_bench.format_table({"pytorch": with_torch_ops})


@pytest.mark.parametrize("copy_median, warned", [(0.2039, False), (0.1961, False), (0.2041, True), (0.1959, True)])
def test_warns_only_when_aa_is_off_by_more_than_two_percent(copy_median, warned):
    results = {"onnxruntime": _times([0.2], [copy_median], [0.21])}
    lines = cpu_bench.aa_warnings(results)
    assert bool(lines) == warned
    if warned:
        assert "onnxruntime" in lines[0] and "do not quote" in lines[0]


def test_interleaving_runs_each_model_once_per_repeat_in_rotating_order():
    calls = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = interleaved(runners, repeats=3, warmup=cpu_bench.WARMUP)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    timed = calls[3 * cpu_bench.WARMUP:]
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_aa_copy_has_plain_weights_but_is_a_separate_model():
    models = cpu_bench._models()
    plain, copy = models["plain"], models[cpu_bench.AA]
    assert plain is not copy
    for (k, a), (_, b) in zip(plain.state_dict().items(), copy.state_dict().items()):
        assert a.data_ptr() != b.data_ptr() and a.equal(b), k


def test_eager_run_times_ca_with_and_without_its_cpu_kernels(monkeypatch):
    from seg.kernels import cpu

    used = []
    real = cpu.kernels_for
    # CA itself and the fused MobileNetV2 block both ask seg.kernels.fast
    monkeypatch.setattr("seg.kernels.fast.cpu_kernels_for", lambda x: used.append(real(x) is not None) or real(x))
    times = cpu_bench.benchmark(size=32, threads=1, repeats=1, backends=("pytorch",))["pytorch"]
    assert set(times) == {"plain", cpu_bench.AA, "ca", cpu_bench.CA_TORCH}
    # 16 CA blocks per call, (3 warm-up + 1 timed) calls each of "ca" and CA_TORCH: "ca" gets the kernels
    # once per block (the fused block); CA_TORCH is refused twice (the fused block, then CA itself)
    assert sorted(used) == [False] * 128 + [True] * 64


def test_projection_check_times_what_computes_the_plain_projection():
    cases = cpu_bench._unit_gate_blocks(32)
    assert len(cases) == 16
    times = cpu_bench.projection_times(size=32, threads=1, repeats=2)  # checks fused == conv before timing
    assert set(times) == {"conv", cpu_bench.AA, "fused"} and all(len(v) == 2 and min(v) > 0 for v in times.values())


@pytest.mark.parametrize("without_nchwc", [False, True])
def test_ort_session_can_switch_the_nchwc_layout_off(tmp_path, without_nchwc):
    import onnx

    export_onnx(cpu_bench._build(cpu_bench.CA), tmp_path / "ca.onnx", 32, 32)
    cpu_bench.ort_session(tmp_path / "ca.onnx", 1, without_nchwc, optimized_path=tmp_path / "optimized.onnx")
    ops = {node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert ("ReorderInput" in ops) != without_nchwc


def test_ort_runs_without_nchwc_are_timed_on_request():
    times = cpu_bench.benchmark(size=32, threads=1, repeats=1, backends=("onnxruntime",), ort_without_nchwc=True)
    assert set(times["onnxruntime"]) == {"plain", cpu_bench.AA, "ca", "plain" + cpu_bench.NO_NCHWC,
                                         "ca" + cpu_bench.NO_NCHWC}
