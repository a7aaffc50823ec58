"""``python datasets/bench_pipeline.py`` has moved into the one benchmark; this stub only says where."""

if __name__ == "__main__":
    raise SystemExit("error: datasets/bench_pipeline.py has moved: run python -m seg.tools.bench --scope pipeline "
                     "(--size is the crop)")
