"""Where the repository is, for tests that read its files (examples, deploy files, configs)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
