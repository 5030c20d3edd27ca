"""Robustness (scenario 20): fuzz targets for the code that reads untrusted bytes, with their corpora.

Each ``test_*_fuzz.py`` module holds one target. Under pytest it replays its corpus directory and
runs a hypothesis search of the same target, both in seconds; run as a script it is an atheris
(libFuzzer) fuzzer that grows the corpus, for nightly runs. As in Envoy's ``test/fuzz``, an input
that ever crashed is added to the corpus, so it stays a regression test.
"""
