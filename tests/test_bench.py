"""seg.tools.bench on the CPU at tiny sizes: rows, table and JSON, ratios of medians (fake timings),
the A/A warning, the variants, onnxruntime, and the projections scope. Real timings are not tested."""

import json

import pytest
import torch

from seg.export.onnx import export_onnx
from seg.tools import bench, bench_blocks, bench_models
from seg.tools.bench_models import AA, CA_TORCH, NO_NCHWC
from seg.tools.bench_runners import BenchSetup, ort_session
from seg.tools.complexity import count_flops
from seg.tools.timing import cpu_name, interleaved

TINY = ["--device", "cpu", "--size", "64", "--repeats", "1", "--warmup", "0", "--threads", "1", "--flops-size", "64"]


@pytest.fixture(autouse=True)
def kernels_always(monkeypatch):
    """No calibration may choose PyTorch's ops over the kernels behind these tests' backs."""
    from seg.kernels import calibrate

    monkeypatch.setattr(calibrate, "MODE", "1")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = [*TINY, "--batch", "2", "--steps", "train", "infer", "--variants", "all", "--json", str(out)]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_rows_cover_every_variant_with_plain_as_baseline(result):
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["plain", AA, "SE", "CBAM", "CA", CA_TORCH]
    assert [r["encoder_name"] for r in rows] == ["mobilenet_v2", "mobilenet_v2", "mobilenet_v2_se",
                                                 "mobilenet_v2_cbam", "mobilenet_v2_ca", "mobilenet_v2_ca"]
    assert rows[0]["train_ratio"] == 1.0 and rows[0]["infer_ratio"] == 1.0
    for r in rows:
        assert r["train_ms"] > 0 and r["infer_ms"] > 0 and r["peak_mem_gib"] is None
        assert r["train_img_s"] == pytest.approx(2e3 / r["train_ms"])
        assert r["train_ratio"] == pytest.approx(r["train_ms"] / rows[0]["train_ms"])
    assert result["setup"]["batch"] == 2 and result["setup"]["size"] == 64 and result["setup"]["threads"] == 1


# MobileNetV2's expanded widths at the 16 attention places (t != 1), from the paper's Table 2
HIDDEN = [96, 144, 144, 192, 192, 192, 384, 384, 384, 384, 576, 576, 576, 960, 960, 960]


