"""Placeholder: replaced by the implementation of this op family."""
def select_visual_tokens(*args, **kwargs):
    raise NotImplementedError
def SelectedTokens(*args, **kwargs):
    raise NotImplementedError
