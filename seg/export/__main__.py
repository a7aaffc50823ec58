"""``python -m seg.export``: see :mod:`seg.export.onnx`."""

import sys

from seg.export.onnx import main

sys.exit(main())
