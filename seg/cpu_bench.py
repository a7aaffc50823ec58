"""``python -m seg.cpu_bench`` has moved (see seg/tools/): this stub makes the old command fail
in one line that names the new one."""

if __name__ == "__main__":
    raise SystemExit("error: python -m seg.cpu_bench has moved: run python -m seg.tools.bench --device cpu "
                     "(add --backend both for onnxruntime, --scope projections for --projections)")