def _ca_params(c: int) -> int:  # conv1 + bias, BN affine, conv_h + bias, conv_w + bias
    mip = max(8, c // 32)
    return c * mip + mip + 2 * mip + 2 * (mip * c + c)


def _mlp_params(c: int) -> int:  # SE's and CBAM's shared MLP, reduction 20, with biases
    hidden = max(8, c // 20)
    return c * hidden + hidden + hidden * c + c


def test_params_are_plain_plus_the_hand_counted_attention_blocks(result):
    rows = {r["variant"]: r for r in result["rows"]}
    plain = rows["plain"]["params"]
    assert rows[AA]["params"] == plain
    assert rows["CA"]["params"] - plain == sum(map(_ca_params, HIDDEN)) == 445_776
    assert rows[CA_TORCH]["params"] == rows["CA"]["params"]
    assert rows["SE"]["params"] - plain == sum(map(_mlp_params, HIDDEN))
    assert rows["CBAM"]["params"] - plain == sum(_mlp_params(c) + 2 * 7 * 7 + 1 for c in HIDDEN)  # + spatial conv


def test_flops_match_the_complexity_counter(result):
    for r in result["rows"]:
        model = bench_models.build_variant(r["encoder_name"], r["os"])
        assert r["gflops"] == pytest.approx(count_flops(model, (1, 3, 64, 64)) / 1e9)


def test_table_has_one_row_per_variant_and_the_header_names_the_setup(result):
    lines = bench.format_table(result).splitlines()
    assert "cpu, batch 2 at 64x64" in lines[0]
    assert lines[0].endswith(f"CPU: {cpu_name()}") and result["setup"]["cpu"] == cpu_name()  # timings need it
    body = [line.split("|")[1:-1] for line in lines if line.startswith("| mobilenet_v2")]
    assert len(body) == 6 and body[0][-1].strip() == "1.000" and body[0][-2].strip() == "1.000"
    assert all(len(cells[6].split(" / ")) == 3 for cells in body)  # min / median / max
    assert all(cells[10].strip() == "n/a" for cells in body)  # peak memory: CUDA only


def test_ratios_are_of_medians(monkeypatch):
    # plain's medians 0.2 (train) and 0.1 (infer); the outliers 9.0 must not move them
    fake = {"plain": ([0.2, 0.1, 9.0], [0.1, 0.1, 9.0]), AA: ([0.202, 0.2, 0.3], [0.1, 0.11, 0.09]),
            "CA": ([0.21, 9.0, 0.2], [0.12, 0.13, 0.11])}
    monkeypatch.setattr(bench_models, "interleaved", lambda calls, repeats, sync: {
        (name, step): fake[name][step == "infer"] for name, step in calls})
    setup = BenchSetup(batch=2, size=32, repeats=3, warmup=0)
    rows = bench_models.bench_group("mobilenet_v2", 16, setup, "eager", bench_models.pick_variants(
        {"eager": bench_models.VARIANTS}, [AA, "CA"])["eager"])
    ratios = {r["variant"]: (r["train_ratio"], r["infer_ratio"]) for r in rows}
    assert ratios[AA] == pytest.approx((1.01, 1.0)) and ratios["CA"] == pytest.approx((1.05, 1.2))
    assert rows[2]["infer_samples_ms"] == pytest.approx([120, 130, 110])


def _row(variant, train, infer):
    return {"encoder": "e", "os": 16, "mode": "eager", "variant": variant, "train_ratio": train, "infer_ratio": infer}


@pytest.mark.parametrize("aa, warned", [(1.0199, False), (0.9801, False), (1.0201, True), (0.9799, True)])
def test_warns_only_when_aa_is_off_by_more_than_two_percent(aa, warned):
    lines = bench.aa_warnings({"rows": [_row("plain", 1.0, 1.0), _row(AA, None, aa), _row("CA", None, 1.5)]})
    assert bool(lines) == warned
    if warned:
        assert len(lines) == 1 and "e OS 16 eager infer" in lines[0] and "do not quote" in lines[0]


def test_interleaving_runs_each_model_once_per_repeat_in_rotating_order():
    calls = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = interleaved(runners, repeats=3, warmup=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_aa_copy_has_plain_weights_but_is_a_separate_model():
    models = bench_models.build_group("mobilenet_v2", 16, {"plain": bench_models.VARIANTS["plain"],
                                                          AA: bench_models.VARIANTS[AA]}, "cpu")
    plain, copy = models["plain"], models[AA]
    assert plain is not copy
    for (k, a), (_, b) in zip(plain.state_dict().items(), copy.state_dict().items()):
        assert a.data_ptr() != b.data_ptr() and a.equal(b), k


def test_cpu_defaults_time_inference_of_ca_with_and_without_its_kernels(monkeypatch, tmp_path):
    from seg.kernels import cpu

    used = []
    real = cpu.kernels_for
    # CA itself and the fused MobileNetV2 block both ask, each in its own module
    for module in ("seg.kernels.fast_attention", "seg.kernels.fast_block"):
        monkeypatch.setattr(f"{module}.cpu_kernels_for", lambda x: used.append(real(x) is not None) or real(x))
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--size", "32", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["plain", AA, "CA", CA_TORCH]
    assert all(r["train_ms"] is None and r["infer_ms"] > 0 for r in rows) and rows[0]["encoder"] == "mobilenet_v2"
    # 16 CA blocks per call, (3 warm-up + 1 timed) calls each of CA and CA_TORCH: CA gets the kernels
    # once per block (the fused block); CA_TORCH is refused twice (the fused block, then CA itself)
    assert sorted(used) == [False] * 128 + [True] * 64


@pytest.mark.parametrize("argv, message", [
    (["--steps", "train"], "--batch must be >= 2 to train"),
    (["--size", "8"], "--size must be >= 32"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--variants", "CA fused"], "unknown variants \\['CA fused'\\]"),  # Triton cannot run on plain CPU tensors
    (["--modes", "graphs"], "mode 'graphs' \\(CUDA graphs\\) needs --device cuda"),
])
def test_bad_requests_are_refused_in_one_line_before_any_work(argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(["--device", "cpu", *argv])


def test_bad_output_stride_is_refused():
    with pytest.raises(ValueError, match="output stride"):
        bench_models.run_bench(BenchSetup(), encoders=("mobilenet_v2",), output_strides=(32,))


def test_variants_pick_rows_with_plain_first(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main([*TINY, "--encoders", "mobilenet_v2", "--variants", "CA", AA, "--json", str(out)]) == 0
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["plain", "CA", AA]


@pytest.mark.parametrize("without_nchwc", [False, True])
def test_ort_session_can_switch_the_nchwc_layout_off(tmp_path, without_nchwc):
    import onnx

    export_onnx(bench_models.build_variant("mobilenet_v2_ca", 16).eval(), tmp_path / "ca.onnx", 32, 32)
    ort_session(tmp_path / "ca.onnx", 1, without_nchwc, optimized_path=tmp_path / "optimized.onnx")
    ops = {node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert ("ReorderInput" in ops) != without_nchwc


def test_both_backends_share_the_table_and_onnxruntime_adds_its_nchwc_twins(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "b.json"
    argv = ["--device", "cpu", "--size", "32", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--backend", "both", "--ort-without-nchwc", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["variant"]) for r in rows] == [
        *(("eager", v) for v in ("plain", AA, "CA", CA_TORCH)),
        *(("onnxruntime", v) for v in ("plain", "plain" + NO_NCHWC, AA, "CA", "CA" + NO_NCHWC))]
    assert all(r["infer_ms"] > 0 and r["train_ms"] is None for r in rows)


def test_projections_scope_times_what_computes_the_plain_projection(capsys):
    assert len(bench_blocks._unit_gate_blocks(32)) == 16
    times = bench_blocks.projection_times(size=32, threads=1, repeats=2)  # checks fused == conv before timing
    assert set(times) == {"conv", bench_blocks.AA, "fused"} and all(len(v) == 2 and min(v) > 0 for v in times.values())
    assert bench.main(["--scope", "projections", "--size", "32", "--repeats", "1", "--threads", "1"]) == 0
    assert "16 pw-linear projections at 32x32, 1 threads" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--device", "cuda", "--scope", "block"], ["--device", "cpu", "--scope", "tiles"]])
def test_kernel_scopes_need_a_gpu(argv):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("this checks the refusal on a machine without CUDA")
    with pytest.raises(SystemExit, match=f"--scope {argv[3]} needs a CUDA GPU \\(--device {argv[1]};"):
        bench.main(argv)


def test_report_on_cuda_without_a_gpu_is_one_error_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the refusal on a machine without CUDA")
    from seg.tools import report

    assert report.main(["--out", str(tmp_path / "r"), "--device", "cuda", "--smoke"]) == 2
    assert capsys.readouterr().err == "error: device 'cuda' asked for, but this machine has no CUDA GPU; use cpu\n"
    assert not (tmp_path / "r").exists()


def test_pipeline_scope_times_each_input_against_bare_decode_with_an_aa(capsys, tmp_path):
    from seg.tools import bench_pipeline

    results = bench_pipeline.pipeline_times(crop=32, repeats=2, sizes={"voc": (48, 40), "cityscapes": (64, 32)})
    assert list(results) == ["VOC-sized 48x40 jpg", "Cityscapes-sized 64x32 png"]
    assert [r["images"] for r in results.values()] == [16, 4]
    for r in results.values():
        assert set(r["seconds"]) == {"pipeline", "plain", "plain A/A"}
        assert all(len(v) == 2 and min(v) > 0 for v in r["seconds"].values())
    before = torch.get_num_threads()
    assert bench.main(["--scope", "pipeline", "--repeats", "1", "--size", "64"]) == 0
    assert torch.get_num_threads() == before  # the worker's single thread was this scope's only
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| VOC") or
            line.startswith("| Cityscapes")]
    assert len(rows) == 2 and all(len(row.strip("|").split("|")) == 6 for row in rows)


def test_checkpoint_scope_times_the_streamed_write_against_in_memory_with_an_aa(capsys):
    assert bench.main(["--scope", "checkpoint", "--encoders", "mobilenet_v2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "last.pt of DeepLabV3 mobilenet_v2 + AdamW state" in out and cpu_name() in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "median" not in line]
    assert [r[0].lstrip("| ") for r in rows] == ["streamed", "in memory", "in memory A/A"]
    assert rows[1][2] == "1.000 |" and all(float(r[1]) > 0 for r in rows)
