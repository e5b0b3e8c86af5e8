"""Packaging: one version everywhere."""
import os

from setuptools.config.pyprojecttoml import read_configuration

import rnnlm_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_metadata_is_the_package_version():
    # the wheel's metadata takes its version from pyproject.toml, which reads rnnlm_ext/_version.py
    project = read_configuration(os.path.join(ROOT, "pyproject.toml"))["project"]
    assert project["version"] == rnnlm_ext.__version__, (project["version"], rnnlm_ext.__version__)
