from setuptools import find_packages, setup

setup(
    name="multiviz_widgets",
    version="0.1.0",
    description="Jupyter widgets for seeing inside multimodal PyTorch models (MultiViz, on demand).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["multiviz_widgets", "multiviz_widgets.*"]),
    package_data={
        "multiviz_widgets": ["static/*.js", "static/*.css", "demos/weights/*.safetensors",
                             "demos/weights/*.json"],
    },
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1", "numpy>=1.24", "ipywidgets>=8", "traitlets>=5", "bqplot>=0.13",
        "anywidget>=0.9", "ipyvolume>=0.6", "ipython_genutils", "captum>=0.7", "shapiq>=1.0",
        "glm_saga>=0.1.2", "scikit-learn>=1.3", "safetensors>=0.4", "easy-vqa>=1.0", "pillow",
        "tqdm",
    ],
)
