"""Placeholder: replaced by the implementation of this op family."""
def verify_greedy(*args, **kwargs):
    raise NotImplementedError
def verify_sampling(*args, **kwargs):
    raise NotImplementedError
def verify_tree_greedy(*args, **kwargs):
    raise NotImplementedError
