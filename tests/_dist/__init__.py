"""Multi-process test support: `runner` starts torchrun from pytest; the worker scripts here are what it runs."""
