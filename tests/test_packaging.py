"""`pip install .` gets the bundled JavaScript and the shipped weights: the wheel contains them."""
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_wheel_contains_the_bundle_and_the_weights(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("multiviz_widgets-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for js in (ROOT / "js").glob("*.js"):
        assert f"multiviz_widgets/static/{js.name}" in names
    assert "multiviz_widgets/demos/weights/easy_vqa.safetensors" in names
    assert "multiviz_widgets/demos/weights/easy_vqa.json" in names
    assert not any(n.startswith("tests/") for n in names)
