"""seg.cpu_bench runs end to end at a tiny size and prints both ratios (timings themselves are not tested)."""

from seg import cpu_bench


def test_tiny_benchmark_prints_both_backends(capsys):
    cpu_bench.main(["--size", "32", "--threads", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| pytorch") or line.startswith("| onnxruntime")]
    assert len(rows) == 2
    assert all(row.rstrip().endswith("x |") for row in rows)


def test_table_ratio_is_ca_over_plain():
    table = cpu_bench.format_table({"pytorch": {"plain": 0.2, "ca": 0.21}})
    assert "| pytorch | 200.0 | 210.0 | 1.050x |" in table
