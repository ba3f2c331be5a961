"""README.md's commands stay runnable as written: the quick start installs a CPU torch before the package."""
import importlib.metadata
import os
import re

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
