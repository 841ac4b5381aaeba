"""Benchmarks of grounded-llava against plain LLaVA and YOLOv8n: `python bench/run.py --out DIR [--quick]`."""
