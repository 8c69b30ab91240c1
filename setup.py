"""multiviz_widgets' package. A wheel or an install from source carries the JavaScript bundle
(multiviz_widgets/static/*.js, built from js/ by esbuild): ``build_py`` builds it with npm when it
is missing or older than its sources, and stops with a clear message when npm is not there.
An editable install (``make``'s, for development) leaves that to ``make js``."""
import shutil
import subprocess
from pathlib import Path

from setuptools import find_namespace_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _bundle_is_fresh() -> bool:
    sources = list((ROOT / "js").glob("*.js"))
    if not sources:                      # no sources (e.g. a wheel rebuilt from itself)
        return True
    bundles = [ROOT / "multiviz_widgets" / "static" / s.name for s in sources]
    shared = list((ROOT / "js" / "lib").glob("*.js"))      # modules the bundles import
    newest = max(s.stat().st_mtime for s in sources + shared + [ROOT / "package.json"])
    return all(b.is_file() and b.stat().st_mtime >= newest for b in bundles)


class BuildPyWithBundle(build_py):
    """build_py that first makes sure the JavaScript bundle is built and up to date."""

    def run(self):
        if not getattr(self, "editable_mode", False) and not _bundle_is_fresh():
            npm = shutil.which("npm")
            if npm is None:
                raise SystemExit(
                    "multiviz_widgets: the JavaScript bundle (multiviz_widgets/static/) is missing "
                    "or older than js/, and npm is not installed to build it. Install Node.js "
                    "and npm (Debian: apt-get install npm), or run `make js`, then build again.")
            if not (ROOT / "node_modules").is_dir():
                # exactly package-lock.json's versions, as `make` installs them (npm ci never
                # rewrites the lock file)
                how = "ci" if (ROOT / "package-lock.json").is_file() else "install"
                subprocess.run([npm, how, "--no-audit", "--no-fund"], cwd=ROOT, check=True)
            subprocess.run([npm, "run", "build"], cwd=ROOT, check=True)
        super().run()


setup(
    name="multiviz_widgets",
    version="0.1.0",
    description="Jupyter widgets for seeing inside multimodal PyTorch models (MultiViz, on demand).",
    long_description=open(ROOT / "README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # namespace packages: the data-only folders (static/, demos/weights/) are packages too, so
    # setuptools ships their files without its "Package would be ignored" warnings
    packages=find_namespace_packages(include=["multiviz_widgets", "multiviz_widgets.*"]),
    package_data={
        "multiviz_widgets": ["static/*.js", "static/*.css", "demos/weights/*.safetensors",
                             "demos/weights/*.json"],
    },
    include_package_data=True,
    python_requires=">=3.11",   # numpy, scipy, scikit-learn and pandas as pinned
    install_requires=[
        "torch>=2.1", "numpy>=1.24", "ipywidgets>=8", "traitlets>=5", "bqplot>=0.13",
        "anywidget>=0.9", "ipyvolume>=0.6", "ipython_genutils", "six", "shapiq>=1.0",
        "glm_saga>=0.1.2", "scikit-learn>=1.8", "safetensors>=0.4", "easy-vqa>=1.0", "pillow",
    ],
    cmdclass={"build_py": BuildPyWithBundle},
)
