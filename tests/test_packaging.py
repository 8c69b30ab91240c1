"""`pip install .` from a fresh clone gets the bundled JavaScript (built by setup.py when it is
missing) and the shipped weights, and the sdist carries what rebuilds and tests the package.
Both are built from a clean copy of the tracked files, so no stale build/ can leak in."""
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from .prerequisites import skip_or_fail

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _clean_copy(dest: pathlib.Path) -> pathlib.Path:
    """The files git tracks (and untracked ones it does not ignore), as a fresh clone has them:
    no JavaScript bundle, no build/; node_modules linked in so that npm needs no registry."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    if (ROOT / "node_modules").is_dir():
        (dest / "node_modules").symlink_to(ROOT / "node_modules")
    assert not list((dest / "multiviz_widgets" / "static").glob("*.js"))
    return dest


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    if shutil.which("npm") is None:
        skip_or_fail("npm is not installed (Node.js with npm: see the README's prerequisites)")
    return _clean_copy(tmp_path_factory.mktemp("clone"))


def test_a_wheel_from_a_fresh_clone_contains_the_bundle_and_the_weights(clone, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(clone), "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("multiviz_widgets-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for js in (ROOT / "js").glob("*.js"):
        assert f"multiviz_widgets/static/{js.name}" in names
    assert "multiviz_widgets/demos/weights/easy_vqa.safetensors" in names
    assert "multiviz_widgets/demos/weights/easy_vqa.json" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "build/")) for n in names)


def test_the_sdist_carries_the_sources_tests_and_set_up_files(clone, tmp_path):
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=clone)
    assert r.returncode == 0, r.stderr[-2000:]
    sdist = next(tmp_path.glob("multiviz_widgets-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("Makefile", "requirements.txt", "package.json", "package-lock.json",
                   "pytest.ini", "README.md", "tests/__init__.py", "tests/explorer_support.py",
                   "tests/browser_support.py", "notebooks/quickstart.ipynb",
                   "multiviz_widgets/demos/weights/easy_vqa.safetensors"):
        assert needed in names, needed
    for js in (ROOT / "js").glob("*.js"):
        assert f"js/{js.name}" in names
    assert not any(n.startswith(("node_modules/", "build/")) for n in names)
