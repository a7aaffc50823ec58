"""``python -m seg.kernels.bench`` has moved (see seg/tools/); this stub only says where, so the old command fails in one line."""

if __name__ == "__main__":
    raise SystemExit("error: python -m seg.kernels.bench has moved: run python -m seg.tools.bench --scope block (--scope tiles for --tiles)")
