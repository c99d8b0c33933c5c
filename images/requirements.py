"""Prints the requirements of recops and of the given extras, as pyproject.toml names them, one per line.

The images install their dependencies in a layer of their own, before the sources, from this list and
constrained by the lock (requirements.lock):

    python3 images/requirements.py pyproject.toml serve,operator [PACKAGE ...] > requirements.txt
    pip install -c requirements.lock -r requirements.txt

PACKAGE names more distributions to install (their versions come from the lock too); an argument may hold
several, separated by commas or spaces, so a Dockerfile can pass one quoted ARG. Standard library only:
it runs on the image's bare Python.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: str, packages: list[str]) -> list[str]:
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    listed = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        listed += project["optional-dependencies"][extra]
    named = [name for argument in packages for name in argument.replace(",", " ").split()]
    return list(dict.fromkeys([*listed, *named]))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} PYPROJECT EXTRA[,EXTRA...] [PACKAGE ...]")
    print("\n".join(requirements(sys.argv[1], sys.argv[2], sys.argv[3:])))
