"""README.md stays true: the quick start installs a CPU torch before the package, and the config key table is
the one steermoe/config.py generates."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys

from steermoe.config import TABLE_END, TABLE_START, Config, config_keys, markdown_table, with_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def readme_section(title: str) -> str:
    """The text of README.md's ``## title`` section, up to the next ``## `` heading."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def bash_blocks(section: str) -> list:
    return re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)


def test_quick_start_is_two_commands_and_installs_a_cpu_torch_first():
    section = readme_section("Quick start")
    block = bash_blocks(section)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    assert [step.strip() for step in lines[0].split("&&")] == [
        "python3 -m venv .venv", ". .venv/bin/activate", "pip install -U pip", CPU_TORCH, "pip install -e .",
        "steermoe demo"]
    assert [step.strip() for step in lines[1].split("&&")] == ['pip install -e ".[test]"', "pytest tests benchmarks"]
    prose = section.replace(block, "")
    assert f"leave out `{CPU_TORCH} &&`" in " ".join(prose.split())   # what a GPU user runs instead


def test_quick_start_names_what_the_package_provides():
    meta = importlib.metadata.metadata("steermoe")
    assert "test" in meta.get_all("Provides-Extra")
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["steermoe"] == "steermoe.cli:main"


def flatten(tree, prefix=""):
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``."""
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_config_key_table_lists_every_key_and_matches_the_readme():
    keys = config_keys()
    assert {name: json.loads(default) for name, _, default, _ in keys} == flatten(Config().to_dict())
    assert all(meaning.strip() for *_, meaning in keys)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert with_table(readme) == readme, "stale config key table: run python -m steermoe.config --readme README.md"
    assert "| `train.lr_router` | float | `0.0003` |" in readme
    assert "| `model.layers` | list of int, or null | `null` |" in readme


def test_config_key_table_commands(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "steermoe.config", "--markdown"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == markdown_table()
    stale = tmp_path / "README.md"
    stale.write_text(f"# x\n\n{TABLE_START}| old |\n{TABLE_END}\n\nrest\n")
    proc = subprocess.run([sys.executable, "-m", "steermoe.config", "--readme", str(stale)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert stale.read_text() == f"# x\n\n{TABLE_START}{markdown_table()}{TABLE_END}\n\nrest\n"
