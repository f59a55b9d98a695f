"""Benchmarks of the EVA-CLIP LLaVA tower against its peers; run `python -m benchmarks.tower --help`."""
