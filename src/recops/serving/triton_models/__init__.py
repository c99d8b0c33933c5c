"""Python-backend models of the Triton repository (run inside Triton's python stub).

Each module defines ``TritonPythonModel``; the repository's ``model.py`` files only
import it, so Triton runs the installed ``recops``. They import
``triton_python_backend_utils``, which exists only inside the stub.
"""
