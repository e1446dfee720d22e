"""Chaos suite: histories recorded by workloads, and Jepsen-style checkers over them.

`chaos.history` holds the operation model and its JSON-lines form; `chaos.checkers` holds pure
functions that judge a history against the logs read back after healing.
"""
