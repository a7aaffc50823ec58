"""``python -m seg.kernels.bench`` has moved (see seg/tools/): this stub makes the old command fail
in one line that names the new one."""

if __name__ == "__main__":
    raise SystemExit("error: python -m seg.kernels.bench has moved: run "
                     "python -m seg.tools.bench --scope block (--scope tiles for --tiles)")
