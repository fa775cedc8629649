"""The static KV cache of one language model: one tensor for all layers plus a device-side length.

Layout `[layers, 2, B, Hkv, S_max, D]` (index 0 = keys after RoPE, 1 = values), the layout that
hippo_ext.decode_attention, kv_gather and kv_compact_ take. Positions [0, length[b]) of sequence b
are valid; everything past them is scratch that the next append overwrites, so rolling back is a
change of the length alone.
"""
from __future__ import annotations

import operator
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hippo.errors import HippoError, is_int

KEYS, VALUES = 0, 1


class StaticKVCache:
    """Preallocated keys and values of every layer, and how many positions are valid.

    `length` lives on the cache's device so that captured CUDA graphs read and advance it without
    a host sync. `host_length` mirrors it on the host while it is known exactly (every append and
    integer rollback keeps it); after a rollback to a device tensor it is None until the next
    integer rollback, and overflow is then no longer checked on the host (writes are clamped to
    the buffer, so memory stays in bounds either way).

    A cache may hold a prompt prefix for the next prompt that starts with it (hold_prefix):
    every change that could let a later write reach the prefix's positions forgets it (reset,
    fill_to, a rollback below it or to a device tensor, whose values the host does not know).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        sizes = (num_layers, batch, num_kv_heads, max_seq_len, head_dim)
        if not all(is_int(size) for size in sizes) or min(sizes) < 1:
            raise HippoError(
                "static KV cache sizes must be positive integers: "
                f"layers={num_layers}, batch={batch}, kv heads={num_kv_heads}, "
                f"max_seq_len={max_seq_len}, head_dim={head_dim}")
        self.tensor = torch.zeros(num_layers, 2, batch, num_kv_heads, max_seq_len, head_dim,
                                  dtype=dtype, device=device)
        self.length = torch.zeros(batch, dtype=torch.int64, device=device)
        self.host_length: int | None = 0
        # (a weak reference to what the held prefix was made from, its length, its stamp), or
        # None.
        self._prefix: tuple[weakref.ref, int, object] | None = None

    @property
    def max_seq_len(self) -> int:
        return self.tensor.size(4)

    @property
    def batch(self) -> int:
        return self.tensor.size(2)

    @property
    def num_layers(self) -> int:
        return self.tensor.size(0)

    def keys(self, layer: int) -> torch.Tensor:
        """[B, Hkv, S_max, D] view of one layer's keys."""
        return self.tensor[layer, KEYS]

    def values(self, layer: int) -> torch.Tensor:
        """[B, Hkv, S_max, D] view of one layer's values."""
        return self.tensor[layer, VALUES]

    def layer_keys(self, layers: tuple[int, ...], length: int, row: int = 0) -> torch.Tensor:
        """[len(layers), Hkv, length, D] keys of batch row `row` at the given layers: a view of
        the cache when the layers are evenly spaced (the default selection layers are; at 7B and
        12.6k tokens a copy would be ~38 MB), a copy otherwise."""
        keys = self.tensor[:, KEYS, row, :, :length]
        step = layers[1] - layers[0] if len(layers) > 1 else 1
        if step > 0 and list(layers) == list(range(layers[0], layers[-1] + 1, step)):
            return keys[layers[0]:layers[-1] + 1:step]
        return keys.index_select(0, torch.tensor(layers, device=self.tensor.device))

    def reserve(self, count: int, what: str = "append") -> None:
        """Account on the host for `count` positions about to be appended; raise if they do not
        fit. Called before the (possibly captured) device work of an append."""
        if self.host_length is None:
            return
        self.check_room(self.host_length, count, what)
        self.host_length += count

    def check_room(self, start: int, count: int, what: str = "append") -> None:
        """Raise unless `count` positions fit after `start`."""
        if start + count > self.max_seq_len:
            raise HippoError(
                "prompt plus max_new_tokens beyond the cache: "
                f"{what} of {count} positions at length {start} exceeds the "
                f"cache's max_seq_len {self.max_seq_len}; build the runtime with a larger "
                "max_seq_len or ask for fewer tokens")

    def write_positions(self, count: int) -> torch.Tensor:
        """[B, count] cache positions of the `count` newest tokens, assuming `length` already
        includes them; clamped into the buffer so that no write leaves it."""
        offsets = torch.arange(count, device=self.length.device)
        positions = self.length[:, None] - count + offsets
        return positions.clamp_(0, self.max_seq_len - 1)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor) -> None:
        """Store keys/values [B, Hkv, n, D] of one layer at positions [B, n] (device tensor;
        static shapes, no host sync)."""
        index = positions[:, None, :, None].expand_as(keys)
        self.keys(layer).scatter_(2, index, keys)
        self.values(layer).scatter_(2, index, values)

    @contextmanager
    def restored_on_error(self) -> Iterator[None]:
        """An append that raises part-way (memory running out in a long prefill, a CUDA graph
        capture failing) leaves the length where it found it, on the host and the device, so
        that the cache stays usable: when the host knows that length (no sync to learn it)."""
        start = self.host_length
        try:
            yield
        except BaseException:  # a KeyboardInterrupt in a long prefill too
            if start is not None:
                self.host_length = start
                try:
                    self.length.fill_(start)
                except Exception:  # a sticky CUDA error fails it too: the first error is the one
                    pass           # to raise, with its own context
            raise

    def advance(self, count: int) -> None:
        """Add `count` to the device length (in place, capturable)."""
        self.length.add_(count)

    def hold_prefix(self, source: object, length: int, stamp: object = None) -> None:
        """Declare positions [0, length), just written, the prefix that `source` (an object a
        weak reference can name: the video embedding a prompt was made from) gives every prompt
        made from it; holds_prefix(source, length, stamp) says whether they are still here.
        stamp: what else the keys and values were computed from (the weights' versions): a
        prefix is held only while the stamp given to holds_prefix equals it."""
        if self.host_length != length:
            raise HippoError(f"hold_prefix: the cache holds {self.host_length} positions, not "
                             f"the prefix's {length}")
        self._prefix = (weakref.ref(source), length, stamp)

    def holds_prefix(self, source: object, length: int, stamp: object = None) -> bool:
        """Whether positions [0, length) are still the prefix hold_prefix(source, length,
        stamp) named (nothing written to them since; `source` alive; the same stamp)."""
        held = self._prefix
        return held is not None and source is not None and held[0]() is source \
            and held[1] == length and held[2] == stamp

    def _forget_prefix_below(self, length: int | None) -> None:
        """A rollback to `length` (None: unknown on the host) lets writes below the prefix."""
        if self._prefix is not None and (length is None or length < self._prefix[1]):
            self._prefix = None

    def rollback(self, new_length: int | torch.Tensor) -> None:
        """Forget every position from new_length on (by length only, no data movement).

        new_length: an int (all sequences), or a device tensor [B] / scalar, which keeps
        speculative decoding free of host syncs at the price of host-side overflow checks.
        """
        if isinstance(new_length, torch.Tensor):
            # Dtype and shape are known on the host (the values are not: no sync here).
            if new_length.is_floating_point() or new_length.is_complex() \
                    or new_length.dtype == torch.bool:
                raise HippoError(f"rollback: a length tensor must hold integers, got "
                                 f"{new_length.dtype}")
            if new_length.dim() > 1 or new_length.numel() not in (1, self.batch):
                raise HippoError(f"rollback: a length tensor must be a scalar or [B] = "
                                 f"[{self.batch}], got shape {tuple(new_length.shape)}")
            self.length.copy_(new_length.to(self.length.dtype).expand_as(self.length))
            self.host_length = None
            self._forget_prefix_below(None)
            return
        new_length = _length(new_length, "rollback")
        if not 0 <= new_length <= self.max_seq_len:
            raise HippoError(
                f"cannot roll the KV cache back to length {new_length}: it holds at most "
                f"{self.max_seq_len} positions")
        if self.host_length is not None and new_length > self.host_length:
            raise HippoError(
                f"cannot roll the KV cache forward from length {self.host_length} to "
                f"{new_length}: rollback only forgets positions")
        self.length.fill_(new_length)
        self.host_length = new_length
        self._forget_prefix_below(new_length)

    def fill_to(self, length: int) -> None:
        """Declare positions [0, length) valid after they were written directly into `tensor`
        (for example by hippo_ext.kv_gather from another cache)."""
        length = _length(length, "fill_to")
        if not 0 <= length <= self.max_seq_len:
            raise HippoError(f"cannot fill the KV cache to length {length}: it holds at most "
                             f"{self.max_seq_len} positions")
        self.length.fill_(length)
        self.host_length = length
        self._prefix = None  # written from position 0 by someone else

    def reset(self) -> None:
        """Empty the cache (length 0 everywhere)."""
        self.length.zero_()
        self.host_length = 0
        self._prefix = None

    def current_length(self) -> int:
        """The valid length as a host int (a device sync when the host mirror is unknown).
        With batch > 1 and differing lengths this is the longest."""
        if self.host_length is not None:
            return self.host_length
        return int(self.length.max().item())


def _length(value: object, what: str) -> int:
    """A cache length given on the host: an integer (numpy's too), never 3.7 cut to 3."""
    try:
        return operator.index(value)
    except TypeError:
        raise HippoError(f"{what}: length must be an integer, got {value!r}") from None
