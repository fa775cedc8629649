"""Placeholder: replaced by the implementation of this op family."""
def decode_attention(*args, **kwargs):
    raise NotImplementedError
