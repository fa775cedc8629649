"""Placeholder: replaced by the implementation of this op family."""
def kv_gather(*args, **kwargs):
    raise NotImplementedError
def kv_compact_(*args, **kwargs):
    raise NotImplementedError
