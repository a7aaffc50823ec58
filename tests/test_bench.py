"""seg.bench on the CPU at a tiny size: table and JSON structure, baseline ratios, parameter counts."""

import json

import pytest

from seg import bench
from seg.complexity import count_flops, count_params


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--device", "cpu", "--batch", "2", "--size", "64", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--encoders", "mobilenet_v2", "--os", "16", "--flops-size", "64", "--json", str(out)]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_rows_cover_every_variant_with_plain_as_baseline(result):
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["plain", bench.AA, "SE", "CBAM", "CA"]
    assert [r["encoder_name"] for r in rows] == ["mobilenet_v2", "mobilenet_v2", "mobilenet_v2_se",
                                                 "mobilenet_v2_cbam", "mobilenet_v2_ca"]
    assert rows[0]["train_ratio"] == 1.0 and rows[0]["infer_ratio"] == 1.0
    for r in rows:
        assert r["train_ms"] > 0 and r["infer_ms"] > 0 and r["peak_mem_gib"] is None
        assert r["train_img_s"] == pytest.approx(2e3 / r["train_ms"])
        assert r["train_ratio"] == pytest.approx(r["train_ms"] / rows[0]["train_ms"])
    assert result["setup"]["batch"] == 2 and result["setup"]["size"] == 64 and result["setup"]["threads"] == 1


def test_params_and_flops_match_the_complexity_counters(result):
    for r in result["rows"]:
        model = bench.build_variant(r["encoder_name"], r["os"])
        assert r["params"] == count_params(model)
        assert r["gflops"] == pytest.approx(count_flops(model, (1, 3, 64, 64)) / 1e9)
    # attention adds weights: every variant but the A/A copy is larger than plain
    plain, aa, *attended = result["rows"]
    assert aa["params"] == plain["params"] and all(r["params"] > plain["params"] for r in attended)


def test_table_has_one_row_per_variant_and_the_header_names_the_setup(result):
    table = bench.format_table(result)
    lines = table.splitlines()
    assert "cpu, batch 2 at 64x64" in lines[0]
    body = [line for line in lines if line.startswith("| mobilenet_v2")]
    assert len(body) == 5 and body[0].split("|")[-3].strip() == "1.000"
    assert all(line.split("|")[10].strip() == "n/a" for line in body)


def test_bad_output_stride_is_refused():
    with pytest.raises(ValueError, match="output stride"):
        bench.run_bench(bench.BenchSetup(), encoders=("mobilenet_v2",), output_strides=(32,))


@pytest.mark.parametrize("flag, value", [("--batch", "1"), ("--size", "8"), ("--repeats", "0")])
def test_bad_sizes_are_refused_before_any_work(flag, value):
    with pytest.raises(SystemExit, match=flag):
        bench.main(["--device", "cpu", flag, value])


def test_variants_pick_rows_with_plain_first_and_unknown_ones_are_refused(tmp_path):
    out = tmp_path / "b.json"
    argv = ["--device", "cpu", "--batch", "2", "--size", "64", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--encoders", "mobilenet_v2", "--os", "16", "--flops-size", "64", "--json", str(out)]
    assert bench.main([*argv, "--variants", "CA", bench.AA]) == 0
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["plain", "CA", bench.AA]
    # "CA fused" needs the Triton kernels, which cannot run on plain CPU tensors
    with pytest.raises(SystemExit, match="unknown variants \\['CA fused'\\]"):
        bench.main([*argv, "--variants", bench.FUSED_CA])
