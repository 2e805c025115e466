"""The chaos suite (issue 17 item 7): harness and runs R1-R4, shared by benchmarks/chaos.py and
tests/test_chaos_quick.py."""
