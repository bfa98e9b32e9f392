"""The release: pyproject.toml reads it when building, tritonbn exports it as __version__."""
__version__ = "0.3.0"
