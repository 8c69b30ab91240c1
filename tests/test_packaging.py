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
    for needed in ("Makefile", "requirements.txt", "constraints.txt", "package.json",
                   "package-lock.json",
                   "pytest.ini", "README.md", "tests/__init__.py", "tests/explorer_support.py",
                   "tests/browser_support.py", "notebooks/quickstart.ipynb",
                   "multiviz_widgets/demos/weights/easy_vqa.safetensors"):
        assert needed in names, needed
    for js in (ROOT / "js").rglob("*.js"):
        assert f"js/{js.relative_to(ROOT / 'js').as_posix()}" in names
    assert not any(n.startswith(("node_modules/", "build/")) for n in names)


def test_make_demo_serves_the_quickstart_notebook_at_the_url_it_prints():
    """`make demo` (its install step already done, as `make test` does first) starts JupyterLab
    where the URL it prints opens the quickstart notebook, says what to do there and how to
    stop, and the server's root URL leads there too. It once served notebooks/ as the root, so
    the printed .../notebooks/quickstart.ipynb was a file that did not exist."""
    import json
    import os
    import signal
    import time
    import urllib.error
    import urllib.request

    from .browser_support import free_port
    if shutil.which("make") is None:
        skip_or_fail("make is not installed")
    if subprocess.run(["make", "-q", "install"], cwd=ROOT, capture_output=True).returncode != 0:
        skip_or_fail("the demo's install step is not done (make install first): `make demo` "
                     "would install now")
    port = free_port()
    proc = subprocess.Popen(["make", "--no-print-directory", "demo", f"PORT={port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        said = [proc.stdout.readline().strip() for _ in range(5)]
        url = f"http://127.0.0.1:{port}/lab/tree/notebooks/quickstart.ipynb"
        # what to do next, for a teacher who has never used JupyterLab
        assert said[1] == f"Open {url} in a browser on this machine,", said
        assert "Run > Run All Cells" in said[2] and "Ctrl-C" in said[4], said
        path = url.split(f":{port}/lab/tree/", 1)[1]
        api = f"http://127.0.0.1:{port}/api/contents/{path}?content=0"
        deadline, model = time.monotonic() + 120, None
        while model is None and time.monotonic() < deadline:
            assert proc.poll() is None, "make demo stopped"
            try:
                with urllib.request.urlopen(api, timeout=5) as r:
                    model = json.load(r)
            except urllib.error.HTTPError as e:
                assert e.code != 404, f"the printed URL names a file the server does not have: {path}"
                time.sleep(0.5)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert model is not None, "the demo's server did not answer in 120 s"
        assert model["type"] == "notebook" and model["path"] == "notebooks/quickstart.ipynb"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.geturl().endswith("/lab/tree/notebooks/quickstart.ipynb"), r.geturl()
        # no prompt about Jupyter's news or updates on the projector (notebooks/.demo-settings)
        notes = "/lab/api/settings/@jupyterlab/apputils-extension:notification"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{notes}", timeout=10) as r:
            defaults = json.load(r)["schema"]["properties"]
        assert defaults["fetchNews"]["default"] == "false"
        assert defaults["checkForUpdates"]["default"] is False
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_make_demo_on_a_port_in_use_says_so_before_printing_the_url():
    """A second `make demo` (the first still running) printed the URL to open, then failed: the
    teacher opened the first server's page. It now stops before the URL and names PORT=."""
    import socket
    if shutil.which("make") is None:
        skip_or_fail("make is not installed")
    if subprocess.run(["make", "-q", "install"], cwd=ROOT, capture_output=True).returncode != 0:
        skip_or_fail("the demo's install step is not done (make install first)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(["make", "--no-print-directory", "demo", f"PORT={port}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"Port {port} cannot be used" in done.stdout, done.stdout
    assert "make demo PORT=" in done.stdout and "Open http" not in done.stdout, done.stdout


def _pins(path: pathlib.Path) -> dict[str, str]:
    """{normalised name: version} of a requirements-style file's ``name==version`` lines."""
    import re
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return pins


def test_the_constraints_pin_every_requirement_at_its_own_version():
    """make installs requirements.txt under constraints.txt: a requirement whose pin was raised
    without `make constraints` would make pip refuse the install on a fresh machine."""
    required, constrained = _pins(ROOT / "requirements.txt"), _pins(ROOT / "constraints.txt")
    assert required and len(constrained) > len(required)
    stale = {n: (v, constrained.get(n)) for n, v in required.items() if constrained.get(n) != v}
    assert not stale, f"requirements.txt vs constraints.txt (run `make constraints`): {stale}"


def test_the_make_venv_holds_the_constrained_versions():
    """The tests run in the environment constraints.txt describes, so that a fresh machine,
    which installs from it, tests the same versions (checked only in make's .venv)."""
    import importlib.metadata
    import re
    if pathlib.Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not make's .venv: the constraints describe that environment only")
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"].lower()): d.version
                 for d in importlib.metadata.distributions()}
    # a constrained package not installed is one the venv it was written from had besides
    # (a linter); constraints install nothing by themselves
    differ = {n: (v, installed[n]) for n, v in _pins(ROOT / "constraints.txt").items()
              if n in installed and installed[n].split("+")[0] != v}
    assert not differ, f"constraints.txt vs .venv (run `make constraints`): {differ}"
