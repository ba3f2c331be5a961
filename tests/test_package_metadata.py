"""The installed distribution's metadata: one version (steermoe.__version__), the Apache-2.0 licence and its text."""
import importlib.metadata
import os

import steermoe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_the_package_version():
    assert importlib.metadata.version("steermoe") == steermoe.__version__


def test_licence_metadata_and_text():
    meta = importlib.metadata.metadata("steermoe")
    assert "Apache-2.0" in (meta.get("License-Expression"), meta.get("License"))
    assert "LICENSE" in (meta.get_all("License-File") or [])
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert " ".join(text.split()[:4]) == "Apache License Version 2.0,"
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000
