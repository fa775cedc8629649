"""Streaming: generated tokens handed to the caller as they become final, their text, and
stop strings found in it.

A generation calls `on_tokens(tokens)` with each group of tokens it emits, in order: the token
after the prompt, then what each speculative round accepted (its accepted drafts and the
target's correction or bonus token; one token per step in autoregressive decoding). Tokens are
final when handed over (never withdrawn), the groups concatenate to the output's tokens, and
nothing is handed past an eos, a completed stop string or max_new_tokens. The callback runs on
the host right after the round's one synchronisation, so it adds no synchronisation, but its
time counts in the generation's (in the decode time, but for the first token's call) and delays
the next round: keep it short (hand the tokens to another thread for slow work). It may end
the generation: returning True (the bool: a callback that returns a count, as file.write does,
goes on) stops it after the tokens just handed over, as an eos would (a client gone, a stop
string seen); an exception it raises ends the generation and reaches the caller of generate().

IncrementalText turns the growing token list into text that can be printed piece by piece: a
character whose UTF-8 bytes span several tokens (byte-level BPE, the byte tokenizer of the tiny
presets) is given out once its last byte is there, and each token is decoded in the context of
the tokens before it (tokenizers that drop a word's leading space at the start of a text).
StopStrings, on top of it, ends a generation at the token that completes a stop string.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, get_args

from hippo.errors import HippoError

if TYPE_CHECKING:
    from hippo.models.tokenizer import PromptTokenizer

TokenCallback = Callable[[list[int]], object]


# What a decoder gives for bytes that do not (yet) form a whole UTF-8 character.
_INCOMPLETE = "\ufffd"
# Tokens of context decoded before the new ones: enough for a tokenizer's spacing rules.
_CONTEXT_TOKENS = 5
# The most tokens a character still to be completed can span: a UTF-8 character is at most 4
# bytes, each in a token of its own at worst, with room to spare for special tokens between.
# Replacement characters ending the text of more tokens than this are invalid bytes, final.
_PENDING_TOKENS = 8


def check_token_callback(on_tokens: object) -> None:
    """on_tokens must be None or callable (a string or a list there is a mistake, found before
    the video is read rather than after the first token)."""
    if on_tokens is not None and not callable(on_tokens):
        raise HippoError(f"on_tokens must be a callable taking a list of token ids, or None; got "
                         f"{type(on_tokens).__name__}")


class IncrementalText:
    """The text of a token list that grows at its end, handed out in pieces whose concatenation
    is the decoded text of the whole list (for tokenizers whose decoded text of a list begins
    with that of its prefixes, as byte-level BPE and sentencepiece ones' does).

    push(tokens) returns the text that is final after them: all of it but a character whose
    last bytes are still to come. finish() returns the rest (the replacement characters of
    bytes that never completed)."""

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._given = 0  # tokens whose whole text was handed out
        self._context = 0  # first token decoded with the ones after _given (a few before it)
        self._extra = 0  # characters handed out of the text the tokens after _given add
        self._given_text = ""  # the text of tokens[_context:_given]

    def push(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        text, settled = self._text_after_given(), ""
        if text.endswith(_INCOMPLETE) and len(self.tokens) - self._given > _PENDING_TOKENS:
            settled, text = self._settle_invalid_bytes(text)
        if text.endswith(_INCOMPLETE):  # hold the unfinished character back
            final = text.rstrip(_INCOMPLETE)
            piece, self._extra = final[self._extra:], max(self._extra, len(final))
            return settled + piece
        return settled + self._advance(text)

    def copy(self) -> IncrementalText:
        """An independent copy (the tokenizer shared): pushing to it leaves this one as it is."""
        clone = copy.copy(self)
        clone.tokens = list(self.tokens)
        return clone

    def finish(self) -> str:
        """The text of the tokens not yet handed out, complete or not."""
        return self._advance(self._text_after_given())

    def _text_after_given(self) -> str:
        """The text the tokens after _given add, decoded in the context of a few before."""
        window = self.tokenizer.decode(self.tokens[self._context:])
        return window[len(self._given_text):]

    def _settle_invalid_bytes(self, text: str) -> tuple[str, str]:
        """(what to hand out, the text after it) when `text`, the text after _given, has ended
        in replacement characters for more tokens than a character spans: a model emitting
        invalid bytes, which would otherwise be held back, and decoded again with every push,
        for ever. The text of all but the last _PENDING_TOKENS tokens is final if it begins
        the whole text (no byte near its end was completed by the several bytes after it)."""
        cut = len(self.tokens) - _PENDING_TOKENS
        head = self.tokenizer.decode(self.tokens[self._context:cut])[len(self._given_text):]
        if not text.startswith(head):  # the cut falls inside a character: wait for its end
            return "", text
        extra = max(0, self._extra - len(head))  # of the text after the cut, handed out already
        piece = self._advance(head, cut)
        self._extra = extra
        return piece, self._text_after_given()

    def _advance(self, text: str, upto: int | None = None) -> str:
        """What of `text`, the text after _given of the tokens up to `upto` (all: None), is not
        handed out yet; their text is handed out after it."""
        piece = text[self._extra:]
        self._given, self._extra = len(self.tokens) if upto is None else upto, 0
        # Tokens that decode to nothing (special tokens, which decode skips) are no context: a
        # context of them alone would put the next token at the start of a text, where a
        # sentencepiece decoder drops its leading space. The context then stays where it was.
        context = max(0, self._given - _CONTEXT_TOKENS)
        given = self.tokenizer.decode(self.tokens[context:self._given])
        if given or context == self._context:
            self._context = context
        else:
            given = self.tokenizer.decode(self.tokens[self._context:self._given])
        self._given_text = given
        return piece


class StopStrings:
    """Ends a generation at the token that completes one of `strings` in its text, that token
    kept (as HF generate's stop_strings and a stop in vLLM's output before it is cut). Told
    every token as it is emitted, so that a speculative round's accepted block is cut exactly
    where decoding one token at a time stops. Special tokens decode to no text: they never
    complete a stop string (the eos ids stop those). A stop string ending in U+FFFD (the
    replacement character) matches only once the token after it is there: a trailing one may
    be a character whose bytes are still to come. It holds one generation's text: make one for
    each generation (the decoding functions refuse one already told tokens)."""

    def __init__(self, tokenizer: PromptTokenizer, strings: Sequence[str]) -> None:
        self.strings = stop_strings(strings)
        if not self.strings:
            raise HippoError("StopStrings needs at least one stop string")
        self._text = IncrementalText(tokenizer)
        # The text before a new piece that a stop string ending in the piece can start in.
        self._reach = max(len(string) for string in self.strings) - 1
        self._tail = ""

    @property
    def told(self) -> bool:
        """Whether tokens were told (then it holds a generation's text, and a stop string could
        be matched across the end of that generation and the start of another)."""
        return bool(self._text.tokens)

    def completed_by(self, token: int) -> bool:
        """Whether `token`, the next one emitted, completes a stop string."""
        piece = self._text.push([token])
        if not piece:
            return False
        window = self._tail + piece
        self._tail = window[max(0, len(window) - self._reach):] if self._reach else ""
        return any(string in window for string in self.strings)

    def copy(self) -> StopStrings:
        """An independent copy, to try tokens on without telling this one (a speculative round
        asks before it knows which of its rows it must check)."""
        clone = copy.copy(self)
        clone._text = self._text.copy()
        return clone


def check_unused_stop(stop: object) -> None:
    """`stop` of the decoding functions: None, or a StopStrings no generation has told tokens
    (a list of strings there has no tokenizer to decode the text with)."""
    if stop is None:
        return
    if not isinstance(stop, StopStrings):
        raise HippoError(f"stop must be a hippo.streaming.StopStrings (the target's tokenizer and "
                         f"the strings) or None, got {type(stop).__name__}")
    if stop.told:
        raise HippoError("this StopStrings holds another generation's text: make a new one for "
                         "each generation")


def stop_strings(stop: object) -> tuple[str, ...]:
    """The stop strings a caller gave (one string, or a sequence of them such as a list; None
    for none) as a tuple, checked: each a non-empty str."""
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, Sequence) or isinstance(strings, (bytes, bytearray)) \
            or not all(isinstance(s, str) and s for s in strings):
        raise HippoError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(strings)


# Why a generation ended, in this order where several hold at its last token: an eos token, a
# stop string, max_new_tokens, an on_tokens callback that returned True.
FinishReason = Literal["eos", "stop_string", "max_new_tokens", "callback"]
FINISH_REASONS: tuple[FinishReason, ...] = get_args(FinishReason)


class EmittedTokens:
    """A generation's tokens as they are emitted, and whether (and why) it has ended: after an
    eos token, the token that completes a stop string, max_new_tokens tokens, or a group after
    which on_tokens asked to stop. Every decoding loop emits through one, so that they all end
    at the same token and hand the same tokens to the callback."""

    def __init__(self, max_new_tokens: int, eos_ids: set[int],
                 on_tokens: TokenCallback | None = None, stop: StopStrings | None = None) -> None:
        check_token_callback(on_tokens)
        check_unused_stop(stop)
        self.max_new_tokens, self.eos_ids = max_new_tokens, eos_ids
        self.on_tokens, self.stop = on_tokens, stop
        self.tokens: list[int] = []
        self.finish_reason: FinishReason | None = None  # None while the generation goes on

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def emit(self, tokens: list[int]) -> int:
        """Append tokens up to the one that ends the generation, hand those appended to
        on_tokens (which may end it after them); how many were appended."""
        before = len(self.tokens)
        for token in tokens:
            if self.finished:
                break
            self.tokens.append(token)
            self.finish_reason = self._ended_by(token)
        appended = self.tokens[before:]
        if appended and self.on_tokens is not None:
            asked_to_stop = self.on_tokens(appended) is True
            if asked_to_stop and not self.finished:
                self.finish_reason = "callback"
        return len(appended)

    def ending_within(self, tokens: list[int]) -> int | None:
        """The index of the first of `tokens`, were they emitted next, after which an eos or a
        stop string would end the generation (None for none); nothing is emitted."""
        probe = None if self.stop is None else self.stop.copy()
        return next((index for index, token in enumerate(tokens) if token in self.eos_ids
                     or (probe is not None and probe.completed_by(token))), None)

    def _ended_by(self, token: int) -> FinishReason | None:
        # The stop string before the count: a string completed by the last token allowed is
        # why the generation ended, whichever loop emitted it.
        if token in self.eos_ids:
            return "eos"
        if self.stop is not None and self.stop.completed_by(token):
            return "stop_string"
        return "max_new_tokens" if len(self.tokens) >= self.max_new_tokens else None
