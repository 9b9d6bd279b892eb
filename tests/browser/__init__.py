"""Browser tests (headless Chromium): the built book and JupyterLab. See conftest.py."""
