"""Map the `warmserve` namespace, which spans two source roots (operator/ and worker/), package by package.

setuptools' `packages.find` with several `where` roots resolves every subpackage against one root, so the
mapping is computed here instead; all other metadata lives in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

package_dir = {"warmserve": "operator/warmserve"}  # the namespace root holds cli.py
package_dir |= {
    package: f"{root}/{package.replace('.', '/')}"
    for root in ("operator", "worker")
    for package in find_namespace_packages(root, include=["warmserve.*"])
}
setup(packages=sorted(package_dir), package_dir=package_dir)
