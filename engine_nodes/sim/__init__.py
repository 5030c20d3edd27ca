"""The engine replica simulator: SGLang / vLLM HTTP surface, prefix cache, batching, timing, faults.

See README.md beside this file.
"""
