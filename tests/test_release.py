"""What a user reads before installing must hold: README's commands install versions inside
the supported ranges that pyproject.toml, README.md and tritonbn.check() state alike; CI
installs what README says; the version is one; README's CPU example runs as printed."""
import importlib.metadata
import re
from pathlib import Path

import pytest
import tritonbn
from tritonbn import dispatch, environment, reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def minimum(requirement: str) -> str:
    return re.fullmatch(r"[\w-]+>=([\d.]+)(;.*)?", requirement.replace(" ", "")).group(1)


def test_supported_ranges_agree():
    required = {"python": minimum("python" + PYPROJECT["requires-python"])}
    required.update((re.match(r"[\w-]+", dep).group(), minimum(dep))
                    for dep in PYPROJECT["dependencies"] if dep.startswith(("torch", "triton")))
    assert required == environment.MINIMUM_VERSIONS
    assert ("Supported: Python >= {python}, torch >= {torch}, Triton >= {triton}"
            .format(**required)) in " ".join(README.split())
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in PYPROJECT["classifiers"]


def pins(command: str) -> dict:
    return dict(re.findall(r'"(torch|torchvision|triton)==([\d.]+)"', command))


def test_readme_commands_install_the_same_supported_torch_and_triton_as_ci():
    commands = re.findall(r"```bash\n(python3 -m venv .*)\n```", README)
    assert len(commands) == 2
    perf, tests = map(pins, commands)
    assert perf["torch"] == tests["torch"] and perf["triton"] == tests["triton"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert pins(ci) == tests and '-e ".[test]"' in ci and "--isolated" in ci
    for name in ("torch", "triton"):
        assert (environment.release(tests[name])
                >= environment.release(environment.MINIMUM_VERSIONS[name]))


def test_one_version():
    assert "version" in PYPROJECT["dynamic"]
    assert re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1) \
        == tritonbn.__version__
    assert importlib.metadata.version("tritonbn") == tritonbn.__version__
    assert f"tritonbn-{tritonbn.__version__}-py3-none-any.whl" in README


def test_license():
    assert PYPROJECT["license"] == "BSD-3-Clause"
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")


def test_readme_cpu_example_runs(capsys, monkeypatch):
    """The first example under "## Use", as printed, on a CPU without TRITON_INTERPRET (the
    interpreter takes seconds on it)."""
    monkeypatch.setattr(dispatch, "backend", lambda x: reference)
    use = README[README.index("\n## Use\n"):]
    example = re.search(r"```python\n(.*?)```", use, re.S).group(1)
    assert "cuda" not in example
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "reference"
