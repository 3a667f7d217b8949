"""Moved: `seal bench knowledge` (seal/bench/knowledge.py). This runs it with the same flags."""

import sys

from seal.cli import main

sys.exit(main(["bench", "knowledge", *sys.argv[1:]]))
